"""Evaluating given label files: ``prediction,reference[,stage1]`` a line.

Each prediction (and stage-1 map) is brought onto its reference's grid first
(``geometry.py``: the same grid, the same up to orientation, or resampled on request)
and scored there.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io.pathlist import read_path_rows
from .geometry import LINEAR_RTOL, TRANSLATION_ATOL_MM, Grid, align_labels, check_grids
from .metrics import candidate_recall_fpr, compare_stages, reference_coverage, scored_dice
from .report import summary_report

__all__ = ["CSV_COLUMNS", "DEFAULT_RADII", "evaluate_cases", "read_cases", "read_reference"]

CSV_COLUMNS = ("prediction", "reference", "stage1")

#: The radii r (voxels) of the candidate table unless asked otherwise: the paper's Fig. 6.
DEFAULT_RADII = (0, 1, 2, 3, 4, 5, 6)


def read_cases(csv_path: str | Path) -> list[tuple[Path, Path, Path | None]]:
    """``(prediction, reference, stage1 or None)`` label-file paths from a CSV.

    One case a line, ``prediction,reference[,stage1]``; paths relative to the CSV's
    folder or absolute; blank lines and lines starting with ``#`` are skipped, and a first
    line naming the columns (``prediction,reference[,stage1]``) is a header. Either every
    case has a stage-1 column or none does. Every listed file must exist
    (``FileNotFoundError`` naming the CSV line).

    >>> read_cases("cases.csv")  # doctest: +SKIP
    [(PosixPath('pred/a.nii.gz'), PosixPath('ref/a.nii.gz'), None)]
    """
    cases = []
    for line, paths in read_path_rows(csv_path, CSV_COLUMNS, optional=1):
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{csv_path}:{line}: {p} does not exist")
        cases.append((paths[0], paths[1], paths[2] if len(paths) == 3 else None))
    if not cases:
        raise ValueError(f"{csv_path} lists no cases; expected 'prediction,reference[,stage1]'")
    if len({stage1 is None for *_, stage1 in cases}) > 1:
        raise ValueError(f"{csv_path}: give the stage1 column for every case or for none")
    return cases


def _check_ids(labels: np.ndarray, num_classes: int, path: Path, hint: str = "") -> None:
    hi = int(labels.max()) if labels.size else 0
    if hi >= num_classes:
        raise ValueError(
            f"{path} holds class id {hi}; expected ids 0..{num_classes - 1} "
            f"for {num_classes} classes{hint}"
        )


def read_reference(
    path: Path, label_map: Mapping[int, int] | None, num_classes: int
) -> tuple[np.ndarray, list[int]]:
    """A reference label file as class ids: ``(labels, unmapped ids)``.

    With ``label_map`` (``{file id: class id}``) every id it does not name becomes
    background (0) and is listed in ``unmapped ids``; a reference whose foreground holds
    none of the map's ids is surely read with the wrong map and gives a ``UserWarning``.
    Without a map the ids are used as they are. Ids beyond ``num_classes - 1`` after
    mapping are a ``ValueError``. Returns uint8 labels (uint16 beyond 256 classes).
    """
    from ..io.nifti import map_labels, read_labels

    ref = read_labels(path)
    unmapped: list[int] = []
    if label_map is not None:
        ids = np.unique(ref)
        unmapped = [int(i) for i in ids if i != 0 and int(i) not in label_map]
        if len(ids[ids != 0]) and len(unmapped) == len(ids[ids != 0]):
            warnings.warn(
                f"{path}: none of its ids {ids[ids != 0].tolist()[:10]} is in the label map "
                f"{sorted(label_map)}; every organ reads as absent (wrong --label-map?)",
                stacklevel=2,
            )
        ref = map_labels(ref, label_map)
    _check_ids(
        ref, num_classes, path, "; map its ids with --label-map" if label_map is None else ""
    )
    return ref.astype(np.uint8 if num_classes <= 256 else np.uint16), unmapped


def _organs(mask: np.ndarray, names: Sequence[str]) -> list[str]:
    return [n for n, m in zip(names[1:], mask[1:], strict=True) if m]


def evaluate_cases(
    cases: Sequence[tuple[Path, Path, Path | None]],
    label_map: Mapping[int, int] | None = None,
    radii: Sequence[int] = DEFAULT_RADII,
    *,
    resample: bool = False,
) -> dict:
    """Dice tables, stage 1 vs the prediction and C2 recall/FPR for label files
    (``read_cases``).

    Predictions and stage-1 maps hold class ids (an id beyond the classes is a
    ``ValueError``); the reference's go through ``label_map`` (``read_reference``).
    Class names come from the JSON beside the first prediction (``seg.nii.gz`` →
    ``seg.json``), else ``fastcascade.config.CLASS_NAMES``; every case must carry the
    same ones. Before any label is read, every file's grid is checked against its
    reference's (``geometry.check_grids``; ``resample`` allows any grids). Scoring is on
    the reference's grid: an organ the reference lacks is not scored in that case, and
    one reaching a face of the reference is counted as cut (``metrics``). With stage-1
    maps, the candidate region C2 is their foreground dilated by r voxels of the finest
    axis of the reference's grid, for each r in ``radii``.

    Returns ``summary_report``'s dict with stages ``prediction`` and ``stage1`` and one
    comparison, plus ``cases`` (per case: the paths, ``spacing`` (mm, the reference
    grid's), ``alignment`` of each file, ``dice`` and ``dice_stage1`` per organ,
    ``absent`` and ``cut`` organs, ``predicted_where_absent`` voxel counts,
    ``unmapped_reference_ids``, ``candidates`` per r), ``geometry`` (the tolerances),
    and, as before, ``dice`` and ``dice_stage1`` (the stages' statistics per organ),
    ``wilcoxon_p`` per organ; stage-1 entries are ``None`` without stage-1 maps.

    >>> report = evaluate_cases(read_cases("cases.csv"))  # doctest: +SKIP
    >>> report["dice"]["liver"]["mean"]  # doctest: +SKIP
    0.95
    """
    from ..config import CLASS_NAMES
    from ..io.nifti import read_label_names, read_labels

    if not cases:
        raise ValueError("no cases to evaluate; expected (prediction, reference, stage1) paths")
    names = None
    grids = []
    for pred_path, ref_path, s1_path in cases:  # every name and grid before any voxel
        case_names = read_label_names(pred_path) or CLASS_NAMES
        if names is None:
            names = tuple(case_names)
        elif tuple(case_names) != names:
            raise ValueError(
                f"{pred_path}: classes {list(case_names)} differ from the first case's "
                f"{list(names)}"
            )
        g = {"prediction": Grid.of_file(pred_path), "reference": Grid.of_file(ref_path)}
        check_grids(str(pred_path), g["prediction"], str(ref_path), g["reference"],
                    resample=resample)  # fmt: skip
        if s1_path is not None:
            g["stage1"] = Grid.of_file(s1_path)
            check_grids(str(pred_path), g["prediction"], str(s1_path), g["stage1"],
                        resample=resample)  # fmt: skip
        grids.append(g)

    k = len(names)
    rows, dice2, dice1, present, cut, candidates = [], [], [], [], [], []
    for (pred_path, ref_path, s1_path), g in zip(cases, grids, strict=True):
        pred = read_labels(pred_path)
        _check_ids(pred, k, pred_path)
        ref, unmapped = read_reference(ref_path, label_map, k)
        on_ref, how = align_labels(pred, g["prediction"], g["reference"], resample=resample,
                                   names=(str(pred_path), str(ref_path)))  # fmt: skip
        has, reaches = reference_coverage(ref, k)
        present.append(has)
        cut.append(reaches)
        d2, voxels2 = scored_dice(on_ref, ref, k)
        dice2.append(d2)
        row = {
            "prediction": str(pred_path),
            "reference": str(ref_path),
            "stage1": None if s1_path is None else str(s1_path),
            "spacing": list(g["reference"].voxel_size),
            "alignment": {"prediction": how},
            "dice": dict(zip(names[1:], d2[1:].tolist(), strict=True)),
            "absent": _organs(~has, names),
            "cut": _organs(reaches, names),
            "predicted_where_absent": {
                "prediction": {o: int(voxels2[names.index(o)]) for o in _organs(~has, names)}
            },
            "unmapped_reference_ids": unmapped,
        }
        if s1_path is not None:
            s1 = read_labels(s1_path)
            _check_ids(s1, k, s1_path)
            s1, how = align_labels(s1, g["stage1"], g["reference"], resample=resample,
                                   names=(str(s1_path), str(ref_path)))  # fmt: skip
            row["alignment"]["stage1"] = how
            d1, voxels1 = scored_dice(s1, ref, k)
            dice1.append(d1)
            row["dice_stage1"] = dict(zip(names[1:], d1[1:].tolist(), strict=True))
            row["predicted_where_absent"]["stage1"] = {
                o: int(voxels1[names.index(o)]) for o in _organs(~has, names)
            }
            row["candidates"] = candidate_recall_fpr(ref, s1, radii, row["spacing"])
            candidates.append(row["candidates"])
        rows.append(row)

    stages = {"prediction": ("prediction", np.array(dice2))}
    if dice1:
        stages["stage1"] = ("stage 1", np.array(dice1))
    report = summary_report(
        names,
        stages,
        np.array(present),
        np.array(cut),
        comparisons=[("stage1", "prediction")] if dice1 else [],
        candidates=candidates or None,
        candidates_grid="each reference's grid (r in voxels of its finest axis)",
    )
    organs = names[1:]
    report.update(
        {
            "cases": rows,
            "geometry": _tolerances(resample),
            "dice": report["stages"]["prediction"]["dice"],
            "dice_stage1": report["stages"]["stage1"]["dice"] if dice1 else None,
            "wilcoxon_p": None,
        }
    )
    if dice1:
        p = compare_stages(np.array(dice1), np.array(dice2))[1:]
        report["wilcoxon_p"] = dict(zip(organs, p.tolist(), strict=True))
    return report


def _tolerances(resample: bool) -> dict:
    return {
        "translation_atol_mm": TRANSLATION_ATOL_MM,
        "linear_rtol": LINEAR_RTOL,
        "resample": resample,
        "rule": "same grid, or the same up to flips and axis order (reoriented exactly); "
        "otherwise refused, or resampled by nearest neighbour when resample is set",
    }
