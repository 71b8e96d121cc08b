"""Many scans on Ray actors (``fastcascade.cli.ray_batch``) against the command's batch mode.

A local Ray cluster of two CPUs runs two actors of one thread each; the command runs
with ``--threads 1`` too, so both compute the same labels bit for bit. Skipped without
Ray, except in CI (``CI=true``), where a skip would hide a missing install step.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_models import save_tiny_cascade, write_phantoms

from fastcascade import cli


def require_ray():
    if os.environ.get("CI", "").lower() in ("1", "true"):
        import ray
        import ray.data  # noqa: F401
    else:
        pytest.importorskip("ray.data", reason="the [cluster] extra is not installed")


@pytest.fixture(scope="module")
def ray_cluster():
    require_ray()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # Random networks: one class over the body, background elsewhere; the background
    # differs between the phantoms, so outputs given the wrong scan's labels would show.
    return save_tiny_cascade(tmp_path_factory.mktemp("model") / "tiny")


def test_ray_actors_write_what_the_command_writes(tmp_path, model, ray_cluster, monkeypatch):
    from fastcascade.api import Predictor
    from fastcascade.cli.ray_batch import segment_on_ray

    scans = tmp_path / "scans"
    write_phantoms(scans, corrupt="broken.nii.gz")
    by_cli, by_ray = tmp_path / "cli", tmp_path / "ray"
    argv = ["segment", str(scans), "-o", str(by_cli), "--model", str(model)]
    rc = cli.main([*argv, "--device", "cpu", "--threads", "1", "--no-overlap", "--quiet"])
    assert rc == 1  # the broken scan

    report = segment_on_ray(
        [scans], by_ray, model=model, device="cpu", threads=1, num_actors=2, overlap=False
    )
    cases = [scans / f"case{k}.nii.gz" for k in (1, 2, 3)]
    assert sorted(report.segmented) == cases
    assert report.skipped == []
    assert [f["input"] for f in report.failures] == [str(scans / "broken.nii.gz")]

    assert sorted(p.name for p in by_ray.iterdir()) == sorted(p.name for p in by_cli.iterdir())
    backgrounds = set()
    for k in (1, 2, 3):
        ours = nib.load(by_ray / f"case{k}.nii.gz")
        theirs = nib.load(by_cli / f"case{k}.nii.gz")
        labels = np.asarray(ours.dataobj)
        assert labels.any()
        backgrounds.add(int((labels == 0).sum()))
        np.testing.assert_array_equal(labels, np.asarray(theirs.dataobj))
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        for name in (f"case{k}.json", f"case{k}.done.json"):  # names, marker: the same
            assert json.loads((by_ray / name).read_text()) == json.loads(
                (by_cli / name).read_text()
            )
    assert len(backgrounds) == 3  # three different label maps
    assert json.loads((by_ray / "failures.json").read_text()) == json.loads(
        (by_cli / "failures.json").read_text()
    )

    # Each skips what the other did: the markers are the command's.
    segmented: list = []
    original = Predictor.segment
    monkeypatch.setattr(
        Predictor, "segment", lambda self, *a, **k: segmented.append(1) or original(self, *a, **k)
    )
    argv = ["segment", str(scans), "-o", str(by_ray), "--model", str(model)]
    assert cli.main([*argv, "--device", "cpu", "--threads", "1", "--no-overlap", "--quiet"]) == 1
    assert segmented == []
    again = segment_on_ray(
        [scans], by_cli, model=model, device="cpu", threads=1, num_actors=2, overlap=False
    )
    assert sorted(again.skipped) == cases and again.segmented == []


def test_an_unreachable_cluster_is_one_clear_error(tmp_path, ray_cluster):
    from fastcascade.cli.ray_batch import segment_on_ray

    with socket.socket() as s:  # a port nobody listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match=f"cannot reach the Ray cluster at {address}"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", address=address, connect_timeout=2)
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_refused_before_any_work(tmp_path, model, ray_cluster):
    from fastcascade.cli.ray_batch import segment_on_ray

    with pytest.raises(ValueError, match="unknown option.*overlapp"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", model=model, overlapp=False)
    with pytest.raises(ValueError, match="device 'gpu'"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", model=model, device="gpu")
    with pytest.raises(ValueError, match="threads"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", model=model, threads=0)
    with pytest.raises(RuntimeError, match=r"has 0 GPU\(s\) and an actor needs 1"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", model=model, gpus_per_actor=1)
    with pytest.raises(RuntimeError, match=r"has 2 CPU\(s\) and an actor needs 3"):
        segment_on_ray([tmp_path / "in"], tmp_path / "out", model=model, threads=3)
    assert not (tmp_path / "out").exists()
