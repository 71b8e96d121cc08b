"""Dry run of the body-mask benchmark (``benchmarks/run.py --area morphology --cpu``).

Checks what it records (providers, agreement with SciPy, syncs), never a time.
"""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_morphology_dry_run_records_every_provider_and_agreement(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    assert run.main(["--area", "morphology", "--cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "morphology.json").read_text())
    results = data["results"]
    assert data["meta"]["area"] == "morphology" and data["meta"]["cpu_dry_run"]
    ops = {"fill_holes_2d", "largest_component", "body_mask"}
    assert {(r["op"], r["provider"]) for r in results} == {
        (op, provider) for op in ops for provider in ("scipy", "torch")
    }
    assert all(r["equal"] for r in results)
    # SciPy on a CPU tensor reads nothing back; the PyTorch labelling reads once per check.
    assert all(r["syncs"] == 0 for r in results if r["provider"] == "scipy")
    assert all(r["syncs"] >= 1 for r in results if r["provider"] == "torch")
    assert all(r["speedup_vs_scipy"] > 0 for r in results)
    # The GPU-only providers are reported, with the reason, rather than left out silently.
    unavailable = data["meta"]["unavailable"]
    assert set(unavailable) == {"cupy", "cuda"}
    assert "needs a CUDA tensor" in unavailable["cuda"] and "nvcc" in unavailable["cuda"]
    assert "cuda_build_s" not in data["meta"]
    table = (tmp_path / "morphology.md").read_text()
    assert "body_mask" in table and "cuda: unavailable (backend 'cuda' needs" in table
    import bench_morphology

    assert "cuda: unavailable" in bench_morphology.summarize(data)
