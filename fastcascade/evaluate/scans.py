"""Evaluating a model on CT scans as the paper does: ``ct,reference`` a line.

For every case the cascade runs once up to its candidate region and twice after it:

1. the scan onto the model's working grid (``Scan.working_grid``), C1, stage 1 and C2
   (``cascade.candidate_region``), once;
2. stage 2 over that C2 on non-overlapping tiles, and again on overlapping ones
   (``cascade.second_stage`` with ``overlap`` off and on), sharing stage 1;
3. each stage's labels back onto the scan's own grid (``WorkingGrid.labels_to_input``),
   then onto the reference's (``geometry.align_labels``), and scored there;
4. the candidate region's recall and false-positive rate for each r, on the **working
   grid**: stage 1's labels dilated by r voxels of that grid (as the cascade's own C2 is
   at the model's r), against the reference brought there by nearest neighbour
   (``WorkingGrid.labels_from_input``).

Before any case runs, every case's CT and reference headers are read and their grids
compared (``geometry.check_grids``), and every reference's ids are checked against the
model's classes, so a bad case fails first and names itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io.pathlist import read_path_rows
from .geometry import Grid, align_labels, check_grids
from .metrics import candidate_recall_fpr, reference_coverage, scored_dice
from .predictions import DEFAULT_RADII, _organs, _tolerances, read_reference
from .report import summary_report

__all__ = ["COMPARISONS", "SCAN_COLUMNS", "STAGES", "ScanCase", "evaluate_model", "read_scan_cases"]

SCAN_COLUMNS = ("ct", "reference")

#: The stages scored, in table order: key → label.
STAGES = {"stage1": "stage 1", "stage2": "stage 2", "stage2_overlap": "stage 2 with overlap"}

#: ``(before, after)`` pairs of stages tested against each other.
COMPARISONS = (("stage1", "stage2"), ("stage1", "stage2_overlap"), ("stage2", "stage2_overlap"))


@dataclass(frozen=True)
class ScanCase:
    """One line of a scan CSV: the CT, its reference labels and where the line is
    (``cases.csv:3``), for messages."""

    ct: Path
    reference: Path
    where: str


def read_scan_cases(csv_path: str | Path) -> list[ScanCase]:
    """The cases of a CSV of ``ct,reference`` lines (NIfTI paths relative to the CSV's
    folder or absolute; ``#`` comments, blank lines and a header line ``ct,reference``
    skipped). Every file must exist (``FileNotFoundError`` naming the line).

    >>> read_scan_cases("cases.csv")[0].where  # doctest: +SKIP
    'cases.csv:2'
    """
    cases = []
    for line, (ct, ref) in read_path_rows(csv_path, SCAN_COLUMNS):
        for p in (ct, ref):
            if not p.is_file():
                raise FileNotFoundError(f"{csv_path}:{line}: {p} does not exist")
        cases.append(ScanCase(ct, ref, f"{csv_path}:{line}"))
    if not cases:
        raise ValueError(f"{csv_path} lists no cases; expected 'ct,reference' lines")
    return cases


def _check_case(
    case: ScanCase, label_map: Mapping[int, int] | None, num_classes: int, resample: bool
) -> None:
    """The case's grids and reference ids, before any work; errors name the case."""
    try:
        ct, ref = Grid.of_file(case.ct), Grid.of_file(case.reference)
        check_grids(str(case.ct), ct, str(case.reference), ref, resample=resample)
        read_reference(case.reference, label_map, num_classes)
    except ValueError as e:
        raise ValueError(f"case {case.where}: {e}") from None


