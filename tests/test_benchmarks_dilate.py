"""Dry run of the dilation benchmark (``benchmarks/run.py --area dilate --cpu``).

Checks what it records (providers, agreement with SciPy, the EDT element check, syncs),
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
def test_dilate_dry_run_records_every_provider_and_agreement(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    assert run.main(["--area", "dilate", "--cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dilate.json").read_text())
    results = data["results"]
    assert data["meta"]["area"] == "dilate" and data["meta"]["cpu_dry_run"]
    providers = {"scipy", "torch", "fastcascade_triton", "fastcascade_triton_labels"}
    assert {r["provider"] for r in results} == providers
    assert all(r["equal"] and r["mismatches"] == 0 for r in results)
    # Nothing is read back from a device (the interpreted kernels are not counted).
    assert {r["provider"]: r["syncs"] for r in results} == {
        "scipy": 0,
        "torch": 0,
        "fastcascade_triton": None,
        "fastcascade_triton_labels": None,
    }
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in results)
    assert {r["dtype"] for r in results if r["provider"].endswith("labels")} == {"uint8"}
    check = data["meta"]["edt_element"]["dry-run"]
    assert check["scipy"]["same_element"] and check["element_voxels"] > 1
    assert "fastcascade_triton" in (tmp_path / "dilate.md").read_text()
