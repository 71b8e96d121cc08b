"""Scans in (``io/scan.py``) and NIfTI files in and out (``io/nifti.py``).

Orientation is checked against nibabel's own ``as_closest_canonical`` and ``as_reoriented``
(independent oracles); writers are checked through the raw header bytes, because nibabel
turns a stored ``scl_slope`` of 1 into NaN when it loads an image.
"""

from __future__ import annotations

import gzip
import json
import os
import struct

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations

from fastcascade.config import CLASS_NAMES
from fastcascade.io import nifti
from fastcascade.io.nifti import (
    read_label_names,
    read_labels,
    write_labels,
    write_probabilities,
)
from fastcascade.io.scan import Scan, load_scan

SPACING = (1.5, 2.0, 3.0)
RAS_AFFINE = np.array(
    [[1.5, 0, 0, -10.0], [0, 2.0, 0, 20.0], [0, 0, 3.0, 30.0], [0, 0, 0, 1]], dtype=np.float64
)


def ct_volume(shape=(6, 7, 5), seed=0) -> np.ndarray:
    """A small int16 'CT': air, soft tissue and bone values, hundreds of distinct values."""
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def save(path, data, affine=RAS_AFFINE, **fields):
    img = nib.Nifti1Image(data, affine)
    for key, value in fields.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def raw_header(path) -> nib.Nifti1Header:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(f, check=False)


def patch_pixdim(path, values):
    """Overwrite pixdim[1:4] in the stored header (nibabel would 'fix' it on save)."""
    gz = str(path).endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    data[80:92] = struct.pack("<3f", *values)  # pixdim is float32[8] at byte 76
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


# ----------------------------------------------------------------------- orientation


def reoriented(axcodes):
    """The RAS test image re-stored with axes ``axcodes``, by nibabel itself."""
    ras = nib.Nifti1Image(ct_volume(), RAS_AFFINE)
    ornt = orientations.ornt_transform(
        orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(axcodes)
    )
    img = ras.as_reoriented(ornt)
    assert nib.aff2axcodes(img.affine) == tuple(axcodes)
    return img


def lps_by_hand():
    """LPS written out by hand: x and y reversed, affine adjusted so world points agree."""
    data = ct_volume()[::-1, ::-1, :].copy()
    nx, ny = data.shape[:2]
    affine = RAS_AFFINE.copy()
    affine[0, 0], affine[1, 1] = -1.5, -2.0
    affine[0, 3] = RAS_AFFINE[0, 3] + 1.5 * (nx - 1)
    affine[1, 3] = RAS_AFFINE[1, 3] + 2.0 * (ny - 1)
    return nib.Nifti1Image(data, affine)


