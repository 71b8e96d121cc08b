"""The paper's evaluation: Dice per class, summary tables, stage 1 vs stage 2, and the
candidate region's recall and false-positive rate against the dilation radius r.

Label maps are integer arrays ``(x, y, z)`` (numpy or torch, any device) with class ids
``0 .. num_classes - 1`` (0 = background, see ``fastcascade.config.CLASS_NAMES``). Dice
values are fractions in [0, 1]; a Dice matrix is ``(cases, classes)`` with NaN where a
class is absent from both the prediction and the reference of a case.

The ``fastcascade evaluate`` command runs all of it over a CSV of label files, one case
a line, ``prediction,reference[,stage1]`` (see ``read_cases``):

    $ fastcascade evaluate --csv cases.csv --label-map case_a --out report.json
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .io.pathlist import read_path_rows

__all__ = [
    "candidate_recall_fpr",
    "compare_stages",
    "confusion_matrix",
    "dice",
    "dice_from_confusion",
    "evaluate_cases",
    "markdown_table",
    "read_cases",
    "report_json",
    "report_markdown",
    "summarize",
]

STATS = ("n", "mean", "std", "median", "min", "max")


def _as_label_tensor(labels, name: str) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(labels)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels


def confusion_matrix(pred, ref, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 voxel counts: ``[i, j]`` = predicted ``i``,
    reference ``j``.

    ``pred`` and ``ref`` are integer label maps of one shape (numpy or torch; torch stays
    on its device until the small matrix is copied back) with ids in
    ``0 .. num_classes - 1``; a ``bool`` map counts as classes 0/1.

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = _as_label_tensor(pred, "pred")
    r = _as_label_tensor(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(
            f"pred and ref must have one shape, got {tuple(p.shape)} and {tuple(r.shape)}"
        )
    if p.device != r.device:
        r = r.to(p.device)
    p = p.reshape(-1).long()
    r = r.reshape(-1).long()
    if p.numel():
        lo = min(int(p.min()), int(r.min()))
        hi = max(int(p.max()), int(r.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"class ids must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
                f"found values in {lo}..{hi}"
            )
    counts = torch.bincount(p * num_classes + r, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def dice(pred, ref, num_classes: int) -> np.ndarray:
    """Dice coefficient per class, ``2 |P ∩ R| / (|P| + |R|)``.

    ``pred``, ``ref``: integer label maps of one shape (numpy arrays or torch tensors,
    ids ``0 .. num_classes - 1``). Returns float64 ``(num_classes,)`` with background at
    index 0; NaN for a class absent from both maps, 0 for one present in only one.

    >>> dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4).round(3).tolist()
    [1.0, 0.667, 0.667, nan]
    """
    return dice_from_confusion(confusion_matrix(pred, ref, num_classes))


def dice_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Dice per class from a confusion matrix ``cm[pred, ref]`` (see :func:`dice`), e.g.
    one summed over slabs of a volume too large for one pass."""
    inter = np.diag(cm).astype(np.float64)
    total = cm.sum(axis=1) + cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / total, np.nan)


