"""Regenerate the pictures under docs/.

    python benchmarks/make_figures.py            # all figures
    python benchmarks/make_figures.py phantom    # only docs/phantom_overlay.png

``phantom``: the synthetic phantom of seed 0 without contrast, with its labels
(``docs/phantom_overlay.png``); ``case_a``: the real case A segmented by the default model
(``docs/case_a_overlay.png``; needs the shared data). Needs matplotlib
(``pip install fastcascade[viz]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def phantom_overlay(out: Path = DOCS / "phantom_overlay.png") -> Path:
    from fastcascade.phantom import make_phantom
    from fastcascade.viz import overlay_png

    ph = make_phantom(seed=0, contrast="none")
    # Axial slice through the kidneys' hila, coronal through the kidneys, sagittal
    # through the liver and right kidney (voxel indices of the default grid).
    overlay_png(ph.image, ph.labels, out, ph.spacing, slices=(80, 42, 88))
    return out


def case_a_overlay(out: Path = DOCS / "case_a_overlay.png") -> Path:
    """The real case A segmented by the embedded default model (skipped without the data)."""
    import fastcascade
    from fastcascade.demo import find_case_a

    paths = find_case_a()
    if paths is None:
        raise SystemExit("case A not found: set FASTCASCADE_DATA")
    # The preview picks, per axis, the slice through the most organs.
    return fastcascade.segment(str(paths[0]), device="cpu").preview(out)


FIGURES = {"phantom": phantom_overlay, "case_a": case_a_overlay}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help=f"any of {', '.join(FIGURES)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.figures) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    DOCS.mkdir(exist_ok=True)
    for name in args.figures or FIGURES:
        print(FIGURES[name]())


if __name__ == "__main__":
    main()
