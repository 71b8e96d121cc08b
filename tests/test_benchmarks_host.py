"""Dry run of the host-time benchmark (``benchmarks/run.py --area host --cpu``).

Checks what it records (every case, through the fused path's stand-ins, for the working
tree and a baseline revision), never a time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _in_git_checkout() -> bool:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _in_git_checkout(), reason="the baseline is extracted with git")
def test_host_dry_run_times_every_case_through_the_stand_ins(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    out = tmp_path / "out"
    assert run.main(["--area", "host", "--cpu", "--baseline", "HEAD", "--out", str(out)]) == 0
    data = json.loads((out / "host.json").read_text())
    results = data["results"]
    assert data["meta"]["area"] == "host" and len(data["meta"]["baseline_commit"]) == 40
    cases = {
        (p, d, g)
        for p in ("cudnn", "triton")
        for d in ("fp32", "bf16")
        for g in ("inference_mode", "no_grad")
    }
    for code in ("current", f"baseline {data['meta']['baseline_commit'][:7]}"):
        rows = [r for r in results if r["code"] == code]
        assert {(r["provider"], r["dtype"], r["grad_mode"]) for r in rows} == cases
    # Each call reached the stand-in exactly once: the fused path ran, not a fallback.
    assert all(r["stand_in_calls"] == 1.0 for r in results)
    assert all(r["p20_us"] <= r["median_us"] <= r["p80_us"] for r in results)
    assert all(r["speedup_vs_baseline"] > 0 for r in results if r["code"] == "current")
    assert "median µs/call" in (out / "host.md").read_text()