def evaluate_scan(
    predictor,
    case: ScanCase,
    label_map: Mapping[int, int] | None = None,
    radii: Sequence[int] = DEFAULT_RADII,
    *,
    resample: bool = False,
) -> dict:
    """One case through the cascade (see the module's steps) and scored.

    ``predictor``: a :class:`fastcascade.Predictor` (its device and options are used;
    ``overlap`` is set per stage-2 run). Returns the case's row: paths, ``alignment``,
    ``dice`` (``{stage: {organ: Dice}}``, NaN where the reference lacks the organ),
    ``absent``, ``cut``, ``predicted_where_absent``, ``unmapped_reference_ids``,
    ``candidates`` (per r), ``c1_fraction``, ``c2_fraction``, ``tiles``, ``seconds``;
    and, for the report, ``_dice`` (``{stage: (classes,) array}``), ``_present`` and
    ``_cut`` (bool ``(classes,)``).
    """
    from ..cascade import candidate_region, second_stage
    from ..io.scan import load_scan

    t0 = time.perf_counter()
    config = predictor.config
    names = config.class_names
    k = config.num_classes
    options = predictor.options.replace(probabilities=False)
    device = predictor.device

    ref, unmapped = read_reference(case.reference, label_map, k)
    ref_grid = Grid.of_file(case.reference)
    scan = load_scan(case.ct)
    ct_grid = Grid(scan.input_shape, scan.input_affine)
    grid = scan.working_grid(config.spacing)
    image = grid.image(device)
    dtype = options.autocast_dtype_for(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        c1, first, c2 = candidate_region(image, predictor.stage1, config, options)
        outputs = {
            "stage1": first,
            "stage2": second_stage(image, predictor.stage2, c2, config,
                                   options.replace(overlap=False)),
            "stage2_overlap": second_stage(image, predictor.stage2, c2, config,
                                           options.replace(overlap=True)),
        }  # fmt: skip

    ref_on_ct, how_ref = align_labels(ref, ref_grid, ct_grid, resample=resample,
                                      names=(str(case.reference), str(case.ct)))  # fmt: skip
    ref_working = grid.labels_from_input(torch.from_numpy(ref_on_ct).to(device))
    candidates = candidate_recall_fpr(ref_working, first.labels, radii, config.spacing)

    has, reaches = reference_coverage(ref, k)
    absent = _organs(~has, names)
    row = {
        "ct": str(case.ct),
        "reference": str(case.reference),
        "line": case.where,
        "alignment": {"reference_to_ct": how_ref},
        "dice": {},
        "absent": absent,
        "cut": _organs(reaches, names),
        "predicted_where_absent": {},
        "unmapped_reference_ids": unmapped,
        "candidates": candidates,
        "c1_fraction": float(c1.float().mean()),
        "c2_fraction": float(c2.float().mean()),
        "tiles": {key: [out.tiles_computed, out.tiles_total] for key, out in outputs.items()},
        "_dice": {},
        "_present": has,
        "_cut": reaches,
    }
    for key, out in outputs.items():
        on_ct = grid.labels_to_input(out.labels).cpu().numpy()
        on_ref, how = align_labels(on_ct, ct_grid, ref_grid, resample=resample,
                                   names=(f"{case.ct} ({key})", str(case.reference)))  # fmt: skip
        row["alignment"][f"{key}_to_reference"] = how
        d, voxels = scored_dice(on_ref, ref, k)
        row["_dice"][key] = d
        row["dice"][key] = dict(zip(names[1:], d[1:].tolist(), strict=True))
        row["predicted_where_absent"][key] = {o: int(voxels[names.index(o)]) for o in absent}
    row["seconds"] = time.perf_counter() - t0
    return row


def evaluate_model(
    predictor,
    cases: Sequence[ScanCase],
    label_map: Mapping[int, int] | None = None,
    radii: Sequence[int] = DEFAULT_RADII,
    *,
    resample: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The paper's evaluation of ``predictor`` on ``cases`` (``read_scan_cases``).

    ``label_map``: reference ids onto the model's classes (``read_reference``);
    ``radii``: the r (voxels of the working grid) of the candidate table; ``resample``:
    compare grids that differ beyond orientation by nearest neighbour; ``log``: called
    with a line per case.

    Returns ``summary_report``'s dict for the stages ``stage1``, ``stage2`` and
    ``stage2_overlap`` with the ``COMPARISONS``, plus ``cases`` (``evaluate_scan``'s
    rows), ``geometry`` (tolerances), ``working_spacing`` (mm), ``model_radius`` (the
    model's r) and ``device``.

    >>> from fastcascade import load_model
    >>> report = evaluate_model(load_model(), read_scan_cases("cases.csv"))  # doctest: +SKIP
    >>> report["stages"]["stage2"]["dice"]["liver"]["mean"]  # doctest: +SKIP
    0.8
    """
    if not cases:
        raise ValueError("no cases to evaluate; expected ct,reference pairs")
    config = predictor.config
    for case in cases:
        _check_case(case, label_map, config.num_classes, resample)
    rows = []
    for i, case in enumerate(cases, start=1):
        rows.append(evaluate_scan(predictor, case, label_map, radii, resample=resample))
        if log is not None:
            log(f"case {i}/{len(cases)} {case.ct}: {rows[-1]['seconds']:.1f} s")
    spacing = " x ".join(f"{s:g}" for s in config.spacing)
    report = summary_report(
        config.class_names,
        {key: (label, np.array([r["_dice"][key] for r in rows])) for key, label in STAGES.items()},
        np.array([r.pop("_present") for r in rows]),
        np.array([r.pop("_cut") for r in rows]),
        comparisons=COMPARISONS,
        candidates=[r["candidates"] for r in rows],
        candidates_grid=f"the model's working grid ({spacing} mm; r in its voxels, the "
        f"model's own r = {config.radius}), the reference brought there by nearest neighbour",
    )
    for r in rows:
        del r["_dice"]
    report.update(
        {
            "cases": rows,
            "geometry": _tolerances(resample),
            "working_spacing": list(config.spacing),
            "model_radius": config.radius,
            "device": str(predictor.device),
        }
    )
    return report
