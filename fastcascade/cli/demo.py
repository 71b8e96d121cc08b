"""``fastcascade demo``: segment a CT with the embedded default model and report Dice.

Uses the real case A CT when the shared data folder has it (``fastcascade.demo.find_case_a``),
otherwise a generated phantom. Writes the input (phantom only), the labels with their names
JSON, and an overlay PNG (where matplotlib is installed) into ``--out``.

    $ fastcascade demo --out out
    $ python -m fastcascade.demo --out out     # the same (make demo)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``fastcascade`` command's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="segment case A (or a phantom) with the default model and report Dice",
        description="Segment the real case A CT when the shared data folder has it "
        "($FASTCASCADE_DATA, else ../shared/data), otherwise a generated phantom, with the "
        "embedded default model; write the labels and an overlay PNG into --out and print "
        "the times and the Dice against the reference.",
    )
    p.add_argument("--out", default="out", type=Path, help="output folder (default: out)")
    p.add_argument(
        "--device",
        default="auto",
        type=arguments.device,
        help="auto (a GPU if present, else the CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    import fastcascade  # segment() looked up at call time (tests replace it)

    from ..api import DEFAULT_MODEL
    from ..config import CLASS_NAMES
    from ..demo import PHANTOM_SEED, case_a_reference, find_case_a
    from ..evaluate import dice
    from ..model.checkpoint import load_config

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    case_a = find_case_a()
    if case_a is not None:
        ct_path, seg_path = case_a
        name, reference = "case_a", case_a_reference(seg_path)
        print(f"segmenting the real case A: {ct_path}")
    else:
        from ..phantom import make_phantom

        phantom = make_phantom(seed=PHANTOM_SEED)
        ct_path, name, reference = out / "phantom_ct.nii.gz", "phantom", phantom.labels
        nib.save(phantom.to_nifti()[0], str(ct_path))
        print(f"no shared data found: segmenting a generated phantom (seed {PHANTOM_SEED})")

    result = fastcascade.segment(str(ct_path), device=args.device)
    seg_out = out / f"{name}_seg.nii.gz"
    result.save(seg_out)
    print(f"labels written to {seg_out} (+ {seg_out.name.replace('.nii.gz', '.json')})")
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"times: {times}")
    print(
        f"C1 {result.c1_fraction:.1%} of voxels, C2 {result.c2_fraction:.1%}; tiles "
        + ", ".join(f"{k} {c}/{t}" for k, (c, t) in result.tiles.items())
    )

    scores = dice(result.labels, reference, len(CLASS_NAMES))
    print("\nDice against the reference" + (" (pseudo-ground-truth)" if case_a else ""))
    if case_a and "case_a" in ((load_config(DEFAULT_MODEL).training or {}).get("dice") or {}):
        print("  (case A was in the default model's training data: this shows fit, not how")
        print("   it does on scans it never saw; the README has the leave-one-out tables)")
    for k in range(1, len(CLASS_NAMES)):
        print(f"  {CLASS_NAMES[k]:<22} {scores[k]:.3f}")
    try:
        from ..viz import overlay_png

        ct = nib.as_closest_canonical(nib.load(str(ct_path)))
        seg = nib.as_closest_canonical(nib.load(str(seg_out)))
        png = out / f"{name}_overlay.png"
        overlay_png(
            np.asarray(ct.dataobj, dtype=np.float32),
            np.asarray(seg.dataobj),
            png,
            spacing=ct.header.get_zooms()[:3],
        )
        print(f"overlay written to {png}")
    except ImportError as err:
        print(f"(no overlay PNG: {err})")
    return 0
