"""NIfTI files out and label files in (``io/nifti.py``).

Writers are checked through the raw header bytes, because nibabel turns a stored
``scl_slope`` of 1 into NaN when it loads an image.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from nifti_files import (
    RAS_AFFINE,
    SPACING,
    ct_volume,
    raw_header,
    reoriented,
    save,
    truncated,
)

from fastcascade.config import CLASS_NAMES
from fastcascade.io import nifti
from fastcascade.io.nifti import (
    read_label_names,
    read_labels,
    write_labels,
    write_probabilities,
)
from fastcascade.io.scan import Scan, load_scan

# ----------------------------------------------------------------------- writers


@pytest.fixture
def scaled_ct(tmp_path):
    """An int16 CT with scl_slope 2, stored ASR (permuted axes), qform code 0, sform code 4."""
    img = reoriented("ASR")
    img = nib.Nifti1Image((np.asarray(img.dataobj) // 2).astype(np.int16), img.affine)
    img.header.set_slope_inter(2.0, 0.0)
    img.header.set_qform(img.affine, code=0)
    img.header.set_sform(img.affine, code=4)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    return path


def of_scan(scan: Scan) -> dict:
    """The writers' geometry arguments for a ``Scan``, besides its ``input_affine``."""
    return {"header": scan.header, "input_shape": scan.input_shape, "input_path": scan.path}


def label_grid(scan: Scan, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, len(CLASS_NAMES), scan.input_shape).astype(np.uint8)


@pytest.mark.parametrize("kind", ["numpy-uint8", "tensor-int64", "numpy-int32"])
def test_write_labels_geometry_dtype_scaling_and_names(kind, scaled_ct, tmp_path):
    scan = load_scan(scaled_ct)
    assert raw_header(scaled_ct)["scl_slope"] == 2.0
    labels = label_grid(scan)
    given = {
        "numpy-uint8": labels,
        "tensor-int64": torch.from_numpy(labels.astype(np.int64)),
        "numpy-int32": labels.astype(np.int32),
    }[kind]
    out = tmp_path / "seg.nii.gz"
    write_labels(out, given, scan.input_affine, CLASS_NAMES, **of_scan(scan))

    hdr = raw_header(out)
    assert hdr.get_data_dtype() == np.uint8
    assert (hdr["scl_slope"], hdr["scl_inter"]) == (1.0, 0.0)
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 4)
    np.testing.assert_allclose(hdr.get_sform(), scan.input_affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), scan.input_affine, atol=1e-5)
    assert int(hdr["intent_code"]) == 1002  # NIFTI_INTENT_LABEL
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj), labels)
    names = json.loads((tmp_path / "seg.json").read_text())
    assert names == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    assert read_label_names(out) == CLASS_NAMES
    assert np.array_equal(read_labels(out), labels)


def test_write_labels_with_affine_and_header_keeps_codes(scaled_ct, tmp_path):
    img = nib.load(scaled_ct)
    img.header.set_qform(img.affine, code=2)
    labels = np.zeros(img.shape, np.int16)
    write_labels(tmp_path / "s.nii", labels, img.affine, ("bg", "x"), header=img.header)
    hdr = raw_header(tmp_path / "s.nii")
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 4)
    write_labels(tmp_path / "t.nii", labels, img.affine, ("bg", "x"))
    hdr = raw_header(tmp_path / "t.nii")
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 1)
    np.testing.assert_allclose(hdr.get_qform(), img.affine, atol=1e-5)
    assert json.loads((tmp_path / "t.json").read_text()) == {"0": "bg", "1": "x"}


def test_many_classes_use_uint16(tmp_path):
    names = [f"c{i}" for i in range(300)]
    labels = (np.arange(5 * 6 * 10).reshape(5, 6, 10) % 300).astype(np.int64)
    write_labels(tmp_path / "seg.nii.gz", labels, RAS_AFFINE, names)
    assert raw_header(tmp_path / "seg.nii.gz").get_data_dtype() == np.uint16
    assert np.array_equal(read_labels(tmp_path / "seg.nii.gz"), labels)
    assert read_labels(tmp_path / "seg.nii.gz").dtype == np.uint16


