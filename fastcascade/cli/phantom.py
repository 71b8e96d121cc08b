"""``fastcascade phantom -o CT --labels LABELS``: a synthetic abdominal CT and its labels.

$ fastcascade phantom -o ct.nii.gz --labels seg.nii.gz --seed 1 --contrast portal_venous
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from . import arguments


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``phantom`` to the ``fastcascade`` command's subparsers."""
    p = sub.add_parser(
        "phantom",
        help="write a synthetic abdominal CT and its labels",
        description="Write a synthetic abdominal CT (HU) and its label map (the package's "
        "class list) as NIfTI, with a JSON of label names beside the labels.",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="CT file (.nii/.nii.gz)")
    p.add_argument("--labels", required=True, type=Path, help="label file (.nii/.nii.gz)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument(
        "--shape", type=arguments.positive_int, nargs=3, metavar=("X", "Y", "Z"), help="voxels"
    )
    p.add_argument(
        "--spacing", type=arguments.positive_float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm"
    )
    p.add_argument("--contrast", choices=("none", "portal_venous"), default=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_phantom)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ..io.atomic import output_folders, same_file
    from ..io.nifti import label_names_path

    outputs = [args.output, args.labels, label_names_path(args.labels)]
    label_names_path(args.output)  # checks both suffixes before the work
    if same_file(args.output, args.labels):
        raise ValueError("-o and --labels name the same file")
    arguments.refuse_existing(outputs, args.overwrite)
    with output_folders({p.parent for p in outputs}):
        return _write_phantom(args)


def _write_phantom(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from ..config import CLASS_NAMES
    from ..io.nifti import labels_outputs, write_outputs

    phantom = importlib.import_module("fastcascade.phantom")  # at call time: tests replace it
    # Only what was given: the generator's own defaults apply to the rest.
    given = {"shape": args.shape, "spacing": args.spacing, "seed": args.seed}
    given["contrast"] = args.contrast
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    ph = phantom.make_phantom(**kwargs)
    ct_img, seg_img = ph.to_nifti()
    labels = np.asarray(seg_img.dataobj)  # uint8 class ids
    outputs, _ = labels_outputs(
        args.labels, labels, seg_img.affine, CLASS_NAMES, header=seg_img.header
    )
    # all three files or none: the CT first, the labels last
    write_outputs([(args.output, lambda tmp: nib.save(ct_img, tmp)), *outputs])
    print(f"wrote {args.output}, {args.labels}")
    return 0
