"""Smoke tests of the end-to-end benchmark (``benchmarks/e2e.py``) with a tiny model.

They check what the benchmark reports (keys, tile counts, agreement), never a time.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastcascade.config import CLASS_NAMES
from fastcascade.model import UNet3D
from fastcascade.model.checkpoint import save_cascade
from fastcascade.presets import default_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TILE = 24  # voxels; "same" padding, so input and output tiles are equal


@pytest.fixture(scope="module")
def e2e():
    sys.path.insert(0, str(BENCH))
    try:
        import e2e as module
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def e2e_measure(e2e):
    import e2e_measure as module  # imported by e2e.py

    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-level, base-2 cascade on a 6 mm grid with 24³ tiles, saved to disk."""
    config = default_config(base_channels=2, levels=2, spacing=6.0, tile=TILE)
    torch.manual_seed(0)
    s1 = UNet3D.from_architecture(config.stage1.architecture)
    s2 = UNet3D.from_architecture(config.stage2.architecture)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_cascade(path, config, s1, s2, dtype=torch.float32)
    return path, config


def _run(e2e, tmp_path, model_path, cases, data=None):
    argv = [
        "--device",
        "cpu",
        "--cases",
        cases,
        "--providers",
        "fastcascade,every_tile,tiles_overlap",
        "--model",
        str(model_path),
        "--out",
        str(tmp_path),
        "--batch-size",
        "64",
    ]
    if data is not None:
        argv += ["--data", str(data)]
    assert e2e.main(argv) == 0
    [path] = tmp_path.glob("e2e-*.json")
    return path, json.loads(path.read_text())


@pytest.mark.slow
def test_phantom_small_report(e2e, e2e_measure, tiny_model, tmp_path, monkeypatch):
    model_path, _ = tiny_model
    on_disk = []  # records in the file after each write: the JSON is written as it goes

    def write_json(path, data):
        write(path, data)
        on_disk.append(len(json.loads(path.read_text())["records"]))

    write = e2e.write_json
    monkeypatch.setattr(e2e, "write_json", write_json)
    path, report = _run(e2e, tmp_path, model_path, "phantom_small")
    assert on_disk == [0, 1, 2, 3, 3]

    assert path.name.startswith("e2e-cpu-") and path.with_suffix(".md").exists()
    assert report["finished"] is not None
    env = report["environment"]
    for key in ("device", "versions", "git", "load_average_start", "uptime_start"):
        assert key in env, key
    assert set(env["versions"]) >= {"python", "torch", "triton", "numpy"}
    [identity] = report["models"].values()
    assert identity["weights"].endswith("tiny.safetensors") and len(identity["sha256"]) == 64

    records = {r["provider"]: r for r in report["records"]}
    assert set(records) == {"fastcascade", "every_tile", "tiles_overlap"}
    slabs, every, fast = records["fastcascade"], records["every_tile"], records["tiles_overlap"]
    for r in (slabs, every, fast):
        assert r["case"] == "phantom_small" and r["shape"] == [61, 51, 56]
        assert set(r["timings_s"]) == set(e2e_measure.STEPS)
        assert r["peak_memory_mb"] > 0 and r["host_syncs"] >= 1
        assert 0.0 < r["c1_fraction"] < 1.0 and 0.0 <= r["c2_fraction"] <= 1.0
        assert 0.0 <= r["dice_vs_reference"]["mean"] <= 1.0

    # The tile grids, from the geometry alone: TILE³ output tiles on the 61x51x56 working
    # grid; stage 2 steps half a tile in x and y, from voxel 0 until a tile reaches the end.
    half = TILE // 2
    grid1 = math.prod(math.ceil(n / TILE) for n in (61, 51, 56))
    grid2 = (
        (math.ceil((61 - TILE) / half) + 1)
        * (math.ceil((51 - TILE) / half) + 1)
        * math.ceil(56 / TILE)
    )
    assert every["tiles"]["stage1"] == {"computed": grid1, "total": grid1, "skipped": 0}
    assert every["tiles"]["stage2"] == {"computed": grid1, "total": grid1, "skipped": 0}
    # Slabs: one pass over C1's box in stage 1, the four phase passes over C2's in stage 2.
    assert slabs["tiles"]["stage1"] == {"computed": 1, "total": 1, "skipped": 0}
    assert slabs["tiles"]["stage2"] == {"computed": 4, "total": 4, "skipped": 0}
    assert slabs["c1_fraction"] == every["c1_fraction"]
    assert set(slabs["speedup_vs_every_tile"]) == {"stage1", "stage2", "total"}
    assert fast["tiles"]["stage1"]["total"] == grid1
    assert fast["tiles"]["stage2"]["total"] == grid2
    assert 0 < fast["tiles"]["stage1"]["computed"] < grid1  # the air around the body
    # A random stage 1 marks foreground nearly everywhere in C1, so C2 may touch every tile.
    assert 0 < fast["tiles"]["stage2"]["computed"] <= grid2
    # Every-tile and skipped tiles see the same C1; C2 follows from stage 1, identical too.
    assert fast["c1_fraction"] == every["c1_fraction"]
    assert fast["c2_fraction"] == every["c2_fraction"]
    assert 0.0 <= fast["dice_vs_every_tile"]["mean"] <= 1.0
    assert "dice_vs_every_tile" not in every
    assert set(fast["speedup_vs_every_tile"]) == {"stage1", "stage2", "total"}

    table = path.with_suffix(".md").read_text()
    assert "| phantom_small | fastcascade |" in table
    assert "| phantom_small | tiles_overlap |" in table
    assert f"{grid1}/{grid1}" in table


@pytest.mark.slow
def test_case_a_reference_dice(e2e, tiny_model, tmp_path, case_a_paths):
    """Case A's reference labels are mapped onto CLASS_NAMES and scored."""
    model_path, _ = tiny_model
    data = case_a_paths[0].parents[2]
    _, report = _run(e2e, tmp_path, model_path, "case_a", data=data)
    records = {r["provider"]: r for r in report["records"]}
    assert records["fastcascade"]["shape"] == [122, 101, 112]
    for r in records.values():
        per_class = r["dice_vs_reference"]["per_class"]
        assert set(per_class) == set(CLASS_NAMES[1:])
        # Every mapped organ is present in the reference, so no class is undefined.
        assert all(v is not None and 0.0 <= v <= 1.0 for v in per_class.values())