@pytest.mark.parametrize(
    "labels, path, error, match",
    [
        pytest.param(np.zeros((6, 7, 5), np.float32), "s.nii.gz", TypeError, "integer", id="float"),
        pytest.param(np.full((6, 7, 5), 11), "s.nii.gz", ValueError, r"\[0, 10\]", id="too-big"),
        pytest.param(np.full((6, 7, 5), -1), "s.nii.gz", ValueError, r"\[0, 10\]", id="negative"),
        pytest.param(np.zeros((6, 7, 4), np.uint8), "s.nii.gz", ValueError, "input grid", id="sh"),
        pytest.param(np.zeros((6, 7), np.uint8), "s.nii.gz", ValueError, "x, y, z", id="2d"),
        pytest.param(np.zeros((6, 7, 5), np.uint8), "s.png", ValueError, ".nii", id="suffix"),
        pytest.param([[[0]]], "s.nii.gz", TypeError, "numpy array", id="list"),
    ],
)
def test_write_labels_rejects(labels, path, error, match, tmp_path):
    scan = load_scan(ct_volume(), spacing=SPACING)
    with pytest.raises(error, match=match):
        write_labels(tmp_path / path, labels, scan.input_affine, CLASS_NAMES, **of_scan(scan))
    assert os.listdir(tmp_path) == []


def test_write_labels_checks_grid_against_header(scaled_ct, tmp_path):
    img = nib.load(scaled_ct)
    with pytest.raises(ValueError, match="input grid"):
        write_labels(
            tmp_path / "s.nii.gz",
            np.zeros((3, 3, 3), np.uint8),
            img.affine,
            CLASS_NAMES,
            header=img.header,
        )


def test_input_shape_checks_the_grid_without_a_header(tmp_path):
    labels = np.zeros((2, 3, 4), np.uint8)
    probs = np.zeros((2, 2, 3, 4), np.float32)
    with pytest.raises(
        ValueError, match=r"spatial shape \(2, 3, 4\) but the input grid is \(2, 3, 5\)"
    ):
        write_labels(tmp_path / "s.nii.gz", labels, RAS_AFFINE, "ab", input_shape=(2, 3, 5))
    with pytest.raises(ValueError, match="input grid"):
        write_probabilities(tmp_path / "p.nii.gz", probs, RAS_AFFINE, input_shape=(2, 3, 5))
    assert os.listdir(tmp_path) == []
    write_labels(tmp_path / "s.nii.gz", labels, RAS_AFFINE, "ab", input_shape=[2, 3, 4])
    write_probabilities(
        tmp_path / "p.nii.gz", probs, torch.from_numpy(RAS_AFFINE), input_shape=(2, 3, 4)
    )
    assert np.array_equal(read_labels(tmp_path / "s.nii.gz"), labels)
    np.testing.assert_allclose(raw_header(tmp_path / "p.nii.gz").get_sform(), RAS_AFFINE, atol=1e-5)


def test_input_shape_wins_over_the_header(scaled_ct, tmp_path):
    img = nib.load(scaled_ct)
    labels = np.zeros((3, 3, 3), np.uint8)
    write_labels(tmp_path / "s.nii", labels, img.affine, "ab", img.header, input_shape=(3, 3, 3))
    assert np.array_equal(read_labels(tmp_path / "s.nii"), labels)


def test_writers_take_an_affine_not_a_scan(tmp_path):
    scan = load_scan(ct_volume(), spacing=SPACING)
    with pytest.raises(TypeError, match="affine must be a 4x4 matrix .* got Scan"):
        write_labels(tmp_path / "s.nii.gz", label_grid(scan), scan, CLASS_NAMES)
    with pytest.raises(TypeError, match="affine must be a 4x4 matrix .* got Scan"):
        write_probabilities(
            tmp_path / "p.nii.gz", np.zeros((2, *scan.input_shape), np.float32), scan
        )
    assert os.listdir(tmp_path) == []


