"""The tuning benchmark's table writer (``benchmarks/bench_tune.py``): it writes the
``table.json`` the package loads, into its output folder; a CPU dry run leaves the
package's table alone. The timing itself is stubbed: these check the bookkeeping."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastcascade.ops.conv_bn_relu import configs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_tune(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_tune

    return bench_tune


def test_write_table_writes_what_the_package_loads(bench_tune, tmp_path):
    path = tmp_path / "table.json"
    bench_tune.write_table(path, configs.CONFIGS, configs.TUNED_ON)
    assert path.read_text() == configs.TABLE_PATH.read_text()
    table = {k: dict(v) for k, v in configs.CONFIGS.items()}
    table[(64, 64)].update(provider="triton", BLOCK_N=32, tuned=True)
    bench_tune.write_table(path, table, "NVIDIA H200, 2026-01-01, torch 2.13.0")
    assert configs.load_table(path) == (table, "NVIDIA H200, 2026-01-01, torch 2.13.0")
    changed = [
        (old, new)
        for old, new in zip(
            configs.TABLE_PATH.read_text().splitlines(), path.read_text().splitlines(), strict=True
        )
        if old != new
    ]
    assert len(changed) == 2  # tuned_on and the one entry: a reviewable diff
    assert '"in_channels": 64, "out_channels": 64' in changed[1][1]


def test_cpu_dry_run_writes_outdir_table_only(bench_tune, tmp_path, monkeypatch):
    import run

    committed = configs.TABLE_PATH.read_text()
    winner = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    loser = {**winner, "BLOCK_M": 128}

    def fake_tune_shape(inputs, cin, cout, *, cuda, reps, limit):
        assert not cuda and inputs
        return [("triton", loser, 2.0, None), ("triton", winner, 1.0, None)]

    monkeypatch.setattr(bench_tune, "tune_shape", fake_tune_shape)
    args = argparse.Namespace(cpu=True, quick=False, out=str(tmp_path))
    rec = run.Recorder(tmp_path, "tune", {"area": "tune", "device": "cpu"})
    bench_tune.run_tune(args, rec)

    assert configs.TABLE_PATH.read_text() == committed
    written, tuned_on = configs.load_table(tmp_path / "table.json")
    assert tuned_on is None  # a dry run tunes nothing
    shapes = set(bench_tune._tune_layers(quick=False, cpu=True))
    assert shapes and set(written) == set(configs.CONFIGS) | shapes
    for shape in shapes:
        assert written[shape] == {**configs.default_config(*shape), **winner, "provider": "triton"}
        assert written[shape]["tuned"] is False
    for shape, entry in configs.CONFIGS.items():
        if shape not in shapes:
            assert written[shape] == entry
