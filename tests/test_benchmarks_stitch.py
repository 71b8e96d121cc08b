"""Dry run of the stitching benchmark (``benchmarks/run.py --area stitch --cpu``).

Checks what it records (every op and provider, agreement with the baselines, syncs),
never a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastcascade.ops import _backend

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="the dry run interprets the Triton kernels (TRITON_INTERPRET=1, tests/conftest.py)",
)
def test_stitch_dry_run_records_every_op_provider_and_agreement(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    assert run.main(["--area", "stitch", "--cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "stitch.json").read_text())
    assert data["meta"]["area"] == "stitch" and data["meta"]["cpu_dry_run"]
    results = data["results"]
    assert not [r for r in results if "error" in r]
    by_op = {}
    for r in results:
        by_op.setdefault(r["op"], set()).add(r["provider"])
    assert by_op == {
        "accumulate": {"loop", "index_add", "fastcascade_triton"},
        "finalize-labels": {"argmax", "torch", "fastcascade_triton"},
        "finalize-probs": {"torch", "fastcascade_triton"},
        "passes-4": {"torch_addcmul", "index_add", "fastcascade_triton"},
    }
    for r in results:
        assert r["median_ms"] > 0 and r["gbps"] > 0
        if r["provider"] != "argmax":
            # The interpreter adds in the loop's order: every label agrees.
            assert r["label_mismatches"] == 0 and r["mismatches_beyond_eps"] == 0
        if r.get("max_abs_diff") is not None:
            assert r["max_abs_diff"] < 1e-6
        if r["provider"] == "fastcascade_triton":
            assert r["syncs"] is None  # interpreted kernels are not counted
    syncs = {(r["op"], r["provider"]): r["syncs"] for r in results}
    # On the CPU, accumulate reads the origins once for its bounds check; finalize reads none.
    assert syncs[("accumulate", "index_add")] == 1 and syncs[("finalize-labels", "torch")] == 0
    speedups = [r["speedup_vs_baseline"] for r in results if r["provider"] in ("loop", "torch")]
    assert speedups and all(s == 1.0 for s in speedups)
    assert "fastcascade_triton" in (tmp_path / "stitch.md").read_text()
