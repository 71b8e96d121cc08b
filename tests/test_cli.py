"""The ``fastcascade`` command line: argument errors, safe outputs, clean error messages.

Most tests replace ``fastcascade.segment`` by a fake that returns a known result, so they
check the command's own logic; ``test_segment_end_to_end`` runs the real cascade with a
tiny random model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations

import fastcascade
from fastcascade import cli
from fastcascade.api import SegmentationResult
from fastcascade.config import CLASS_NAMES
from fastcascade.io import nifti
from fastcascade.io.scan import load_scan

AFFINE_LPS = np.array(
    [[-2.0, 0, 0, 30.0], [0, -2.0, 0, 25.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]], dtype=np.float64
)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ct_file(tmp_path):
    """A small int16 CT (scl_slope 2) stored LPS: a soft-tissue box in air."""
    data = np.full((12, 10, 8), -512, np.int16)
    data[3:9, 2:8, 2:6] = 20
    img = nib.Nifti1Image(data, AFFINE_LPS)
    img.header.set_slope_inter(2.0, 0.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    return path


class FakeSegment:
    """Stands in for ``fastcascade.segment``: records its call, reports progress."""

    def __init__(self, error: Exception | None = None):
        self.calls = []
        self.error = error

    def __call__(self, volume, **kwargs):
        self.calls.append((volume, kwargs))
        if self.error is not None:
            raise self.error
        img = nib.load(volume)
        hu = img.get_fdata()
        labels = np.where(hu > 0, 1, 0).astype(np.uint8)
        labels[0, 0, 0] = 10
        progress = kwargs["progress"]
        for done in (1, 2):
            progress("stage1", done, 2)
        progress("stage2", 3, 3)
        probs = None
        if kwargs["probabilities"]:
            probs = np.stack([labels == c for c in range(len(CLASS_NAMES))]).astype(np.float32)
            probs = probs * 0.75 + 0.25 / len(CLASS_NAMES)
        return SegmentationResult(
            labels=labels,
            class_names=CLASS_NAMES,
            affine=img.affine,
            header=img.header,
            probabilities=probs,
            timings={"load": 0.01, "stage1": 1.5, "stage2": 2.5, "total": 4.0},
            c1_fraction=0.25,
            c2_fraction=0.125,
            tiles={"stage1": (2, 2), "stage2": (3, 8)},
            source=Path(volume),
        )


@pytest.fixture
def fake(monkeypatch):
    fake = FakeSegment()
    monkeypatch.setattr(fastcascade, "segment", fake, raising=False)
    return fake


# ----------------------------------------------------------------------- segment


def test_segment_writes_labels_names_and_probabilities(ct_file, fake, tmp_path, capsys):
    before = sha(ct_file)
    out, probs = tmp_path / "seg.nii.gz", tmp_path / "probs.nii.gz"
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--probabilities", str(probs)]) == 0

    ((volume, kwargs),) = fake.calls
    assert volume == str(ct_file)
    assert kwargs["device"] == "auto" and kwargs["overlap"] is True
    assert kwargs["batch_size"] == 2 and kwargs["probabilities"] is True
    assert kwargs["model"] is None
    expected = (nib.load(ct_file).get_fdata() > 0).astype(np.uint8)
    expected[0, 0, 0] = 10
    seg = nib.load(out)
    assert np.array_equal(np.asarray(seg.dataobj), expected)
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.header.get_sform(), AFFINE_LPS, atol=1e-6)
    np.testing.assert_allclose(seg.header.get_qform(), AFFINE_LPS, atol=1e-6)
    assert seg.dataobj.slope == 1.0 and seg.dataobj.inter == 0.0
    assert json.loads((tmp_path / "seg.json").read_text())["10"] == CLASS_NAMES[10]
    p = nib.load(probs)
    assert p.shape == (*expected.shape, len(CLASS_NAMES))
    assert p.get_data_dtype() == np.float32
    assert sha(ct_file) == before

    captured = capsys.readouterr()
    for text in ("stage1", "stage2", "1.50", "2.50", "25.0%", "12.5%", "3 of 8 tiles"):
        assert text in captured.out
    assert "stage1" in captured.err and "3/3" in captured.err  # the progress bars


def test_segment_options_reach_segment(ct_file, fake, tmp_path, capsys):
    out, probs = tmp_path / "seg.nii", tmp_path / "p.nii.gz"
    argv = ["segment", str(ct_file), "-o", str(out), "--no-overlap", "--batch-size", "5"]
    argv += ["--device", "cuda:1", "--model", "m.safetensors", "--quiet"]
    argv += ["--probabilities", str(probs), "--fp16-probabilities"]
    assert cli.main(argv) == 0
    _, kwargs = fake.calls[0]
    assert kwargs["overlap"] is False and kwargs["batch_size"] == 5
    assert kwargs["device"] == "cuda:1" and kwargs["model"] == "m.safetensors"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert nib.load(probs).get_data_dtype() == np.uint16
    assert np.asarray(nib.load(out).dataobj).max() == 10


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="no-output"),
        pytest.param(["-o", "s.nii.gz", "--device", "gpu"], id="bad-device"),
        pytest.param(["-o", "s.nii.gz", "--device", "cuda:x"], id="bad-device-index"),
        pytest.param(["-o", "s.nii.gz", "--batch-size", "0"], id="batch-size-0"),
        pytest.param(["-o", "s.nii.gz", "--batch-size", "two"], id="batch-size-text"),
        pytest.param(["-o", "s.nii.gz", "--fp16-probabilities"], id="fp16-without-file"),
        pytest.param(["-o", "s.nii.gz", "--frobnicate"], id="unknown-option"),
    ],
)
def test_segment_argument_errors(extra, ct_file, fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", str(ct_file), *extra])
    assert info.value.code == 2
    assert fake.calls == []
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists()


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "segment" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["same-path", "symlink", "probabilities", "relative"])
def test_segment_refuses_to_overwrite_the_input(how, ct_file, fake, tmp_path, monkeypatch, capsys):
    before = sha(ct_file)
    out = ct_file
    argv_extra = []
    if how == "symlink":
        out = tmp_path / "link.nii.gz"
        out.symlink_to(ct_file)
    elif how == "probabilities":
        out = tmp_path / "seg.nii.gz"
        argv_extra = ["--probabilities", str(ct_file)]
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = "./ct.nii.gz"
    assert cli.main(["segment", str(ct_file), "-o", str(out), *argv_extra]) == 2
    err = capsys.readouterr().err
    assert "input scan" in err and "Traceback" not in err
    assert fake.calls == []
    assert sha(ct_file) == before
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ValueError("scan has 3 NaN voxels"), id="ValueError"),
        pytest.param(TypeError("volume has dtype bool"), id="TypeError"),
        pytest.param(FileNotFoundError("model weights m.safetensors not found"), id="NotFound"),
    ],
)
def test_segment_user_errors_exit_2_without_traceback(
    error, ct_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(error), raising=False)
    assert cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert str(error) in err and "Traceback" not in err
    assert err.startswith("fastcascade segment: error:")
    assert not (tmp_path / "s.nii.gz").exists()


def test_segment_bugs_are_not_hidden(ct_file, tmp_path, monkeypatch):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(RuntimeError("bug")), raising=False)
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.nii.gz")])


def test_segment_missing_input_and_bad_output_name(fake, tmp_path, ct_file, capsys):
    assert cli.main(["segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "s.nii")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.png")]) == 2
    assert ".nii" in capsys.readouterr().err
    assert fake.calls == []


def test_segment_creates_missing_output_folders(fake, tmp_path, ct_file, capsys):
    out = tmp_path / "new" / "deeper" / "s.nii"
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.done.json", "s.json", "s.nii"]


def test_segment_failure_removes_the_folders_it_created(tmp_path, ct_file, monkeypatch, capsys):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(ValueError("bad scan")), raising=False)
    out = tmp_path / "new" / "deeper" / "s.nii"
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--quiet"]) == 2
    assert "bad scan" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_segment_failed_write_keeps_the_old_output(ct_file, fake, tmp_path, monkeypatch, capsys):
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--quiet"]) == 0
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti.nib, "save", broken_save)
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--quiet", "--overwrite"]) == 1
    assert "No space left" in capsys.readouterr().err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


@pytest.mark.slow
def test_segment_end_to_end(tmp_path, capsys):
    """The real cascade (tiny random model) through the CLI, on a RAS and an LPS copy."""
    from tiny_models import save_tiny_cascade

    model = tmp_path / "model"
    save_tiny_cascade(model, spacing=4.0, base_channels=4)

    data = np.full((20, 18, 14), -1000, np.int16)
    data[4:16, 4:14, 3:11] = 40
    data[6:9, 6:9, 5:8] = 300
    ras_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ras = nib.Nifti1Image(data, ras_affine)
    lps = ras.as_reoriented(
        orientations.ornt_transform(
            orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt("LPS")
        )
    )
    labels = {}
    for name, img in (("ras", ras), ("lps", lps)):
        ct = tmp_path / f"{name}.nii.gz"
        nib.save(img, ct)
        before = sha(ct)
        out = tmp_path / f"{name}-seg.nii.gz"
        argv = ["segment", str(ct), "-o", str(out), "--model", f"{model}.safetensors"]
        assert cli.main([*argv, "--device", "cpu"]) == 0
        assert sha(ct) == before
        seg = nib.load(out)
        assert seg.get_data_dtype() == np.uint8 and seg.shape == img.shape
        np.testing.assert_allclose(seg.header.get_sform(), img.affine, atol=1e-6)
        labels[name] = seg
    out = capsys.readouterr().out
    assert re.search(
        r"stage2: \d+ of \d+ slab passes computed, [\d.]+x the grid's voxels, budget", out
    )
    back = nib.as_closest_canonical(labels["lps"])
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(labels["ras"].dataobj))


# ----------------------------------------------------------------------- env, phantom


def test_env_reports_versions(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch       {torch.__version__}" in out
    assert f"numpy       {np.__version__}" in out
    assert f"nibabel     {nib.__version__}" in out
    assert "cuda" in out.lower()


@pytest.fixture
def fake_phantom(monkeypatch):
    calls = []

    def make_phantom(**kwargs):
        calls.append(kwargs)
        shape = kwargs.get("shape", (6, 5, 4))
        spacing = kwargs.get("spacing", (1.0, 1.0, 1.0))
        ct = np.full(shape, -1000.0, np.float32)
        seg = np.zeros(shape, np.uint8)
        ct[1:3, 1:3, 1:3], seg[1:3, 1:3, 1:3] = 60.0, 1
        affine = np.diag([*spacing, 1.0])
        return SimpleNamespace(
            to_nifti=lambda: (nib.Nifti1Image(ct, affine), nib.Nifti1Image(seg, affine))
        )

    module = types.ModuleType("fastcascade.phantom")
    module.make_phantom = make_phantom
    monkeypatch.setitem(sys.modules, "fastcascade.phantom", module)
    return calls


def test_phantom_writes_ct_and_labels(fake_phantom, tmp_path):
    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    argv = ["phantom", "-o", str(ct), "--labels", str(seg), "--seed", "3"]
    argv += ["--shape", "7", "6", "5", "--spacing", "1.5", "1.5", "2", "--contrast", "none"]
    assert cli.main(argv) == 0
    assert fake_phantom == [
        {"shape": (7, 6, 5), "spacing": (1.5, 1.5, 2.0), "seed": 3, "contrast": "none"}
    ]
    assert nib.load(ct).shape == (7, 6, 5)
    assert nib.load(ct).get_fdata()[1, 1, 1] == 60.0
    labels = nib.load(seg)
    assert labels.get_data_dtype() == np.uint8
    assert np.asarray(labels.dataobj).sum() == 8
    np.testing.assert_allclose(labels.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    assert json.loads((tmp_path / "seg.json").read_text())["1"] == "liver"
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "seg.json", "seg.nii.gz"]


def test_phantom_leaves_unset_options_to_the_generator(fake_phantom, tmp_path):
    assert (
        cli.main(["phantom", "-o", str(tmp_path / "a.nii"), "--labels", str(tmp_path / "b.nii")])
        == 0
    )
    assert fake_phantom == [{}]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--shape", "4", "4"], id="shape-2-values"),
        pytest.param(["--shape", "4", "0", "4"], id="shape-0"),
        pytest.param(["--spacing", "1", "-1", "1"], id="spacing-negative"),
        pytest.param(["--spacing", "1", "nan", "1"], id="spacing-nan"),
        pytest.param(["--contrast", "arterial"], id="contrast"),
    ],
)
def test_phantom_argument_errors(extra, fake_phantom, tmp_path):
    argv = ["phantom", "-o", str(tmp_path / "a.nii"), "--labels", str(tmp_path / "b.nii")]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, *extra])
    assert info.value.code == 2
    assert fake_phantom == []


def test_phantom_same_file_twice(fake_phantom, tmp_path, capsys):
    path = str(tmp_path / "a.nii.gz")
    assert cli.main(["phantom", "-o", path, "--labels", path]) == 2
    assert "same file" in capsys.readouterr().err
    assert fake_phantom == [] and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------- the commands

COMMANDS = ("segment", "env", "phantom", "train", "finetune", "evaluate", "demo", "export")
REPO = Path(__file__).resolve().parents[1]


def test_every_command_is_registered():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert tuple(sub.choices) == COMMANDS
    for name, p in sub.choices.items():
        assert callable(p.get_default("func")), name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: fastcascade {command}" in capsys.readouterr().out


def test_commands_run_with_their_arguments(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(cli.train, "_cmd_train", lambda args: ran.append(args.iterations) or 0)
    assert cli.main(["train", "--out", str(tmp_path), "--iterations", "3"]) == 0
    assert ran == [3]


def test_a_broken_command_module_is_an_error_not_a_missing_command(monkeypatch):
    """A bug where a command is registered stops every command, with its traceback."""

    def broken(subparsers):
        raise ImportError("cannot import name 'train_stage'")

    monkeypatch.setattr(cli.train, "register", broken)
    with pytest.raises(ImportError, match="train_stage"):
        cli.main(["env"])


def test_an_import_error_inside_a_command_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise ImportError("No module named 'fastcascade.train.trainer'")

    monkeypatch.setattr(cli.train, "_cmd_train", broken)
    with pytest.raises(ImportError, match="fastcascade.train.trainer"):
        cli.main(["train", "--out", str(tmp_path)])
    assert "unavailable" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param(["-m", "fastcascade.cli", "--version"], "fastcascade 0.1.0", id="cli"),
        pytest.param(["-m", "fastcascade", "--version"], "fastcascade 0.1.0", id="package"),
        pytest.param(["-m", "fastcascade.demo", "--help"], "usage: fastcascade demo", id="demo"),
    ],
)
def test_module_entry_points(argv, expected):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert fastcascade.__version__ == "0.1.0"


def test_console_script_is_the_cli_run():
    text = (REPO / "pyproject.toml").read_text()
    assert 'fastcascade = "fastcascade.cli:run"' in text
    assert callable(cli.run) and callable(cli.main)


def test_demo_on_a_phantom(monkeypatch, tmp_path, capsys):
    """Without case A the demo segments a phantom, writes its files and prints Dice."""
    shape = (12, 10, 8)
    truth = np.zeros(shape, np.uint8)
    truth[2:8, 2:7, 2:6] = 1  # a liver
    truth[8:11, 3:6, 2:5] = 2  # a spleen
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ct = np.where(truth > 0, 60.0, -1000.0).astype(np.float32)
    made = []

    def make_phantom(**kwargs):
        made.append(kwargs)
        return SimpleNamespace(
            labels=truth,
            to_nifti=lambda: (nib.Nifti1Image(ct, affine), nib.Nifti1Image(truth, affine)),
        )

    module = types.ModuleType("fastcascade.phantom")
    module.make_phantom = make_phantom
    monkeypatch.setitem(sys.modules, "fastcascade.phantom", module)
    monkeypatch.setenv("FASTCASCADE_DATA", str(tmp_path / "no-data"))
    predicted = truth.copy()
    predicted[8:11, 3:6, 2:5] = 0  # the spleen missed

    def segment(volume, **kwargs):
        segment.calls.append((volume, kwargs))
        img = nib.load(volume)
        return SegmentationResult(
            labels=predicted,
            class_names=CLASS_NAMES,
            affine=img.affine,
            header=img.header,
            timings={"total": 1.0},
            c1_fraction=0.5,
            c2_fraction=0.25,
            tiles={"stage1": (1, 1), "stage2": (1, 2)},
            source=Path(volume),
        )

    segment.calls = []
    monkeypatch.setattr(fastcascade, "segment", segment, raising=False)
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu"]) == 0

    from fastcascade.demo import PHANTOM_SEED

    assert made == [{"seed": PHANTOM_SEED}]
    assert segment.calls == [(str(out / "phantom_ct.nii.gz"), {"device": "cpu"})]
    assert np.array_equal(nifti.read_labels(out / "phantom_seg.nii.gz"), predicted)
    assert nifti.read_label_names(out / "phantom_seg.nii.gz") == CLASS_NAMES
    printed = capsys.readouterr().out
    assert "segmenting a generated phantom" in printed
    assert "liver                  1.000" in printed
    assert "spleen                 0.000" in printed
    assert "stage2 1/2" in printed


def test_phantom_with_the_real_generator(tmp_path):
    phantom = pytest.importorskip("fastcascade.phantom")
    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    argv = ["phantom", "-o", str(ct), "--labels", str(seg), "--shape", "20", "18", "16"]
    assert cli.main([*argv, "--spacing", "15", "15", "15", "--seed", "2"]) == 0
    expected = phantom.make_phantom(shape=(20, 18, 16), spacing=(15.0, 15.0, 15.0), seed=2)
    assert np.array_equal(nifti.read_labels(seg), expected.labels)
    assert nifti.read_label_names(seg) == CLASS_NAMES
    scan = load_scan(ct)  # a CT, not refused as a label map
    assert torch.equal(scan.data, torch.from_numpy(np.rint(expected.image).astype(np.float32)))
    np.testing.assert_allclose(nib.load(seg).affine, expected.affine)
