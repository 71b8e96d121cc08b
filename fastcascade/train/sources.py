"""The training data of a run: phantoms, real cases, and images made from real cases.

A CSV lists one training case per line, ``ct,labels`` or ``ct,labels,names`` (paths
relative to the CSV's folder or absolute, see ``io/pathlist.py``; ``names``: the
structures of the full label map, ``io/structures.py``); a first line naming the columns
is read as a header.

A *mix* (``parse_mix("phantom=1,synth=2,repaint=1,real=1")``) weighs the kinds of source
a run draws from (``SOURCE_KINDS``): ``phantom`` (``dataset.PhantomSource``), ``real``
(the cases as they are, ``dataset.NiftiSource``), ``synth`` (images synthesized from
their label maps, ``anatomy.SynthSource``) and ``repaint`` (the cases re-painted to other
contrast phases, ``anatomy.RepaintSource``). ``mixed_source`` reads the cases once,
checks them, and builds a ``mixed.MixedSource`` of those kinds; every error about a case
names it and comes before any training.

>>> source = training_source((3.0, 3.0, 3.0), seed=0)  # phantoms  # doctest: +SKIP
>>> source = training_source((3.0, 3.0, 3.0), 0, csv="pairs.csv")  # doctest: +SKIP
>>> cases = read_cases("cases.csv")  # doctest: +SKIP
>>> source = mixed_source(parse_mix("synth=2,real=1"), (3.0,) * 3, 0, cases=cases,
...                       label_map=CASE_A_TO_CLASSES, num_classes=11)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io.pathlist import read_path_rows

#: The kinds of source a mix may weigh, in the order their seeds are derived.
SOURCE_KINDS = ("phantom", "real", "synth", "repaint")

#: The kinds that draw on real cases.
CASE_KINDS = ("real", "synth", "repaint")


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


def read_cases(csv_path: str | Path, names: str | Path | None = None) -> list:
    """``anatomy.CaseFiles`` from a CSV of ``ct,labels[,names]`` rows (module docstring);
    ``names`` gives the structure names of rows without their own. Each case is named
    by its CT's folder and file (``case_a/example_ct.nii.gz``)."""
    from .anatomy import CaseFiles

    rows = read_path_rows(csv_path, ("ct", "labels", "names"), optional=1)
    if not rows:
        raise ValueError(f"{csv_path} lists no (ct, labels) cases")
    default = None if names is None else Path(names)
    return [CaseFiles(p[0], p[1], p[2] if len(p) > 2 else default) for _, p in rows]


def parse_mix(text: str) -> dict[str, float]:
    """``"phantom=1,synth=2"`` -> ``{"phantom": 1.0, "synth": 2.0}``: kinds of
    ``SOURCE_KINDS`` with weights > 0 (a kind alone weighs 1); ``ValueError`` otherwise.

    >>> parse_mix("real,synth=2")
    {'real': 1.0, 'synth': 2.0}
    """
    mix: dict[str, float] = {}
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        kind, _, weight = item.partition("=")
        kind = kind.strip()
        if kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source {kind!r} in {text!r}; expected {SOURCE_KINDS}")
        if kind in mix:
            raise ValueError(f"source {kind!r} is named twice in {text!r}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            w = float("nan")
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"source {kind!r} needs a weight > 0, got {weight!r} in {text!r}")
        mix[kind] = w
    if not mix:
        raise ValueError(f"no source named in {text!r}; expected e.g. 'phantom=1,synth=2'")
    return mix


def mixed_source(
    mix: Mapping[str, float],
    spacing: Sequence[float],
    seed: int,
    *,
    cases: Sequence = (),
    label_map: Mapping[int, int] | None = None,
    num_classes: int | None = None,
    device="cpu",
    pool_size: int = 4,
    refresh_every: int = 8,
    contrasts: Sequence[str] = ("none", "portal_venous"),
    phases: Sequence[str] | None = None,
    synth_params=None,
):
    """A ``MixedSource`` of the kinds in ``mix`` (kind -> weight, ``parse_mix``) on the
    working grid ``spacing`` (mm).

    ``cases``: ``anatomy.CaseFiles`` (``read_cases``) for the real, synth and repaint
    kinds, read once here onto ``device`` and shared by them; ``label_map``: their
    structure ids onto class ids (``None``: ids kept); ``num_classes``: the model's
    class count, every mapped id is checked against it. ``pool_size``,
    ``refresh_every``, ``contrasts``: the phantoms'; ``phases``: the repaint kind's
    (default: all of ``repaint.PHASES``); ``synth_params``: ``synth.SynthParams``.

    Seeds: the phantom and real kinds use ``seed`` itself (the volumes ``training_source``
    would give); synth, repaint and the mix's own pick derive theirs from ``seed``.

    ``ValueError`` (naming the case where there is one) before anything is trained: a
    case kind without cases, a case whose label map is not on its CT's grid, a label id
    its names do not name, ids that map onto no class of the model, synth or repaint on
    a case without names or without a structure to work on.
    """
    from .anatomy import RepaintSource, SynthSource, check_classes, load_case
    from .dataset import NiftiSource, PhantomSource
    from .mixed import MixedSource
    from .repaint import PHASES

    mix = dict(mix)
    unknown = [k for k in mix if k not in SOURCE_KINDS]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; expected some of {SOURCE_KINDS}")
    needs = [k for k in mix if k in CASE_KINDS]
    if needs and not cases:
        raise ValueError(f"sources {needs} need real cases (a CSV of ct,labels[,names])")
    loaded = [load_case(c, spacing, device) for c in cases] if needs else []
    if loaded and num_classes is not None:
        check_classes(loaded, label_map, num_classes)
    sources = {}
    for kind in SOURCE_KINDS:
        if kind not in mix:
            continue
        own = _seed(seed, SOURCE_KINDS.index(kind))
        if kind == "phantom":
            sources[kind] = PhantomSource(
                spacing,
                seed=seed,
                pool_size=pool_size,
                refresh_every=refresh_every,
                contrasts=tuple(contrasts),
            )
        elif kind == "real":
            sources[kind] = NiftiSource.from_cases(loaded, label_map, seed)
        elif kind == "synth":
            sources[kind] = SynthSource(loaded, label_map, own, params=synth_params)
        else:
            sources[kind] = RepaintSource(
                loaded, label_map, own, phases=PHASES if phases is None else tuple(phases)
            )
    return MixedSource(sources, {k: mix[k] for k in sources}, _seed(seed, len(SOURCE_KINDS)))


def _seed(seed: int, stream: int) -> int:
    # Streams 100 + k: apart from the trainer's own derived streams of the same seed.
    return int(np.random.SeedSequence([int(seed), 100 + stream]).generate_state(1)[0])