def summarize(dice_matrix, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-class statistics of a Dice matrix ``(cases, classes)``, ignoring NaN.

    Returns ``{class_name: {"n", "mean", "std", "median", "min", "max"}}`` in class order:
    ``n`` counts the cases where the class is defined (not NaN), ``std`` is the sample
    standard deviation (``ddof=1``; NaN below two cases); a class that is NaN in every case
    gets NaN statistics and ``n = 0``.

    >>> s = summarize(np.array([[1.0, 0.5], [1.0, 0.7], [1.0, np.nan]]), ["bg", "liver"])
    >>> s["liver"]["n"], round(s["liver"]["mean"], 3), round(s["liver"]["std"], 3)
    (2, 0.6, 0.141)
    """
    m = np.asarray(dice_matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"dice_matrix must be (cases, classes), got shape {m.shape}")
    names = list(class_names)
    if len(names) != m.shape[1]:
        raise ValueError(f"got {len(names)} class names for {m.shape[1]} classes (columns)")
    out: dict[str, dict[str, float]] = {}
    for name, column in zip(names, m.T, strict=True):
        values = column[~np.isnan(column)]
        n = int(values.size)
        if n == 0:
            stats = dict.fromkeys(STATS[1:], math.nan)
        else:
            stats = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if n > 1 else math.nan,
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
            }
        out[name] = {"n": n, **stats}
    return out


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(summary: dict[str, dict[str, float]], digits: int = 3) -> str:
    """A markdown table of ``summarize``'s output: one row per class, Dice as fractions.

    >>> print(markdown_table(summarize(np.array([[0.5], [0.7]]), ["liver"])))
    | class | n | mean ± std | median | min | max |
    |---|---:|---:|---:|---:|---:|
    | liver | 2 | 0.600 ± 0.141 | 0.600 | 0.500 | 0.700 |
    """
    lines = ["| class | n | mean ± std | median | min | max |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        mean = _fmt(s["mean"], digits)
        if not math.isnan(s["std"]):
            mean += f" ± {_fmt(s['std'], digits)}"
        cells = [_fmt(s[k], digits) for k in ("median", "min", "max")]
        lines.append(f"| {name} | {s['n']} | {mean} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_stages(dice_stage1, dice_stage2) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-value per class, stage 2 against stage 1.

    ``dice_stage1``, ``dice_stage2``: Dice matrices ``(cases, classes)`` of the same cases.
    Per class, the cases where either value is NaN are dropped, and so are tied pairs
    (zero differences, SciPy's ``zero_method="wilcox"``); with fewer than two differing
    pairs left the test is meaningless and the p-value is NaN. Otherwise it is
    ``scipy.stats.wilcoxon``'s (exact distribution for small samples without tied
    magnitudes, normal approximation otherwise). Returns float64 ``(classes,)``.

    >>> s1 = np.array([[0.80], [0.70], [0.60], [0.90], [0.50]])
    >>> compare_stages(s1, s1 + 0.01 * np.arange(1, 6)[:, None]).tolist()  # 2 / 2**5
    [0.0625]
    """
    from scipy.stats import wilcoxon

    a = np.asarray(dice_stage1, dtype=np.float64)
    b = np.asarray(dice_stage2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"dice_stage1 and dice_stage2 must be (cases, classes) of one shape, "
            f"got {a.shape} and {b.shape}"
        )
    p_values = np.full(a.shape[1], np.nan)
    for k in range(a.shape[1]):
        keep = ~(np.isnan(a[:, k]) | np.isnan(b[:, k]))
        diff = b[keep, k] - a[keep, k]
        diff = diff[diff != 0]
        if diff.size < 2:
            continue
        with warnings.catch_warnings():
            # scipy warns that small samples are approximate when magnitudes tie
            warnings.simplefilter("ignore", UserWarning)
            p_values[k] = wilcoxon(diff).pvalue
    return p_values


def candidate_recall_fpr(
    ref_labels,
    stage1_labels,
    radii: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[dict[str, float]]:
    """How well the candidate region C2 covers the organs, for each dilation radius r.

    ``C2 = dilate(stage1_labels > 0, r, spacing)`` (``fastcascade.ops.dilate``: a ball of
    r voxels of the finest axis; ``spacing`` in mm only shapes the ball on anisotropic
    grids). ``ref_labels``, ``stage1_labels``: integer label maps ``(x, y, z)`` on one grid
    (numpy or torch). For each r in ``radii`` (voxels) returns a dict with

    - ``radius``: r;
    - ``recall``: fraction of reference foreground voxels inside C2 (NaN without any);
    - ``fpr``: fraction of reference background voxels inside C2 (NaN without any);
    - ``candidate_fraction``: fraction of the volume inside C2 (what stage 2 must process).

    >>> ref = np.zeros((7, 1, 1), int); ref[2:5] = 1
    >>> s1 = np.zeros((7, 1, 1), int); s1[3] = 1
    >>> [(d["radius"], d["recall"], d["fpr"]) for d in candidate_recall_fpr(ref, s1, [0, 2])]
    [(0, 0.3333333333333333, 0.0), (2, 1.0, 0.5)]
    """
    from .ops.dilate import dilate  # lazily: evaluation needs no kernels at import

    ref = _as_label_tensor(ref_labels, "ref_labels")
    s1 = _as_label_tensor(stage1_labels, "stage1_labels")
    if ref.dim() != 3 or ref.shape != s1.shape:
        raise ValueError(
            f"ref_labels and stage1_labels must be (x, y, z) of one shape, "
            f"got {tuple(ref.shape)} and {tuple(s1.shape)}"
        )
    ref_fg = (ref != 0).to(s1.device)
    seed = s1 != 0
    n_fg = int(ref_fg.sum())
    n_bg = ref_fg.numel() - n_fg
    results = []
    for r in radii:
        c2 = dilate(seed, r, spacing)
        hit_fg = int((c2 & ref_fg).sum())
        hit_bg = int(c2.sum()) - hit_fg
        results.append(
            {
                "radius": r,
                "recall": hit_fg / n_fg if n_fg else math.nan,
                "fpr": hit_bg / n_bg if n_bg else math.nan,
                "candidate_fraction": (hit_fg + hit_bg) / c2.numel(),
            }
        )
    return results


# --------------------------------------------------------------------------- label files

CSV_COLUMNS = ("prediction", "reference", "stage1")


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


def _check_shape(a: np.ndarray, a_path: Path, b: np.ndarray, b_path: Path) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{b_path} has shape {b.shape} but {a_path} has {a.shape}; "
            "expected label maps on one grid"
        )


# --------------------------------------------------------------------------- report


def _nan_stat(fn, values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(fn(kept)) if kept else math.nan


def evaluate_cases(
    cases: Sequence[tuple[Path, Path, Path | None]],
    label_map: Mapping[int, int] | None = None,
    radii: Sequence[int] = (0, 1, 2, 3, 4, 5),
) -> dict:
    """Dice tables, stage 1 vs stage 2 and C2 recall/FPR for label files (``read_cases``).

    Predictions and stage-1 maps hold class ids; the reference's ids go through
    ``label_map`` (``{file id: class id}``, others → 0) when given. Class names come from
    the JSON beside the first prediction (``seg.nii.gz`` → ``seg.json``), else
    ``fastcascade.config.CLASS_NAMES``; every case must carry the same ones. Tables cover
    the organs (every class but background, id 0). With stage-1 maps, the candidate
    region C2 is their foreground dilated by r voxels of the finest axis for each r in
    ``radii``, on the prediction's grid with its header's voxel size (mm).

    Returns a JSON-ready dict (NaN where undefined): ``class_names``; ``cases`` (paths,
    ``spacing``, ``dice`` and ``dice_stage1`` per organ, ``candidates`` per r);
    ``dice`` and ``dice_stage1`` (``summarize``'s statistics per organ); ``wilcoxon_p``
    per organ (``compare_stages``); ``candidates``: per r the mean and minimum recall,
    mean false-positive rate and mean candidate fraction over the cases. The stage-1
    entries are ``None`` without stage-1 maps.

    >>> report = evaluate_cases(read_cases("cases.csv"))  # doctest: +SKIP
    >>> report["dice"]["liver"]["mean"]  # doctest: +SKIP
    0.95
    """
    from .config import CLASS_NAMES
    from .io.nifti import load_nifti, map_labels, read_label_names, read_labels

    if not cases:
        raise ValueError("no cases to evaluate; expected (prediction, reference, stage1) paths")
    names = None
    rows, dice2, dice1 = [], [], []
    for pred_path, ref_path, s1_path in cases:
        case_names = read_label_names(pred_path) or CLASS_NAMES
        if names is None:
            names = tuple(case_names)
        elif tuple(case_names) != names:
            raise ValueError(
                f"{pred_path}: classes {list(case_names)} differ from the first case's "
                f"{list(names)}"
            )
        k = len(names)
        pred = read_labels(pred_path)
        _check_ids(pred, k, pred_path)
        ref = read_labels(ref_path)
        _check_shape(pred, pred_path, ref, ref_path)
        if label_map is not None:
            ref = map_labels(ref, label_map)
        _check_ids(ref, k, ref_path, "; map its ids with --label-map" if label_map is None else "")
        row = {
            "prediction": str(pred_path),
            "reference": str(ref_path),
            "stage1": None if s1_path is None else str(s1_path),
            "spacing": [float(z) for z in load_nifti(pred_path).header.get_zooms()[:3]],
        }
        d2 = dice(pred, ref, k)
        dice2.append(d2)
        row["dice"] = dict(zip(names[1:], d2[1:].tolist(), strict=True))
        if s1_path is not None:
            s1 = read_labels(s1_path)
            _check_shape(pred, pred_path, s1, s1_path)
            _check_ids(s1, k, s1_path)
            d1 = dice(s1, ref, k)
            dice1.append(d1)
            row["dice_stage1"] = dict(zip(names[1:], d1[1:].tolist(), strict=True))
            row["candidates"] = candidate_recall_fpr(ref, s1, radii, row["spacing"])
        rows.append(row)

    organs = names[1:]
    report = {
        "class_names": list(names),
        "cases": rows,
        "dice": summarize(np.array(dice2)[:, 1:], organs),
        "dice_stage1": None,
        "wilcoxon_p": None,
        "candidates": None,
    }
    if dice1:
        report["dice_stage1"] = summarize(np.array(dice1)[:, 1:], organs)
        p = compare_stages(np.array(dice1), np.array(dice2))[1:]
        report["wilcoxon_p"] = dict(zip(organs, p.tolist(), strict=True))
        report["candidates"] = [
            {
                "radius": r,
                "recall_mean": _nan_stat(np.mean, [c["candidates"][i]["recall"] for c in rows]),
                "recall_min": _nan_stat(np.min, [c["candidates"][i]["recall"] for c in rows]),
                "fpr_mean": _nan_stat(np.mean, [c["candidates"][i]["fpr"] for c in rows]),
                "candidate_fraction_mean": _nan_stat(
                    np.mean, [c["candidates"][i]["candidate_fraction"] for c in rows]
                ),
            }
            for i, r in enumerate(radii)
        ]
    return report


def report_markdown(report: dict, digits: int = 3) -> str:
    """``evaluate_cases``'s report as markdown: the Dice table(s), then, with stage-1
    maps, the Wilcoxon p-values per organ and C2's recall / false-positive rate per r."""
    n = len(report["cases"])
    parts = [f"Dice, prediction ({n} cases)\n\n" + markdown_table(report["dice"], digits)]
    if report["dice_stage1"] is not None:
        parts.append("Dice, stage 1\n\n" + markdown_table(report["dice_stage1"], digits))
        lines = [
            "| class | stage 1 mean | prediction mean | p |",
            "|---|---:|---:|---:|",
        ]
        for name, p in report["wilcoxon_p"].items():
            s1, s2 = report["dice_stage1"][name]["mean"], report["dice"][name]["mean"]
            lines.append(f"| {name} | {_fmt(s1, digits)} | {_fmt(s2, digits)} | {_fmt(p, 4)} |")
        parts.append("Wilcoxon signed-rank test, stage 1 vs prediction\n\n" + "\n".join(lines))
        lines = [
            "| r | recall mean | recall min | FPR mean | C2 fraction |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in report["candidates"]:
            cells = [
                _fmt(c[k], 4)
                for k in ("recall_mean", "recall_min", "fpr_mean", "candidate_fraction_mean")
            ]
            lines.append(f"| {c['radius']} | " + " | ".join(cells) + " |")
        parts.append(
            "Candidate region C2 (stage-1 foreground dilated by r voxels)\n\n" + "\n".join(lines)
        )
    return "\n\n".join(parts)


def report_json(report: dict) -> str:
    """A report (``evaluate_cases``'s, or one with more keys) as JSON text, NaN as ``null``.

    >>> report_json({"dice": float("nan")})
    '{\n "dice": null\n}\n'
    """
    return json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n"


def _jsonable(value):
    """NaN → ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