def oblique():
    """10 degrees about z: not axis-aligned; the closest canonical axes are the RAS ones."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = RAS_AFFINE.copy()
    affine[:3, :3] = rot @ np.diag(SPACING)
    return nib.Nifti1Image(ct_volume(), affine)


VARIANTS = {
    "RAS": lambda: nib.Nifti1Image(ct_volume(), RAS_AFFINE),
    "LPS": lambda: reoriented("LPS"),
    "LPS-by-hand": lps_by_hand,
    "ASR-permuted": lambda: reoriented("ASR"),
    "ILP-permuted-flipped": lambda: reoriented("ILP"),
}


def as_input(img, kind, tmp_path):
    data = np.asarray(img.dataobj)
    if kind == "path":
        return (save(tmp_path / "ct.nii.gz", data, img.affine),), {}
    if kind == "image":
        return (img,), {}
    if kind == "numpy":
        return (data,), {"affine": img.affine}
    return (torch.from_numpy(data.copy()),), {"affine": img.affine}


@pytest.mark.parametrize("kind", ["path", "image", "numpy", "tensor"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_orientation_gives_the_ras_original_and_inverts_exactly(variant, kind, tmp_path):
    img = VARIANTS[variant]()
    args, kwargs = as_input(img, kind, tmp_path)
    scan = load_scan(*args, **kwargs)

    ras = torch.from_numpy(ct_volume().astype(np.float32))
    assert scan.data.dtype == torch.float32
    assert torch.equal(scan.data, ras)
    oracle = nib.as_closest_canonical(img)
    assert np.array_equal(scan.data.numpy(), oracle.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(scan.affine, oracle.affine, atol=1e-6)
    np.testing.assert_allclose(scan.affine, RAS_AFFINE, atol=1e-6)
    assert scan.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(scan.input_affine, img.affine, atol=1e-6)
    assert scan.input_shape == img.shape

    original = np.asarray(img.dataobj).astype(np.float32)
    assert torch.equal(scan.to_input_grid(scan.data), torch.from_numpy(original))
    stacked = torch.stack([scan.data, scan.data + 1.0, -scan.data])[None]  # (1, 3, x, y, z)
    back = scan.to_input_grid(stacked)
    assert back.shape == (1, 3, *img.shape)
    assert torch.equal(back[0, 1], torch.from_numpy(original) + 1.0)
    assert torch.equal(back[0, 2], -torch.from_numpy(original))
    assert torch.equal(scan.from_input_grid(back), stacked)


def test_oblique_matches_nibabel_canonical():
    img = oblique()
    scan = load_scan(img)
    oracle = nib.as_closest_canonical(img)
    assert np.array_equal(scan.data.numpy(), oracle.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(scan.affine, oracle.affine, atol=1e-9)
    assert scan.spacing == pytest.approx(SPACING)


def test_world_coordinates_of_a_voxel_survive_reorientation():
    """A bright voxel lands at the same mm position whatever order the input used."""
    data = np.full((6, 7, 5), -1000, np.int16)
    data[1, 5, 3] = 1000
    ras = nib.Nifti1Image(data, RAS_AFFINE)
    target = RAS_AFFINE @ [1, 5, 3, 1]
    for codes in ("LPS", "SAL", "PIR"):
        ornt = orientations.ornt_transform(
            orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(codes)
        )
        scan = load_scan(ras.as_reoriented(ornt))
        idx = np.argwhere(scan.data.numpy() == 1000)[0]
        np.testing.assert_allclose(scan.affine @ [*idx, 1], target, atol=1e-9)


def test_ras_inputs_are_not_copied():
    arr = ct_volume().astype(np.float32)
    scan = load_scan(arr, spacing=SPACING)
    assert np.shares_memory(scan.data.numpy(), arr)
    t = torch.from_numpy(arr.copy())
    assert load_scan(t, spacing=SPACING).data.data_ptr() == t.data_ptr()
    assert load_scan(arr, spacing=SPACING).affine.tolist() == np.diag([*SPACING, 1]).tolist()


def test_to_input_grid_rejects_wrong_shapes():
    scan = load_scan(ct_volume(), spacing=SPACING)
    with pytest.raises(ValueError, match="canonical grid"):
        scan.to_input_grid(torch.zeros(6, 7, 4))
    with pytest.raises(ValueError, match="canonical grid"):
        scan.to_input_grid(torch.zeros(6, 7))
    with pytest.raises(TypeError, match="torch.Tensor"):
        scan.to_input_grid(np.zeros((6, 7, 5)))


# ----------------------------------------------------------------------- bad arrays


def test_4d_with_one_volume_is_a_3d_scan():
    arr = ct_volume()
    scan = load_scan(arr[..., None], spacing=SPACING)
    assert scan.input_shape == arr.shape
    assert torch.equal(scan.data, torch.from_numpy(arr.astype(np.float32)))


@pytest.mark.parametrize(
    "volume, kwargs, error, match",
    [
        pytest.param(np.zeros((6, 7), np.int16), {}, ValueError, "2D", id="2d"),
        pytest.param(ct_volume((4, 4, 4, 2)), {}, ValueError, "4D", id="4d-series"),
        pytest.param(ct_volume((0, 4, 4)), {}, ValueError, "at least 1 voxel", id="empty-axis"),
        pytest.param(np.zeros((2, 3, 4, 1, 5)), {}, ValueError, "5D", id="5d"),
        pytest.param(ct_volume(), {"spacing": None}, ValueError, "spacing", id="no-geometry"),
        pytest.param(ct_volume(), {"spacing": (1, 1)}, ValueError, "3 positive", id="2-spacings"),
        pytest.param(ct_volume(), {"spacing": (0, 1, 1)}, ValueError, "positive", id="zero-sp"),
        pytest.param(ct_volume(), {"spacing": (-1, 1, 1)}, ValueError, "positive", id="neg-sp"),
        pytest.param(ct_volume(), {"spacing": (np.nan, 1, 1)}, ValueError, "finite", id="nan-sp"),
        pytest.param(ct_volume(), {"spacing": (np.inf, 1, 1)}, ValueError, "finite", id="inf-sp"),
        pytest.param(ct_volume(), {"spacing": ("a", 1, 1)}, TypeError, "3 numbers", id="str-sp"),
        pytest.param(
            ct_volume(),
            {"spacing": SPACING, "affine": RAS_AFFINE},
            ValueError,
            "not both",
            id="spacing-and-affine",
        ),
        pytest.param(ct_volume(), {"affine": np.eye(3)}, ValueError, r"\(4, 4\)", id="aff-3x3"),
        pytest.param(
            ct_volume(), {"affine": np.diag([1, 0, 1, 1])}, ValueError, "singular", id="aff-sing"
        ),
        pytest.param(
            ct_volume(), {"affine": np.full((4, 4), np.nan)}, ValueError, "NaN", id="aff-nan"
        ),
        pytest.param(
            ct_volume(), {"affine": np.ones((4, 4))}, ValueError, "last row", id="aff-last-row"
        ),
        pytest.param(np.zeros((4, 4, 4), bool), {}, TypeError, "bool", id="bool"),
        pytest.param(np.zeros((4, 4, 4), complex), {}, TypeError, "complex", id="complex"),
        pytest.param(np.zeros((4, 4, 4), object), {}, TypeError, "object", id="object"),
        pytest.param(np.zeros((4, 4, 4), "U1"), {}, TypeError, "expected integer", id="str"),
        pytest.param([[[0.0]]], {}, TypeError, "numpy array", id="list"),
    ],
)
def test_bad_arrays(volume, kwargs, error, match):
    if "affine" not in kwargs:
        kwargs = {"spacing": SPACING, **kwargs}
    with pytest.raises(error, match=match):
        load_scan(volume, **kwargs)


@pytest.mark.parametrize(
    "volume, error, match",
    [
        pytest.param(torch.zeros(4, 4, 4, dtype=torch.bool), TypeError, "bool", id="bool"),
        pytest.param(torch.zeros(4, 4, 4, dtype=torch.complex64), TypeError, "complex", id="cplx"),
        pytest.param(torch.zeros(4, 4), ValueError, "2D", id="2d"),
        pytest.param(torch.zeros(2, 4, 4, 4), ValueError, "4D", id="leading-batch"),
    ],
)
def test_bad_tensors(volume, error, match):
    with pytest.raises(error, match=match):
        load_scan(volume, spacing=SPACING)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_non_finite_voxels(bad, kind):
    arr = ct_volume().astype(np.float32)
    arr[2, 3, 1] = bad
    arr[0, 0, 0] = bad
    volume = arr if kind == "numpy" else torch.from_numpy(arr)
    word = "NaN" if np.isnan(bad) else "infinite"
    with pytest.raises(ValueError, match=rf"has {2 if word == 'NaN' else 0} NaN.*expected finite"):
        load_scan(volume, spacing=SPACING)
    with pytest.raises(ValueError, match=word):
        load_scan(volume, spacing=SPACING)


@pytest.mark.parametrize(
    "volume",
    [
        pytest.param(np.arange(64).reshape(4, 4, 4) % 11, id="int64-0..10"),
        pytest.param((np.arange(64).reshape(4, 4, 4) % 11).astype(np.uint8), id="uint8"),
        pytest.param((np.arange(64).reshape(4, 4, 4) % 3).astype(np.float32), id="float-ids"),
        pytest.param(torch.arange(64).reshape(4, 4, 4) % 2, id="tensor-binary-mask"),
        pytest.param(np.arange(1000).reshape(10, 10, 10) % 128 * 7, id="128-sparse-ids"),
    ],
)
def test_label_maps_are_refused(volume):
    with pytest.raises(ValueError, match="label map"):
        load_scan(volume, spacing=SPACING)


@pytest.mark.parametrize(
    "volume",
    [
        pytest.param(ct_volume(), id="ct-int16"),
        pytest.param(np.full((4, 4, 4), -1000.0), id="all-air"),
        pytest.param(np.zeros((4, 4, 4), np.uint8), id="uniform-zero"),
        pytest.param(np.arange(1000).reshape(10, 10, 10) % 129, id="129-values"),
        pytest.param(np.arange(64).reshape(4, 4, 4) * 0.5, id="non-integer"),
        pytest.param(
            np.random.default_rng(1).integers(0, 4096, (16, 16, 16)).astype(np.uint16),
            id="raw-unsigned-ct",
        ),
    ],
)
def test_ct_like_volumes_are_accepted(volume):
    scan = load_scan(volume, spacing=SPACING)
    assert torch.equal(scan.data, torch.from_numpy(np.asarray(volume, np.float32)))


def test_geometry_arguments_with_a_file_are_refused(tmp_path):
    path = save(tmp_path / "ct.nii.gz", ct_volume())
    with pytest.raises(ValueError, match="its own geometry"):
        load_scan(path, spacing=SPACING)
    with pytest.raises(ValueError, match="its own geometry"):
        load_scan(nib.load(path), affine=RAS_AFFINE)


# ----------------------------------------------------------------------- bad files


def test_file_scaling_is_applied(tmp_path):
    raw = np.random.default_rng(2).integers(0, 3000, (5, 6, 7)).astype(np.uint16)
    img = nib.Nifti1Image(raw, RAS_AFFINE)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    scan = load_scan(tmp_path / "ct.nii.gz")
    assert torch.equal(scan.data, torch.from_numpy(raw.astype(np.float32) - 1024.0))
    assert scan.path == tmp_path / "ct.nii.gz"
    assert isinstance(scan.header, nib.Nifti1Header)


def test_4d_file_with_one_volume_loads_like_3d(tmp_path):
    data = ct_volume()
    scan3 = load_scan(save(tmp_path / "a.nii.gz", data))
    scan4 = load_scan(save(tmp_path / "b.nii.gz", data[..., None]))
    assert scan4.input_shape == data.shape
    assert torch.equal(scan3.data, scan4.data)


def _write(path, blob: bytes):
    path.write_bytes(blob)
    return path


def _truncated(tmp_path, suffix, keep):
    data = np.random.default_rng(3).integers(-1024, 2000, (32, 32, 32)).astype(np.int16)
    path = save(tmp_path / f"full{suffix}", data)
    blob = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(blob[: int(len(blob) * keep)] if keep < 1 else blob[:10])
    return cut


BAD_FILES = {
    "2d": (lambda p: save(p / "x.nii.gz", np.zeros((6, 7), np.int16)), "2D"),
    "4d-series": (lambda p: save(p / "x.nii.gz", ct_volume((4, 4, 4, 2))), "4D"),
    "nan": (
        lambda p: save(p / "x.nii.gz", np.where(ct_volume() > 0, np.nan, -5).astype(np.float32)),
        "NaN",
    ),
    "zero-pixdim": (
        lambda p: patch_pixdim(save(p / "x.nii.gz", ct_volume()), (0.0, 2.0, 3.0)),
        "pixdim",
    ),
    "zero-pixdim-no-sform": (
        lambda p: patch_pixdim(save(p / "x.nii", ct_volume(), sform_code=0), (1.0, 0.0, 3.0)),
        "pixdim",
    ),
    "negative-pixdim": (
        lambda p: patch_pixdim(save(p / "x.nii", ct_volume()), (-1.5, 2.0, 3.0)),
        "pixdim",
    ),
    "nan-pixdim": (
        lambda p: patch_pixdim(save(p / "x.nii", ct_volume()), (np.nan, 2.0, 3.0)),
        "pixdim",
    ),
    "truncated-gz-data": (lambda p: _truncated(p, ".nii.gz", 0.5), "truncated"),
    "truncated-gz-header": (lambda p: _truncated(p, ".nii.gz", 1.0), "not a readable NIfTI"),
    "truncated-nii-data": (lambda p: _truncated(p, ".nii", 0.5), "truncated"),
    "empty": (lambda p: _write(p / "x.nii.gz", b""), "empty"),
    "text-as-nii-gz": (lambda p: _write(p / "x.nii.gz", b"hello\n" * 100), "not a readable"),
    "text-as-nii": (lambda p: _write(p / "x.nii", b"\x89PNG" + bytes(400)), "no NIfTI header"),
    "gz-of-text": (lambda p: _write(p / "x.nii.gz", gzip.compress(b"hi" * 300)), "no NIfTI"),
    "folder": (lambda p: (p / "x.nii.gz").mkdir() or p / "x.nii.gz", "folder"),
    "label-map": (
        lambda p: save(p / "x.nii.gz", (np.arange(210).reshape(5, 6, 7) % 11).astype(np.uint8)),
        "label map",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_name_the_problem_and_the_file(case, tmp_path):
    make, match = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        load_scan(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_scan(tmp_path / "nope.nii.gz")


def test_case_a_matches_nibabel(case_a_paths):
    ct_path, _ = case_a_paths
    scan = load_scan(ct_path)
    oracle = nib.as_closest_canonical(nib.load(ct_path))
    assert torch.equal(scan.data, torch.from_numpy(oracle.get_fdata(dtype=np.float32)))
    assert scan.spacing == (3.0, 3.0, 3.0)
    assert scan.input_shape == oracle.shape == (122, 101, 112)
    np.testing.assert_allclose(scan.affine, oracle.affine)
    assert scan.header is not None and scan.path == ct_path


def test_case_a_labels_are_refused_as_a_ct(case_a_paths):
    _, seg_path = case_a_paths
    with pytest.raises(ValueError, match="label map") as info:
        load_scan(seg_path)
    assert str(seg_path) in str(info.value)


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
    write_labels(out, given, scan, CLASS_NAMES)

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
        write_labels(tmp_path / path, labels, scan, CLASS_NAMES)
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


def test_writers_refuse_the_input_file(scaled_ct, tmp_path):
    before = scaled_ct.read_bytes()
    scan = load_scan(scaled_ct)
    labels = label_grid(scan)
    with pytest.raises(ValueError, match="input file"):
        write_labels(scaled_ct, labels, scan, CLASS_NAMES)
    with pytest.raises(ValueError, match="input file"):
        write_labels(scaled_ct, labels, scan.input_affine, CLASS_NAMES, input_path=scaled_ct)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scaled_ct)
    with pytest.raises(ValueError, match="input file"):
        write_labels(link, labels, scan, CLASS_NAMES)
    hard = tmp_path / "hard.nii.gz"
    os.link(scaled_ct, hard)
    with pytest.raises(ValueError, match="input file"):
        write_labels(hard, labels, scan, CLASS_NAMES)
    probs = np.zeros((2, *scan.input_shape), np.float32)
    with pytest.raises(ValueError, match="input file"):
        write_probabilities(tmp_path / "hard.nii.gz", probs, scan)
    assert scaled_ct.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "hard.nii.gz", "link.nii.gz"]


def test_missing_output_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(tmp_path / "no" / "s.nii.gz", np.zeros((2, 2, 2), np.uint8), RAS_AFFINE, "ab")


def _fail_mid_write(monkeypatch, stage):
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
        write_labels(out, np.ones(scan.input_shape, np.uint8), scan, CLASS_NAMES)
        old = {p: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_mid_write(monkeypatch, stage)
    with pytest.raises(OSError, match="No space left"):
        write_labels(out, label_grid(scan), scan, CLASS_NAMES)
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
    write_probabilities(out, probs, scan, class_names=CLASS_NAMES)
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
    write_probabilities(out, probs, scan, dtype="float16")
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
        write_probabilities(tmp_path / "p.nii.gz", probs, scan, **kwargs)
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
        read_labels(_truncated(tmp_path, ".nii.gz", 0.5))
    assert "cut.nii.gz" in str(info.value)


def test_label_names_json_with_a_gap_is_a_value_error(tmp_path):
    (tmp_path / "seg.json").write_text(json.dumps({"0": "background", "2": "liver"}))
    with pytest.raises(ValueError, match="every id"):
        read_label_names(tmp_path / "seg.nii.gz")
