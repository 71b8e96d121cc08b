"""Regenerate the pictures under docs/.

    python benchmarks/make_figures.py            # all figures
    python benchmarks/make_figures.py phantom    # only docs/phantom_overlay.png

``phantom``: the synthetic phantom of seed 0 without contrast, with its labels
(``docs/phantom_overlay.png``). Needs matplotlib (``pip install fastcascade[viz]``).
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


FIGURES = {"phantom": phantom_overlay}


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
