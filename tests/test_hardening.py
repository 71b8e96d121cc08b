"""Hostile input and broken environments: one clear line, nothing half-written, nothing
trusted before it is checked.

One group per class of failure: sizes claimed by a file, errors of the user or the
environment that must not end in a traceback, model configs, half-written outputs,
intensities that are not HU, and small things. Every CLI case checks the exit status, that
the message names the problem, that no traceback is printed and that no output or
temporary file remains.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_cli import FakeSegment  # a result for the scan, or the error it is given

import fastcascade
from fastcascade import cli
from fastcascade.api import DEFAULT_MODEL
from fastcascade.config import CLASS_NAMES
from fastcascade.io import atomic, nifti
from fastcascade.io.limits import parse_bytes
from fastcascade.io.scan import load_scan

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def ct_volume(shape=(24, 20, 16)) -> np.ndarray:
    """Air around a body of fat and soft tissue, in HU."""
    data = np.full(shape, -1000, np.int16)
    data[4:-4, 4:-4, 2:-2] = -80
    data[8:-8, 7:-7, 4:-4] = 45
    return data


@pytest.fixture
def ct_file(tmp_path):
    path = tmp_path / "in" / "ct.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(ct_volume(), AFFINE), path)
    return path


def run_cli(argv, capsys) -> tuple[int, str]:
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def listing(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def raw_header(shape, dtype=np.int16) -> bytes:
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["pixdim"][1:4] = 1.0
    return h.binaryblock + b"\0" * 4  # vox_offset 352


# ------------------------------------------------------------------ 1. sizes claimed


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_claiming_more_voxels_than_the_limit_is_refused_before_reading(
    suffix, tmp_path, capsys
):
    path = tmp_path / f"huge{suffix}"
    blob = raw_header((2000, 2000, 1000))
    path.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    assert path.stat().st_size < 4096
    status, err = run_cli(["segment", path, "-o", tmp_path / "out" / "s.nii.gz"], capsys)
    assert status == 2
    assert "2000×2000×1000" in err and "4,000,000,000 voxels" in err
    assert "FASTCASCADE_MAX_VOXELS" in err
    assert listing(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_claiming_more_data_than_the_file_holds_is_refused(suffix, tmp_path, capsys):
    path = tmp_path / f"short{suffix}"
    blob = raw_header((1500, 1500, 900))  # within the voxel limit, 4 GB claimed
    path.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    status, err = run_cli(["segment", path, "-o", tmp_path / "s.nii.gz"], capsys)
    assert status == 2 and "1500×1500×900" in err and "truncated" in err
    assert "352" in err  # what the file does hold
    assert listing(tmp_path) == [path.name]


def test_a_gzip_bomb_is_refused_by_the_limits(tmp_path, capsys, monkeypatch):
    """A few KB that inflate to 16 MB: the claim is over the (lowered) limits."""
    shape = (256, 256, 256)
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [co.compress(raw_header(shape, np.uint8))]
    zeros = b"\0" * (1 << 20)
    parts += [co.compress(zeros) for _ in range(16)]
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(b"".join(parts) + co.flush())
    assert path.stat().st_size < 64 * 1024
    monkeypatch.setenv("FASTCASCADE_MAX_VOXELS", "1000000")
    status, err = run_cli(["segment", path, "-o", tmp_path / "s.nii.gz"], capsys)
    assert status == 2 and "16,777,216 voxels" in err and "1,000,000" in err
    monkeypatch.delenv("FASTCASCADE_MAX_VOXELS")
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "8M")
    status, err = run_cli(["segment", path, "-o", tmp_path / "s.nii.gz"], capsys)
    assert status == 2 and "FASTCASCADE_MAX_MEMORY" in err and "8.0 MiB" in err
    assert listing(tmp_path) == [path.name]


def test_gzip_size_counts_every_member_and_stops_at_the_claim(tmp_path):
    data = os.urandom(5000)
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(data[:3000]) + gzip.compress(data[3000:]))
    assert nifti._gzip_size(path, 5000) == 5000  # the trailer names the last member only
    assert nifti._gzip_size(path, 4000) == 4000  # counting stops at what is needed
    assert nifti._gzip_size(path, 9000) == 5000
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(data)[:2000])
    assert nifti._gzip_size(cut, 5000) < 5000


def test_a_real_scan_passes_the_size_checks(ct_file):
    img = nifti.load_nifti(ct_file)
    assert img.shape == (24, 20, 16)


@pytest.mark.parametrize(
    "text, expected",
    [("16G", 16 * 2**30), ("512M", 512 * 2**20), ("1.5K", 1536), ("100", 100), ("2GiB", 2**31)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1G", "0", "12Q", "lots"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="expected a positive size"):
        parse_bytes(text)


# ------------------------------------------- 3. user and environment errors: one line


def test_cpu_out_of_memory_is_one_line(ct_file, tmp_path, monkeypatch, capsys):
    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 86973087744 bytes. Error code 12"
    )
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(oom), raising=False)
    out = tmp_path / "out" / "s.nii.gz"
    status, err = run_cli(["segment", ct_file, "-o", out, "--probabilities", out], capsys)
    assert status in (1, 2)  # the same file twice is refused first
    status, err = run_cli(["segment", ct_file, "-o", out], capsys)
    assert status == 1 and "out of memory" in err and "86973087744" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(ct_file, tmp_path, monkeypatch):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(ValueError("bad")), raising=False)
    with pytest.raises(ValueError, match="bad"):
        cli.main(["--debug", "segment", str(ct_file), "-o", str(tmp_path / "s.nii.gz")])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "cannot read it as safetensors"),
        (lambda p: p.write_bytes(b""), "cannot read it as safetensors"),
        (lambda p: p.write_text("not weights"), "cannot read it as safetensors"),
    ],
    ids=["truncated", "empty", "text"],
)
def test_unreadable_model_weights(damage, expected, ct_file, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(DEFAULT_MODEL, model)
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), tmp_path / "m.json")
    damage(model)
    status, err = run_cli(
        ["segment", ct_file, "-o", tmp_path / "s.nii.gz", "--model", model], capsys
    )
    assert status == 2 and "m.safetensors" in err and expected in err
    assert not (tmp_path / "s.nii.gz").exists()


@pytest.mark.parametrize(
    "text, expected",
    [("[1, 2]", "holds a JSON list"), ("{bad", "not a readable JSON"), ("", "not a readable")],
    ids=["list", "syntax", "empty"],
)
def test_broken_model_json_names_the_file(text, expected, ct_file, tmp_path, capsys):
    shutil.copy(DEFAULT_MODEL, tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text(text)
    status, err = run_cli(
        ["segment", ct_file, "-o", tmp_path / "s.nii.gz", "--model", tmp_path / "m.json"], capsys
    )
    assert status == 2 and "m.json" in err and expected in err


@pytest.mark.parametrize(
    "content", [b"", b"garbage" * 10, b"PK\x03\x04broken"], ids=["empty", "junk", "bad-zip"]
)
def test_unreadable_training_checkpoint(content, tmp_path):
    from fastcascade.model.checkpoint import load_training_checkpoint

    path = tmp_path / "stage1.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="stage1.ckpt: cannot read it as a training checkpoint"):
        load_training_checkpoint(path)


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save([1, 2, 3], out / "stage1.ckpt")
    status, err = run_cli(["train", "--out", out, "--iterations", "1", "--resume"], capsys)
    assert status == 2 and "stage1.ckpt" in err and "expected a training checkpoint" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
        (["--threads", "0"], "expected an integer >= 1"),
    ],
    ids=["tpu", "threads-0"],
)
def test_train_argument_errors(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(tmp_path / "run"), "--iterations", "1", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda(tmp_path, capsys):
    status, err = run_cli(
        ["train", "--out", tmp_path / "run", "--iterations", "1", "--device", "cuda"], capsys
    )
    assert status == 2 and "no CUDA device is available" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------- 4. model configs checked on read


def _mutated_model(tmp_path: Path, mutate) -> Path:
    config = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    mutate(config)
    shutil.copy(DEFAULT_MODEL, tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text(json.dumps(config))
    return tmp_path / "m.safetensors"


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(config):
        d = config
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_set("body_threshold", float("nan")), "body_threshold"),
        (_set("body_threshold", 1e30), "body_threshold must lie within"),
        (_set("radius", 10**6), "radius must be at most 64"),
        (_set("stage1", "architecture", "levels", 100), "levels must be at most 8"),
        (_set("stage2", "architecture", "base_channels", 10**5), "base_channels must be at most"),
        (_set("stage1", "tile", [100000] * 3), "tile must be at most 1024"),
        (_set("spacing", [0.0, 3.0, 3.0]), "spacing must lie in"),
        (_set("stage1", "window", [-1e9, 1e9]), "window must lie within"),
        (_set("class_names", [*CLASS_NAMES[:-1], "x", "y"]), "num_classes is 11"),
        (_set("class_names", [*CLASS_NAMES[:-1], "liver"]), "repeated: ['liver']"),
        (_set("stage1", "architecture", "levels", 5), "does not match the model"),
    ],
    ids=[
        "nan-threshold",
        "huge-threshold",
        "radius",
        "levels",
        "base-channels",
        "tile",
        "zero-spacing",
        "window",
        "class-count",
        "duplicate-names",
        "weights-mismatch",
    ],
)
def test_model_configs_are_checked_when_read(mutate, expected, ct_file, tmp_path, capsys):
    model = _mutated_model(tmp_path, mutate)
    out = tmp_path / "out" / "s.nii.gz"
    status, err = run_cli(["segment", ct_file, "-o", out, "--model", model], capsys)
    assert status == 2 and expected in err
    assert not (tmp_path / "out").exists()


def test_a_tile_beyond_the_memory_limit_is_refused(ct_file, tmp_path, capsys, monkeypatch):
    model = _mutated_model(tmp_path, _set("stage1", "tile", [512, 512, 512]))
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "2G")
    status, err = run_cli(
        ["segment", ct_file, "-o", tmp_path / "s.nii.gz", "--model", model], capsys
    )
    assert status == 2 and "stage1" in err and "512×512×512" in err and "2.0 GiB" in err


# ----------------------------------------------------------- 5. all outputs or none


def test_a_failing_probabilities_write_leaves_nothing(ct_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(), raising=False)
    real_save = nifti.nib.save

    def save(img, filename):
        if "probs" in str(filename):
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(img, filename)

    monkeypatch.setattr(nifti.nib, "save", save)
    out = tmp_path / "out"
    argv = ["segment", ct_file, "-o", out / "s.nii.gz", "--probabilities", out / "probs.nii.gz"]
    status, err = run_cli(argv, capsys)
    assert status == 1 and "No space left" in err
    assert not out.exists()  # no labels, no JSON, no temporary, no folder


def test_outputs_are_written_all_with_a_marker_that_records_the_options(
    ct_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(), raising=False)
    out = tmp_path / "out"
    argv = ["segment", ct_file, "-o", out / "s.nii.gz", "--probabilities", out / "p.nii.gz"]
    status, _ = run_cli([*argv, "--no-overlap", "--quiet"], capsys)
    assert status == 0
    assert listing(out) == ["p.json", "p.nii.gz", "s.done.json", "s.json", "s.nii.gz"]
    marker = json.loads((out / "s.done.json").read_text())
    assert marker["options"]["overlap"] is False and marker["options"]["probabilities"] is True
    assert marker["input"]["size"] == ct_file.stat().st_size
    assert marker["outputs"] == ["p.json", "p.nii.gz", "s.json", "s.nii.gz"]


def test_existing_outputs_need_overwrite(ct_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastcascade, "segment", FakeSegment(), raising=False)
    out = tmp_path / "s.nii.gz"
    assert run_cli(["segment", ct_file, "-o", out, "--quiet"], capsys)[0] == 0
    before = out.read_bytes()
    status, err = run_cli(["segment", ct_file, "-o", out, "--quiet"], capsys)
    assert status == 2 and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == before
    assert run_cli(["segment", ct_file, "-o", out, "--quiet", "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("command", ["segment", "phantom", "train", "evaluate"])
def test_overwrite_is_documented_in_help(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_phantom_refuses_existing_outputs(tmp_path, capsys):
    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    ct.write_bytes(b"keep")
    status, err = run_cli(["phantom", "-o", ct, "--labels", seg, "--shape", "8", "8", "8"], capsys)
    assert status == 2 and "--overwrite" in err
    assert ct.read_bytes() == b"keep" and not seg.exists()


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".s.nii.gz.{atomic.HOST_TAG}-{pid}.0123456789ab.tmp.nii.gz"
    alive = tmp_path / f".s.json.{atomic.HOST_TAG}-{os.getpid()}.0123456789ab.tmp.json"
    other_host = tmp_path / f".s.json.ffffffff-{pid}.0123456789ab.tmp.json"
    for p in (stale, alive, other_host):
        p.write_bytes(b"x")
    nifti.write_labels(tmp_path / "s.nii.gz", np.zeros((2, 2, 2), np.uint8), AFFINE, CLASS_NAMES)
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert (tmp_path / "s.nii.gz").exists()


def test_a_failed_train_leaves_no_folder(tmp_path, capsys):
    csv = tmp_path / "cases.csv"
    csv.write_text("ct,labels\nmissing.nii.gz,missing_seg.nii.gz\n")
    out = tmp_path / "new" / "run"
    status, err = run_cli(
        ["train", "--out", out, "--iterations", "1", "--csv", csv, "--label-map", "case_a"], capsys
    )
    assert status == 2 and "missing" in err
    assert not (tmp_path / "new").exists()


def test_train_refuses_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stage1.ckpt").write_bytes(b"x")
    status, err = run_cli(["train", "--out", out, "--iterations", "1"], capsys)
    assert status == 2 and "--resume" in err and "--overwrite" in err
    assert (out / "stage1.ckpt").read_bytes() == b"x"


def test_two_processes_writing_one_output(tmp_path):
    """Both finish; the file under the name is one of theirs, whole; no temporary left."""
    script = (
        "import sys, numpy as np\n"
        "from fastcascade.io.nifti import write_labels\n"
        "from fastcascade.config import CLASS_NAMES\n"
        "v = int(sys.argv[2])\n"
        "for _ in range(5):\n"
        "    labels = np.full((40, 40, 40), v, np.uint8)\n"
        "    write_labels(sys.argv[1], labels, np.eye(4), CLASS_NAMES)\n"
    )
    out = tmp_path / "s.nii.gz"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(v)]) for v in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    values = np.unique(np.asarray(nib.load(out).dataobj))
    assert values.tolist() in ([1], [2])
    assert listing(tmp_path) == ["s.json", "s.nii.gz"]


def test_two_threads_on_one_predictor(tmp_path):
    from test_cascade import tiny_predictor

    predictor = tiny_predictor()
    scans = [ct_volume((30, 28, 24)).astype(np.float32) + 10 * k for k in range(2)]
    expected = [predictor.segment(s, spacing=(6.0,) * 3).labels for s in scans]
    got: dict[int, np.ndarray] = {}

    def work(k):
        got[k] = predictor.segment(scans[k], spacing=(6.0,) * 3).labels

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(np.array_equal(got[k], expected[k]) for k in range(2))


# ------------------------------------------------------- 6. intensities that are not HU


def test_an_8_bit_image_is_warned_about_or_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "u8.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 256, (24, 20, 16)).astype(np.uint8), AFFINE), path)
    with pytest.warns(UserWarning, match=r"no voxel below -500 HU.*\[0, 255\]|\[0, 255\].*-500"):
        load_scan(path)
    # the real segment(): --strict refuses before any work
    status, err = run_cli(
        ["segment", path, "-o", tmp_path / "t.nii.gz", "--strict", "--quiet"], capsys
    )
    assert status == 2 and "no voxel below -500 HU" in err and "[0, 255]" in err
    assert not (tmp_path / "t.nii.gz").exists()


def test_values_beyond_any_ct_range_are_warned_about():
    ct = ct_volume().astype(np.float32)
    ct[0, 0, 0] = 1e30
    with pytest.warns(UserWarning, match="beyond any CT's Hounsfield units"):
        load_scan(ct, spacing=(3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="beyond any CT"):
        load_scan(ct, spacing=(3.0, 3.0, 3.0), hu_check="error")


def test_a_ct_in_hu_raises_no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_scan(ct_volume(), spacing=(3.0, 3.0, 3.0), hu_check="error")


# --------------------------------------------------------------------- 7. small things


def test_finetune_refuses_undeclared_new_classes(tmp_path, capsys):
    csv = tmp_path / "c.csv"
    csv.write_text("ct,labels\n")
    base = ["finetune", "--model", DEFAULT_MODEL, "--csv", csv, "--out", tmp_path / "ft"]
    status, err = run_cli([*base, "--classes", "background,liver,unicorn"], capsys)
    assert status == 2 and "unicorn" in err and "--new-classes" in err
    status, err = run_cli(
        [*base, "--classes", "background,liver", "--new-classes", "liver"], capsys
    )
    assert status == 2 and "not new classes" in err
    assert not (tmp_path / "ft").exists()


def test_memory_budget_must_be_positive():
    with pytest.raises(ValueError, match="memory_budget"):
        fastcascade.InferenceOptions(memory_budget=-1)


def test_a_symlink_loop_is_not_reported_as_missing(tmp_path, capsys):
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    status, err = run_cli(["segment", tmp_path / "a.nii.gz", "-o", tmp_path / "s.nii.gz"], capsys)
    assert status == 2 and "symbolic link to nothing" in err


def test_float64_overflow_is_named(tmp_path, capsys):
    data = ct_volume().astype(np.float64)
    data[1, 1, 1] = 1e300
    path = tmp_path / "f64.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    status, err = run_cli(["segment", path, "-o", tmp_path / "s.nii.gz"], capsys)
    assert status == 2 and "1 infinite voxels" in err and "overflow float32" in err


def test_model_weights_get_the_usual_mode_and_identical_bytes(tmp_path):
    script = (
        "import os, sys\n"
        "os.umask(0o022)\n"
        "from fastcascade.model.checkpoint import load_cascade, save_cascade\n"
        "from fastcascade.api import DEFAULT_MODEL\n"
        "save_cascade(sys.argv[1], *load_cascade(DEFAULT_MODEL))\n"
    )
    digests = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True)
        weights = tmp_path / f"{name}.safetensors"
        assert weights.stat().st_mode & 0o777 == 0o644
        digests.append(hashlib.sha256(weights.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
