"""The quick-start job: segment a CT with the embedded default model and report Dice.

Uses the real case A CT when the shared data folder exists (``$FASTCASCADE_DATA``, else
``../shared/data`` from the working directory), otherwise a generated phantom. Writes the
input (phantom only), the labels with their names JSON, and an overlay PNG into ``--out``.

    python -m fastcascade.demo --out out
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .api import segment
from .config import CLASS_NAMES
from .evaluate import dice
from .io.nifti import map_labels
from .presets import CASE_A_TO_CLASSES

PHANTOM_SEED = 9001  # never used in training the default model


def find_case_a() -> tuple[Path, Path] | None:
    root = Path(os.environ.get("FASTCASCADE_DATA", Path.cwd().parent / "shared" / "data"))
    ct = root / "ct" / "case_a" / "example_ct.nii.gz"
    seg = root / "ct" / "case_a" / "example_seg_fast_force_split.nii.gz"
    return (ct, seg) if ct.exists() and seg.exists() else None


def case_a_reference(seg_path: Path) -> np.ndarray:
    """Case A's labels mapped onto ``CLASS_NAMES`` (on its own grid)."""
    raw = np.asarray(nib.load(str(seg_path)).dataobj)
    return map_labels(raw, CASE_A_TO_CLASSES).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcascade.demo", description=__doc__)
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    case_a = find_case_a()
    if case_a is not None:
        ct_path, seg_path = case_a
        name, reference = "case_a", case_a_reference(seg_path)
        print(f"segmenting the real case A: {ct_path}")
    else:
        from .phantom import make_phantom

        phantom = make_phantom(seed=PHANTOM_SEED)
        ct_path, name, reference = out / "phantom_ct.nii.gz", "phantom", phantom.labels
        nib.save(phantom.to_nifti()[0], str(ct_path))
        print(f"no shared data found: segmenting a generated phantom (seed {PHANTOM_SEED})")

    result = segment(str(ct_path), device=args.device)
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
    for k in range(1, len(CLASS_NAMES)):
        print(f"  {CLASS_NAMES[k]:<22} {scores[k]:.3f}")
    try:
        from .viz import overlay_png

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


if __name__ == "__main__":
    raise SystemExit(main())
