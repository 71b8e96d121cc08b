"""The ``segment`` command's outputs beyond the labels: ``--preview``, ``--statistics``,
``--split``, and the label clean-up flags ``--organs`` and ``--largest-component``.

They map onto :class:`~fastcascade.api.SegmentationResult`: the clean-up onto
``select()`` and ``largest_components()``, the files onto ``save(preview=...,
statistics=..., split=...)``, which writes them in one group with the labels (all or
none) and lists them in the completion marker.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io.nifti import label_names_path, mask_file_name
from ..statistics import statistics_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags as one group of ``parser``."""
    g = parser.add_argument_group("more outputs (written with the labels, all or none)")
    g.add_argument(
        "--preview",
        metavar="PNG",
        type=Path,
        help="an overlay picture: axial, coronal and sagittal slices through the organs, "
        "one colour per label, a legend of those present (needs matplotlib: "
        "pip install fastcascade[viz])",
    )
    g.add_argument(
        "--statistics",
        metavar="JSON",
        type=Path,
        help="per organ: voxels, volume (ml), mean and std HU, bounding box (world RAS mm "
        "and voxels) on the input's grid, as JSON and as a CSV of the same name beside it "
        "(stats.json + stats.csv)",
    )
    g.add_argument(
        "--split",
        metavar="FOLDER",
        type=Path,
        help="one binary mask per organ, FOLDER/<organ>.nii.gz (uint8 0/1, the input's "
        "affine) with FOLDER/<organ>.json naming it",
    )
    g.add_argument(
        "--organs",
        metavar="NAMES",
        help="comma-separated organs to keep, e.g. liver,spleen: the others become "
        "background in every output (a name the model does not have is refused)",
    )
    g.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only each organ's largest 6-connected component (SciPy, on the CPU)",
    )


def check(args: argparse.Namespace) -> None:
    """What can be checked before the work: file names, matplotlib for ``--preview``,
    organ names against the model's classes."""
    if args.preview is not None:
        if args.preview.suffix.lower() != ".png":
            raise ValueError(f"--preview {args.preview}: expected a file name ending in .png")
        from ..viz import require_matplotlib

        try:
            require_matplotlib()
        except ImportError:
            raise ValueError(
                "--preview needs matplotlib: pip install fastcascade[viz], or leave --preview out"
            ) from None
    if args.statistics is not None:
        statistics_paths(args.statistics)  # raises on a name without .json
    if args.split is not None and args.split.exists() and not args.split.is_dir():
        raise NotADirectoryError(f"--split {args.split} is a file; expected a folder")
    if args.organs is not None:
        from ..postprocess import organ_ids

        organ_ids(_class_names(args), args.organs)


def planned(args: argparse.Namespace) -> list[Path]:
    """The files these flags will write (checked for existence and against the input)."""
    paths: list[Path] = []
    if args.preview is not None:
        paths.append(args.preview)
    if args.statistics is not None:
        paths += statistics_paths(args.statistics)
    if args.split is not None:
        names = _class_names(args)
        ids = range(1, len(names))
        if args.organs is not None:
            from ..postprocess import organ_ids

            ids = organ_ids(names, args.organs)
        for k in ids:
            mask = args.split / mask_file_name(names[k])
            paths += [mask, label_names_path(mask)]
    return paths


def apply(result, args: argparse.Namespace):
    """``result`` with ``--organs`` and ``--largest-component`` applied."""
    if args.organs is not None:
        result = result.select(args.organs)
    if args.largest_component:
        result = result.largest_components()
    return result


def save_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``SegmentationResult.save`` these flags ask for."""
    return {"preview": args.preview, "statistics": args.statistics, "split": args.split}


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The clean-up asked for, for the completion marker: ``--organs`` as the model's
    names in class-id order without repeats, so ``spleen,liver`` and ``liver,spleen``
    record the same and a re-run skips the scan."""
    organs = None
    if args.organs is not None:
        from ..postprocess import organ_ids

        names = _class_names(args)
        organs = [names[k] for k in organ_ids(names, args.organs)]
    return {"organs": organs, "largest_component": args.largest_component}


def _class_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The class names of ``--model`` (its JSON config), before it is loaded."""
    from ..api import DEFAULT_MODEL
    from ..model.checkpoint import load_config

    return load_config(DEFAULT_MODEL if args.model is None else args.model).class_names
