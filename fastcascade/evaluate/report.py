"""Evaluation reports: per-organ tables over the cases, as a dict, JSON, markdown and a
folder of files.

:func:`summary_report` turns per-case Dice matrices of named stages into the report's
tables; :func:`report_markdown` and :func:`report_json` render it; :func:`write_report`
writes ``report.json``, ``report.md`` and ``candidates.png`` into a folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .metrics import compare_stages, summarize

__all__ = [
    "LOW_POWER_CASES",
    "REPORT_FILES",
    "markdown_table",
    "report_json",
    "report_markdown",
    "summary_report",
    "write_report",
]

#: Below this many scored cases the Wilcoxon test is reported as having no power.
LOW_POWER_CASES = 10

#: What :func:`write_report` writes into its folder.
REPORT_FILES = ("report.json", "report.md", "candidates.png")


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


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


def _nan_stat(fn, values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(fn(kept)) if kept else math.nan


def _aggregate_candidates(per_case: Sequence[Sequence[dict]]) -> list[dict]:
    """Per r: mean and minimum recall, mean and maximum FPR, mean C2 fraction."""
    out = []
    for i, first in enumerate(per_case[0]):
        column = {k: [rows[i][k] for rows in per_case] for k in first}
        out.append(
            {
                "radius": first["radius"],
                "recall_mean": _nan_stat(np.mean, column["recall"]),
                "recall_min": _nan_stat(np.min, column["recall"]),
                "fpr_mean": _nan_stat(np.mean, column["fpr"]),
                "fpr_max": _nan_stat(np.max, column["fpr"]),
                "candidate_fraction_mean": _nan_stat(np.mean, column["candidate_fraction"]),
            }
        )
    return out


def summary_report(
    class_names: Sequence[str],
    stages: Mapping[str, tuple[str, np.ndarray]],
    present: np.ndarray,
    cut: np.ndarray,
    comparisons: Sequence[tuple[str, str]] = (),
    candidates: Sequence[Sequence[dict]] | None = None,
    candidates_grid: str | None = None,
) -> dict:
    """The report's tables from per-case results.

    ``stages``: ``{key: (label, dice)}`` in table order, ``dice`` float ``(cases,
    classes)`` with NaN where a class is not scored (``metrics.scored_dice``).
    ``present`` / ``cut``: bool ``(cases, classes)`` from ``metrics.reference_coverage``.
    ``comparisons``: ``(before, after)`` stage keys; each gets the per-case differences
    ``after − before`` (``summarize``'s statistics over the cases where both are scored)
    and the two-sided Wilcoxon signed-rank p (``compare_stages``), with ``low_power``
    set below ``LOW_POWER_CASES`` scored cases. ``candidates``: per case
    ``candidate_recall_fpr`` rows (one per r), aggregated over the cases;
    ``candidates_grid`` says where they were computed.

    Returns a JSON-ready dict (NaN where undefined) over the organs (every class but id
    0): ``class_names``, ``n_cases``, ``stages`` (``{key: {"label", "dice"}}``),
    ``coverage`` (per organ: cases whose reference ``present``\\ s it, ``absent``,
    ``cut``), ``comparisons`` (``[{"before", "after", "organs": {organ: {n, mean, std,
    median, min, max, p, low_power}}}]``), ``candidates`` (per r: ``radius``,
    ``recall_mean``, ``recall_min``, ``fpr_mean``, ``fpr_max``,
    ``candidate_fraction_mean``; ``None`` without) and ``candidates_grid``.

    >>> d = np.array([[np.nan, 0.5], [np.nan, 0.7]])
    >>> r = summary_report(["bg", "liver"], {"s": ("stage", d)}, d > 0, d > 0.6)
    >>> r["coverage"]["liver"], r["stages"]["s"]["dice"]["liver"]["mean"]
    ({'present': 2, 'absent': 0, 'cut': 1}, 0.6)
    """
    names = list(class_names)
    organs = names[1:]
    present = np.asarray(present, bool)
    cut = np.asarray(cut, bool)
    n_cases = present.shape[0]
    report = {
        "class_names": names,
        "n_cases": n_cases,
        "stages": {
            key: {"label": label, "dice": summarize(np.asarray(d)[:, 1:], organs)}
            for key, (label, d) in stages.items()
        },
        "coverage": {
            organ: {
                "present": int(present[:, c].sum()),
                "absent": int(n_cases - present[:, c].sum()),
                "cut": int(cut[:, c].sum()),
            }
            for c, organ in enumerate(names)
            if c > 0
        },
        "comparisons": [],
        "candidates": None if candidates is None else _aggregate_candidates(candidates),
        "candidates_grid": candidates_grid,
    }
    for before, after in comparisons:
        a = np.asarray(stages[before][1], dtype=np.float64)
        b = np.asarray(stages[after][1], dtype=np.float64)
        diff = summarize((b - a)[:, 1:], organs)
        p = compare_stages(a, b)[1:]
        for row, p_k in zip(diff.values(), p, strict=True):
            row["p"] = float(p_k)
            row["low_power"] = row["n"] < LOW_POWER_CASES
        report["comparisons"].append({"before": before, "after": after, "organs": diff})
    return report


def _coverage_notes(report: dict) -> list[str]:
    n = report["n_cases"]
    lines = [f"n: the cases whose reference holds the organ (of {_cases(n)})."]
    cov = report["coverage"]
    absent = [f"{o} ({c['absent']} of {_cases(n)})" for o, c in cov.items() if c["absent"]]
    cut = [f"{o} ({c['cut']} of {_cases(n)})" for o, c in cov.items() if c["cut"]]
    if absent:
        lines.append(
            "Absent from the reference, so not scored in those cases (what a stage predicts "
            "there is in the JSON): " + ", ".join(absent) + "."
        )
    if cut:
        lines.append(
            "Cut by the field of view (the reference reaches a face of the scan, so the Dice "
            "covers only the part in view): " + ", ".join(cut) + "."
        )
    return lines


def _power_note(comparison: dict) -> str:
    weak = [o for o, row in comparison["organs"].items() if row["low_power"]]
    text = (
        "p: two-sided Wilcoxon signed-rank test of the per-case differences (cases where "
        "both are scored; zero differences dropped; exact for small samples)."
    )
    if weak:
        which = "every organ" if len(weak) == len(comparison["organs"]) else ", ".join(weak)
        text += (
            f" Fewer than {LOW_POWER_CASES} cases ({which}): the test has no power here; "
            "n differing cases cannot give p below 2/2^n (0.0625 for n = 5), so a large p "
            "is no evidence that the stages agree."
        )
    return text


def report_markdown(report: dict, digits: int = 3) -> str:
    """A report (``summary_report``'s keys) as markdown: the Dice table of each stage,
    which organs are absent or cut, each comparison's Wilcoxon p-values and per-case
    differences, and C2's recall / false-positive rate per r."""
    labels = {key: st["label"] for key, st in report["stages"].items()}
    parts = []
    for i, st in enumerate(report["stages"].values()):
        title = f"Dice, {st['label']}" + (f" ({_cases(report['n_cases'])})" if i == 0 else "")
        parts.append(f"{title}\n\n" + markdown_table(st["dice"], digits))
    parts.append("\n".join(_coverage_notes(report)))
    for comp in report["comparisons"]:
        a, b = labels[comp["before"]], labels[comp["after"]]
        lines = [f"| class | {a} mean | {b} mean | p |", "|---|---:|---:|---:|"]
        for organ, row in comp["organs"].items():
            ma = report["stages"][comp["before"]]["dice"][organ]["mean"]
            mb = report["stages"][comp["after"]]["dice"][organ]["mean"]
            cells = [_fmt(ma, digits), _fmt(mb, digits), _fmt(row["p"], 4)]
            lines.append(f"| {organ} | " + " | ".join(cells) + " |")
        parts.append(f"Wilcoxon signed-rank test, {a} vs {b}\n\n" + "\n".join(lines))
        stats = {o: {k: row[k] for k in ("n", "mean", "std", "median", "min", "max")}
                 for o, row in comp["organs"].items()}  # fmt: skip
        parts.append(f"Dice {b} − {a}, per case\n\n" + markdown_table(stats, digits))
        parts.append(_power_note(comp))
    if report["candidates"] is not None:
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
        note = (
            "recall: share of the reference's foreground inside C2; FPR: share of the "
            "reference's background inside C2; C2 fraction: share of the volume in C2"
        )
        if report.get("candidates_grid"):
            note += f"; on {report['candidates_grid']}"
        parts.append(note + ".")
    return "\n\n".join(parts)


def report_json(report: dict) -> str:
    """A report as JSON text, NaN as ``null``.

    >>> report_json({"dice": float("nan")})
    '{\\n "dice": null\\n}\\n'
    """
    return json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n"


def _jsonable(value):
    """NaN → ``None`` (JSON has no NaN), numpy scalars → Python, recursively."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(folder: str | Path, report: dict, *, plot: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` (which shows the plot) and, with candidates
    and ``plot``, ``candidates.png`` (recall and FPR against r,
    ``viz.candidates_png``) into ``folder`` (created if missing). Each file is written
    to a temporary name and all are renamed into place together at the end, so an
    error leaves the folder as it was. Returns the paths written.
    """
    from ..io.atomic import atomic_outputs

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; expected a folder for the report")
    folder.mkdir(parents=True, exist_ok=True)
    plot = plot and report.get("candidates") is not None
    paths = [folder / name for name in REPORT_FILES[: 3 if plot else 2]]
    markdown = report_markdown(report)
    if plot:
        markdown += "\n\n![C2 recall and false-positive rate against r](candidates.png)"
    with atomic_outputs(paths) as tmps:
        tmps[0].write_text(report_json(report))
        tmps[1].write_text(markdown + "\n")
        if plot:
            from ..viz import candidates_png

            candidates_png(report["candidates"], tmps[2], radius=report.get("model_radius"))
    return paths
