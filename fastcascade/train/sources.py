"""The training data of a run: NIfTI (CT, labels) pairs listed in a CSV, or phantoms.

A CSV lists one training case per line, ``ct,labels`` (paths relative to the CSV's
folder or absolute, see ``io/pathlist.py``); a first line ``ct,labels`` is read as a
header.

>>> source = training_source((3.0, 3.0, 3.0), seed=0)  # phantoms  # doctest: +SKIP
>>> source = training_source((3.0, 3.0, 3.0), 0, csv="pairs.csv")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io.pathlist import read_path_rows


def read_pairs(csv_path: str | Path) -> list[tuple[Path, Path]]:
    """``(ct, labels)`` paths from a two-column CSV (see the module docstring)."""
    pairs = [tuple(paths) for _, paths in read_path_rows(csv_path, ("ct", "labels"))]
    if not pairs:
        raise ValueError(f"{csv_path} lists no (ct, labels) pairs")
    return pairs


def training_source(
    spacing: Sequence[float],
    seed: int,
    *,
    csv: str | Path | None = None,
    label_map: Mapping[int, int] | None = None,
    pool_size: int = 4,
    refresh_every: int = 8,
    contrasts: Sequence[str] = ("none", "portal_venous"),
):
    """The source a training run draws from, on the working grid ``spacing`` (mm).

    With ``csv``: a ``NiftiSource`` of the pairs it lists, their label ids taken through
    ``label_map`` (``{file id: class id}``, see ``presets.read_label_map``). Without: a
    ``PhantomSource`` seeded with ``seed`` that keeps ``pool_size`` phantoms, draws a new
    one every ``refresh_every`` draws and mixes the ``contrasts`` phases.
    """
    from .dataset import NiftiSource, PhantomSource

    if csv is not None:
        return NiftiSource(read_pairs(csv), label_map, spacing, seed)
    return PhantomSource(
        spacing,
        seed=seed,
        pool_size=pool_size,
        refresh_every=refresh_every,
        contrasts=tuple(contrasts),
    )
