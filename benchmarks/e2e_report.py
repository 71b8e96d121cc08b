"""How the end-to-end benchmark compares providers and prints its results.

``compare`` fills in each record's Dice scores (against the every-tile provider and the
case's reference labels) and fastcascade's speedups; ``table`` renders a report as the
markdown summary saved beside the JSON.
"""

from __future__ import annotations

import numpy as np
from common import markdown_table
from e2e_cases import Case
from e2e_measure import STEPS

from fastcascade.evaluate import confusion_matrix, dice_from_confusion


# -- agreement ---------------------------------------------------------------------------
def dice_slabs(pred: np.ndarray, ref: np.ndarray, num_classes: int, slab: int = 16) -> np.ndarray:
    """``fastcascade.evaluate.dice`` computed from confusion matrices summed over slabs of
    ``slab`` x-slices, so that a clinical-size label map needs no volume-sized int64
    temporaries (which would raise the process's peak memory that the CPU records show).

    >>> dice_slabs(np.array([[[0, 1, 1, 2]]]), np.array([[[0, 1, 2, 2]]]), 4).round(3).tolist()
    [1.0, 0.667, 0.667, nan]
    """
    return dice_from_confusion(
        sum(
            confusion_matrix(pred[i : i + slab], ref[i : i + slab], num_classes)
            for i in range(0, pred.shape[0], slab)
        )
    )


def _dice_summary(pred: np.ndarray, ref: np.ndarray, class_names) -> dict:
    scores = dice_slabs(pred, ref, len(class_names))
    fg = scores[1:]
    per_class = {
        n: (None if np.isnan(s) else round(float(s), 4))
        for n, s in zip(class_names[1:], fg, strict=True)
    }
    mean = float(np.nanmean(fg)) if np.isfinite(fg).any() else None
    return {"mean": mean, "per_class": per_class}


def compare(records: list[dict], labels: dict[str, np.ndarray], case: Case, class_names) -> None:
    """Fill in every provider's speedups over the baselines present (``every_tile``,
    ``tiles_overlap``, ``torch_best``, ``fastcascade_bf16``), agreement with
    ``every_tile`` and Dice against the case's reference labels, in place; called after
    each provider, it computes each record's Dice scores once."""
    by = {r["provider"]: r for r in records}
    base = labels.get("every_tile")
    for r in records:
        name = r["provider"]
        if base is not None and name != "every_tile" and "dice_vs_every_tile" not in r:
            r["dice_vs_every_tile"] = _dice_summary(labels[name], base, class_names)
        if case.reference is not None and "dice_vs_reference" not in r:
            r["dice_vs_reference"] = _dice_summary(labels[name], case.reference, class_names)
    for fast in records:
        for other in ("every_tile", "tiles_overlap", "torch_best", "fastcascade_bf16"):
            if other in by and other != fast["provider"]:
                fast[f"speedup_vs_{other}"] = {
                    k: by[other]["timings_s"][k] / fast["timings_s"][k]
                    for k in ("stage1", "stage2", "total")
                    if fast["timings_s"][k] > 0
                }


# -- report ------------------------------------------------------------------------------
def _f(x, digits=2, suffix=""):
    return None if x is None else f"{x:.{digits}f}{suffix}"


def table(report: dict) -> str:
    """The markdown summary of ``report``: header lines, then one row per record."""
    env = report["environment"]
    git = env["git"]
    v = env["versions"]
    commit = (git["commit"] or "unknown")[:10] + (" (uncommitted changes)" if git["dirty"] else "")
    lines = [
        f"# fastcascade end-to-end benchmark: {env['device']}",
        "",
        f"{report['started'][:16]} · commit {commit} · torch {v['torch']} · triton {v['triton']}"
        f" · numpy {v['numpy']} · python {v['python']}",
        f"Load average (1 min) at start {env['load_average_start'].get('1min', 0):.1f}, "
        f"at end {report.get('load_average_end', {}).get('1min', float('nan')):.1f} "
        f"on {env['load_average_start'].get('cores')} cores.",
    ]
    for name, ident in report["models"].items():
        weights = ident["weights"] + (
            f" (sha256 {ident['sha256'][:12]}…)"
            if "sha256" in ident
            else f" (seed {ident.get('seed')}, {ident.get('why')})"
        )
        arch = ident["architecture"]
        lines.append(
            f"Model `{name}`: {weights}; base {arch['base_channels']}, "
            f"{arch['levels']} levels, {arch['padding']}, tile {ident['tile']}, "
            f"{ident['spacing_mm'][0]} mm working grid."
        )
    for key, c in report.get("compile", {}).items():
        items = (f"{k} {_f(x, 1) if isinstance(x, float) else x}" for k, x in c.items())
        lines.append(f"Compile `{key}`: " + ", ".join(items))
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    lines += [
        "",
        "Seconds are medians of the timed runs; peak memory: "
        + (report["records"][0]["peak_memory_kind"] if report["records"] else "–")
        + ". × every-tile, × tiles, × torch-best: the provider's total-time speedup over"
        " every_tile, tiles_overlap and torch_best (> 1: faster). Passes: tiles or slab"
        " passes computed / planned. Dice: mean over the foreground classes present in"
        " either map.",
        "",
    ]
    header = [
        "model",
        "case",
        "provider",
        "load",
        "to grid",
        "C1",
        "stage 1",
        "C2",
        "stage 2",
        "to input",
        "total s",
        "passes 1",
        "passes 2",
        "C1 %",
        "C2 %",
        "syncs",
        "peak MiB",
        "× every-tile",
        "× tiles",
        "× torch-best",
        "Dice vs every-tile",
        "Dice vs ref",
    ]
    rows = []
    for r in report["records"]:
        t = r["timings_s"]
        tiles = r["tiles"]
        rows.append(
            [
                r["model"],
                r["case"],
                r["provider"],
                *(_f(t[k]) for k in STEPS),
                f"{tiles['stage1']['computed']}/{tiles['stage1']['total']}",
                f"{tiles['stage2']['computed']}/{tiles['stage2']['total']}",
                _f(100 * r["c1_fraction"], 1),
                _f(100 * r["c2_fraction"], 1),
                r["host_syncs"],
                _f(r["peak_memory_mb"], 0),
                _f(r.get("speedup_vs_every_tile", {}).get("total"), 2, "×"),
                _f(r.get("speedup_vs_tiles_overlap", {}).get("total"), 2, "×"),
                _f(r.get("speedup_vs_torch_best", {}).get("total"), 2, "×"),
                _f((r.get("dice_vs_every_tile") or {}).get("mean"), 3),
                _f((r.get("dice_vs_reference") or {}).get("mean"), 3),
            ]
        )
    return "\n".join(lines) + "\n" + markdown_table(header, rows) + "\n"