def test_writers_refuse_the_input_file(scaled_ct, tmp_path):
    before = scaled_ct.read_bytes()
    scan = load_scan(scaled_ct)
    labels = label_grid(scan)
    with pytest.raises(ValueError, match="input file"):
        write_labels(scaled_ct, labels, scan.input_affine, CLASS_NAMES, **of_scan(scan))
    with pytest.raises(ValueError, match="input file"):
        write_labels(scaled_ct, labels, scan.input_affine, CLASS_NAMES, input_path=scaled_ct)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scaled_ct)
    with pytest.raises(ValueError, match="input file"):
        write_labels(link, labels, scan.input_affine, CLASS_NAMES, **of_scan(scan))
    hard = tmp_path / "hard.nii.gz"
    os.link(scaled_ct, hard)
    with pytest.raises(ValueError, match="input file"):
        write_labels(hard, labels, scan.input_affine, CLASS_NAMES, **of_scan(scan))
    probs = np.zeros((2, *scan.input_shape), np.float32)
    with pytest.raises(ValueError, match="input file"):
        write_probabilities(tmp_path / "hard.nii.gz", probs, scan.input_affine, **of_scan(scan))
    assert scaled_ct.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "hard.nii.gz", "link.nii.gz"]


def test_missing_output_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(tmp_path / "no" / "s.nii.gz", np.zeros((2, 2, 2), np.uint8), RAS_AFFINE, "ab")


