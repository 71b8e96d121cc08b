"""Scans in (``io/scan.py``): orientation, bad arrays and bad files.

Orientation is checked against nibabel's own ``as_closest_canonical`` and
``as_reoriented`` (independent oracles).
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations
from nifti_files import (
    RAS_AFFINE,
    SPACING,
    ct_volume,
    patch_pixdim,
    reoriented,
    save,
    truncated,
    write_blob,
)

from fastcascade.io.scan import load_scan

# ----------------------------------------------------------------------- orientation


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
    "truncated-gz-data": (lambda p: truncated(p, ".nii.gz", 0.5), "truncated"),
    "truncated-gz-header": (lambda p: truncated(p, ".nii.gz", 1.0), "not a readable NIfTI"),
    "truncated-nii-data": (lambda p: truncated(p, ".nii", 0.5), "truncated"),
    "empty": (lambda p: write_blob(p / "x.nii.gz", b""), "empty"),
    "text-as-nii-gz": (lambda p: write_blob(p / "x.nii.gz", b"hello\n" * 100), "not a readable"),
    "text-as-nii": (lambda p: write_blob(p / "x.nii", b"\x89PNG" + bytes(400)), "no NIfTI header"),
    "gz-of-text": (lambda p: write_blob(p / "x.nii.gz", gzip.compress(b"hi" * 300)), "no NIfTI"),
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


# ----------------------------------------------------------------------- working grid


def test_working_grid_shape_and_achieved_spacing():
    scan = load_scan(np.full((10, 9, 7), -1000.0, np.float32), spacing=(1.5, 2.0, 3.0))
    grid = scan.working_grid((3.0, 3.0, 3.0))
    assert grid.shape == (5, 6, 7)  # round(n · s / t), halves up
    assert grid.spacing == (3.0, 18.0 / 6, 3.0)  # extent / count; own spacing where unchanged
    assert grid.image().shape == (5, 6, 7) and grid.image().dtype == torch.float32


def test_working_grid_round_trip_against_numpy_oracle():
    """Oriented input: to the working grid and back equals the same steps spelled out
    with nibabel's reorientation and the resampling formula in NumPy."""
    rng = np.random.default_rng(0)
    data = rng.normal(0, 100, size=(9, 8, 6)).astype(np.float32) - 200
    affine = np.array([[0, 0, 2.0, 0], [-1.5, 0, 0, 0], [0, -2.5, 0, 0], [0, 0, 0, 1]])
    scan = load_scan(data, affine=affine)
    grid = scan.working_grid((3.0, 3.0, 3.0))
    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(data, ornt)
    assert tuple(scan.data.shape) == canonical.shape
    labels_in = rng.integers(0, 5, size=data.shape).astype(np.uint8)
    labels_can = orientations.apply_orientation(labels_in, ornt)

    def nearest(vol, shape):
        for axis, m in enumerate(shape):
            n = vol.shape[axis]
            vol = np.take(vol, [((2 * i + 1) * n) // (2 * m) for i in range(m)], axis=axis)
        return vol

    want = nearest(labels_can, grid.shape)
    got = grid.labels_from_input(torch.from_numpy(labels_in))
    np.testing.assert_array_equal(got.numpy(), want)
    back = grid.labels_to_input(got).numpy()
    inverse = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), ornt)
    np.testing.assert_array_equal(
        back, orientations.apply_orientation(nearest(want, canonical.shape), inverse)
    )
    assert back.shape == data.shape and back.dtype == np.uint8
    probs = torch.rand((3, *grid.shape))
    p_in = grid.probabilities_to_input(probs)
    assert tuple(p_in.shape) == (3, *data.shape) and p_in.dtype == torch.float32


def test_working_grid_on_the_scans_own_spacing_is_exact():
    data = torch.randn(6, 5, 4) * 50
    scan = load_scan(data, spacing=(2.0, 2.0, 2.0))
    grid = scan.working_grid((2.0, 2.0, 2.0))
    assert grid.shape == (6, 5, 4) and grid.spacing == (2.0, 2.0, 2.0)
    assert torch.equal(grid.image(), data)
    labels = torch.randint(0, 3, (6, 5, 4), dtype=torch.uint8)
    assert torch.equal(grid.labels_to_input(grid.labels_from_input(labels)), labels)