def _fail_midwrite_blob(monkeypatch, stage):
    if stage == "nifti":

        def broken_save(img, filename):
            with open(filename, "wb") as f:
                f.write(b"\x1f\x8b partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(nifti.nib, "save", broken_save)
    else:
        real_write_text = type(nifti.Path()).write_text

        def broken_write_text(self, *args, **kwargs):
            real_write_text(self, '{"0": "back')
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(type(nifti.Path()), "write_text", broken_write_text)


@pytest.mark.parametrize("stage", ["nifti", "json"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_write_leaves_no_file_and_keeps_the_old_one(stage, existing, tmp_path, monkeypatch):
    scan = load_scan(ct_volume(), spacing=SPACING)
    out = tmp_path / "seg.nii.gz"
    if existing:
        write_labels(
            out,
            np.ones(scan.input_shape, np.uint8),
            scan.input_affine,
            CLASS_NAMES,
            **of_scan(scan),
        )
        old = {p: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_midwrite_blob(monkeypatch, stage)
    with pytest.raises(OSError, match="No space left"):
        write_labels(out, label_grid(scan), scan.input_affine, CLASS_NAMES, **of_scan(scan))
    monkeypatch.undo()
    if existing:
        assert {p: p.read_bytes() for p in tmp_path.iterdir()} == old
        assert np.array_equal(read_labels(out), np.ones(scan.input_shape, np.uint8))
    else:
        assert os.listdir(tmp_path) == []


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_labels(tmp_path / "seg.nii.gz", np.zeros((2, 2, 2), np.uint8), RAS_AFFINE, "ab")
    finally:
        os.umask(umask)
    assert (tmp_path / "seg.nii.gz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "seg.json").stat().st_mode & 0o777 == 0o644


def _softmax(shape, seed=0):
    return torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), 0)


def test_write_probabilities_float32(scaled_ct, tmp_path):
    scan = load_scan(scaled_ct)
    probs = _softmax((len(CLASS_NAMES), *scan.input_shape)).numpy()
    out = tmp_path / "probs.nii.gz"
    write_probabilities(out, probs, scan.input_affine, class_names=CLASS_NAMES, **of_scan(scan))
    hdr = raw_header(out)
    assert hdr.get_data_dtype() == np.float32
    assert (hdr["scl_slope"], hdr["scl_inter"]) == (1.0, 0.0)
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 4)
    np.testing.assert_allclose(hdr.get_sform(), scan.input_affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), scan.input_affine, atol=1e-5)
    back = nib.load(out)
    assert back.shape == (*scan.input_shape, len(CLASS_NAMES))
    assert np.array_equal(np.asarray(back.dataobj), np.moveaxis(probs, 0, -1))
    assert read_label_names(out) == CLASS_NAMES


def test_write_probabilities_16_bits(tmp_path):
    scan = load_scan(ct_volume(), affine=reoriented("LPS").affine)
    probs = _softmax((3, *scan.input_shape), seed=1)
    probs[0, 0, 0, 0], probs[1, 0, 0, 0] = 1.0, 0.0
    out = tmp_path / "p.nii"
    write_probabilities(out, probs, scan.input_affine, dtype="float16", **of_scan(scan))
    hdr = raw_header(out)
    assert hdr.get_data_dtype() == np.uint16
    assert hdr["scl_slope"] == np.float32(1 / 65535) and hdr["scl_inter"] == 0
    back = nib.load(out).get_fdata()
    expected = np.moveaxis(probs.numpy(), 0, -1)
    np.testing.assert_allclose(back, expected, atol=1e-5, rtol=0)
    assert np.abs(back - expected).max() > 0  # really quantized
    assert (back[0, 0, 0, 0], back[0, 0, 0, 1]) == pytest.approx((1.0, 0.0), abs=1e-6)
    np.testing.assert_allclose(raw_header(out).get_sform(), scan.input_affine, atol=1e-5)


@pytest.mark.parametrize(
    "probs, kwargs, error, match",
    [
        pytest.param(np.zeros((2, 6, 7, 5), np.int32), {}, TypeError, "floating", id="int"),
        pytest.param(np.zeros((6, 7, 5), np.float32), {}, ValueError, "C, x, y, z", id="3d"),
        pytest.param(np.full((2, 6, 7, 5), np.nan, np.float32), {}, ValueError, "NaN", id="nan"),
        pytest.param(
            np.zeros((2, 6, 7, 5), np.float32),
            {"dtype": "float64"},
            ValueError,
            "float16",
            id="dtype",
        ),
        pytest.param(
            np.zeros((2, 6, 7, 5), np.float32),
            {"class_names": "abc"},
            ValueError,
            "channels",
            id="names",
        ),
        pytest.param(np.zeros((2, 6, 7, 6), np.float32), {}, ValueError, "input grid", id="grid"),
    ],
)
def test_write_probabilities_rejects(probs, kwargs, error, match, tmp_path):
    scan = load_scan(ct_volume(), spacing=SPACING)
    with pytest.raises(error, match=match):
        write_probabilities(
            tmp_path / "p.nii.gz", probs, scan.input_affine, **of_scan(scan), **kwargs
        )
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------- read_labels


def test_read_labels_accepts_whole_floats_and_4d_with_one_volume(tmp_path):
    ids = (np.arange(210).reshape(5, 6, 7) % 11).astype(np.float32)
    save(tmp_path / "f.nii.gz", ids[..., None])
    labels = read_labels(tmp_path / "f.nii.gz")
    assert labels.dtype == np.uint8 and np.array_equal(labels, ids)
    assert read_label_names(tmp_path / "f.nii.gz") is None


@pytest.mark.parametrize(
    "data, error, match",
    [
        pytest.param(np.full((3, 3, 3), 0.5, np.float32), ValueError, "non-integer", id="float"),
        pytest.param(np.full((3, 3, 3), -2, np.int16), ValueError, "negative", id="negative"),
        pytest.param(np.full((3, 3, 3), np.nan, np.float32), ValueError, "NaN", id="nan"),
        pytest.param(np.zeros((3, 3, 3, 2), np.uint8), ValueError, "4D", id="4d"),
        pytest.param(np.zeros((3, 3), np.uint8), ValueError, "2D", id="2d"),
    ],
)
def test_read_labels_rejects(data, error, match, tmp_path):
    path = save(tmp_path / "bad.nii.gz", data)
    with pytest.raises(error, match=match):
        read_labels(path)


def test_read_labels_on_a_truncated_file(tmp_path):
    with pytest.raises(ValueError, match="truncated") as info:
        read_labels(truncated(tmp_path, ".nii.gz", 0.5))
    assert "cut.nii.gz" in str(info.value)


def test_label_names_json_with_a_gap_is_a_value_error(tmp_path):
    (tmp_path / "seg.json").write_text(json.dumps({"0": "background", "2": "liver"}))
    with pytest.raises(ValueError, match="every id"):
        read_label_names(tmp_path / "seg.nii.gz")
