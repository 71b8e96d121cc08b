"""The synthetic phantom against case A's anatomy.

Reference numbers are case A's measurements as tabulated in the shared data README
(``ct/case_a``: TotalSegmentator labels of a non-contrast abdomen CT, 3 mm voxels).
In-plane centroids there are positions inside the body's bounding box (body: > -300 HU,
largest component, holes filled), 0 = patient's left / posterior, 1 = right / anterior.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from fastcascade.config import CLASS_NAMES
from fastcascade.phantom import Phantom, make_phantom

# Case A (data README): volume ml, HU mean, in-plane centroid (x, y) inside the body box.
CASE_A = {
    "liver": (1125.7, 44.5, 0.67, 0.59),
    "spleen": (261.0, 32.8, 0.18, 0.37),
    "kidney_right": (192.6, 10.7, 0.68, 0.40),
    "kidney_left": (137.4, 18.4, 0.28, 0.38),
    "pancreas": (18.8, -6.4, 0.43, 0.60),
    "stomach": (130.6, -21.7, 0.38, 0.68),
    "gallbladder": (35.6, 2.3, 0.67, 0.69),
    "aorta": (49.7, 42.1, 0.44, 0.51),
    "inferior_vena_cava": (61.2, 39.3, 0.52, 0.54),
    "portal_splenic_vein": (29.3, 35.3, 0.46, 0.60),
}
ORGANS = list(CASE_A)
# Case A's pancreas (18.8 ml) is thin and partly lost at 3 mm; a normal adult one is
# about 50-100 ml (data README), which the phantom draws instead.
PANCREAS_ML = (50.0, 100.0)
SEEDS = (0, 1, 2)
ID = {name: i for i, name in enumerate(CLASS_NAMES)}


def body_box(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Case A's body definition, recomputed independently with SciPy."""
    lab, n = ndi.label(image > -300)
    assert n > 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = ndi.binary_fill_holes(lab == sizes.argmax())
    idx = np.argwhere(body)
    return body, idx.min(0), idx.max(0)


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Phantom]:
    return {seed: make_phantom(seed=seed) for seed in SEEDS}


def test_types_and_geometry(phantoms):
    ph = phantoms[0]
    assert ph.image.dtype == np.float32 and ph.labels.dtype == np.uint8
    assert ph.image.shape == ph.labels.shape == (122, 101, 112)
    assert ph.spacing == (3.0, 3.0, 3.0)
    assert ph.affine.dtype == np.float64
    np.testing.assert_array_equal(np.diag(ph.affine)[:3], ph.spacing)
    # The field of view's centre is at the origin.
    centre = ph.affine @ np.array([*(np.array(ph.image.shape) - 1) / 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert np.isfinite(ph.image).all()
    assert set(np.unique(ph.labels)) == set(range(len(CLASS_NAMES)))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_organs_inside_body_and_in_one_piece(phantoms, seed):
    ph = phantoms[seed]
    body, _, _ = body_box(ph.image)
    for name in ORGANS:
        m = ph.labels == ID[name]
        assert m.any(), name
        assert (m & ~body).sum() == 0, f"{name} leaves the body"
        lab, n = ndi.label(m)
        largest = np.bincount(lab.ravel())[1:].max()
        assert largest >= 0.9 * m.sum(), f"{name} is fragmented ({n} pieces)"
    # Labels are one map, so disjoint by construction; the image must not call organ
    # what is air outside: no organ voxel below -300 HU apart from gas in the stomach.
    organs = (ph.labels > 0) & (ph.labels != ID["stomach"])
    assert (ph.image[organs] < -500).mean() < 0.002


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_sides_and_levels(phantoms, seed):
    ph = phantoms[seed]
    c = {n: np.argwhere(ph.labels == ID[n]).mean(0) for n in ORGANS}
    mid = (ph.image.shape[0] - 1) / 2
    # RAS: x grows towards the patient's right.
    for right in ("liver", "kidney_right", "gallbladder"):
        assert c[right][0] > mid, right
    for left in ("spleen", "kidney_left", "stomach"):
        assert c[left][0] < mid, left
    assert c["kidney_right"][0] > c["kidney_left"][0]
    assert c["inferior_vena_cava"][0] > c["aorta"][0]
    for upper in ("liver", "spleen"):
        for kidney in ("kidney_right", "kidney_left"):
            assert c[upper][2] > c[kidney][2], (upper, kidney)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", ORGANS)
def test_volume_hu_centroid_match_case_a(phantoms, seed, name):
    ph = phantoms[seed]
    ref_ml, ref_hu, ref_x, ref_y = CASE_A[name]
    m = ph.labels == ID[name]
    ml = m.sum() * np.prod(ph.spacing) / 1000.0
    if name == "pancreas":
        assert PANCREAS_ML[0] <= ml <= PANCREAS_ML[1], ml
    else:
        assert 0.5 * ref_ml <= ml <= 1.5 * ref_ml, ml
    if name != "stomach":  # its gas content varies by design
        assert abs(float(ph.image[m].mean()) - ref_hu) <= 15.0
    _, lo, hi = body_box(ph.image)
    rel = (np.argwhere(m).mean(0)[:2] - lo[:2]) / (hi[:2] - lo[:2])
    np.testing.assert_allclose(rel, (ref_x, ref_y), atol=0.15)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", ["aorta", "inferior_vena_cava", "portal_splenic_vein"])
def test_vessel_diameters(phantoms, seed, name):
    """Equivalent-circle diameter of each axial cross-section in 3-25 mm.

    The portal/splenic vein runs mostly in-plane, so its diameter is taken from the
    cross-sections across its course instead: area per slice along y (coronal).
    """
    ph = phantoms[seed]
    m = ph.labels == ID[name]
    sx, sy, sz = ph.spacing
    if name == "portal_splenic_vein":
        # Thickness in z of each (x, y) column the vein crosses: its height.
        heights = m.sum(2)[m.any(2)] * sz
        d = np.median(heights)
        assert 3.0 <= d <= 25.0, d
        return
    area = m.sum((0, 1)) * sx * sy
    area = area[area > 0][2:-2]  # the ends are cut obliquely
    d = 2.0 * np.sqrt(area / np.pi)
    assert d.min() >= 3.0 and d.max() <= 25.0, (d.min(), d.max())
    assert 12.0 <= np.median(d) <= 25.0


def test_deterministic_and_varied(phantoms):
    again = make_phantom(seed=1)
    np.testing.assert_array_equal(again.labels, phantoms[1].labels)
    np.testing.assert_array_equal(again.image, phantoms[1].image)
    a, b = phantoms[0], phantoms[1]
    assert (a.labels != b.labels).mean() > 0.005
    for name in ("liver", "spleen", "kidney_left"):
        va, vb = ((p.labels == ID[name]).sum() for p in (a, b))
        assert va != vb, name


def test_portal_venous_contrast(phantoms):
    plain = phantoms[0]
    pv = make_phantom(seed=0, contrast="portal_venous")
    np.testing.assert_array_equal(pv.labels, plain.labels)

    def mean(ph, name):
        return float(ph.image[ph.labels == ID[name]].mean())

    assert 90 <= mean(pv, "liver") <= 130 and mean(pv, "liver") > mean(plain, "liver") + 40
    for vessel in ("aorta", "portal_splenic_vein"):
        assert 120 <= mean(pv, vessel) <= 200, vessel
    for kidney in ("kidney_right", "kidney_left"):
        assert mean(pv, kidney) > mean(plain, kidney) + 60, kidney


def test_noise_flag_and_blur(phantoms):
    clean = make_phantom(seed=0, noise=False)
    noisy = phantoms[0]
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    liver = ndi.binary_erosion(clean.labels == ID["liver"], iterations=2)
    assert clean.image[liver].std() < 8.0
    assert 8.0 < noisy.image[liver].std() < 25.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "spacing",
    [(1.5, 1.5, 1.5), (2.0, 2.5, 4.0)],
    ids=["iso1.5mm", "aniso2x2.5x4mm"],
)
def test_other_grids_same_anatomy(phantoms, spacing):
    ref = phantoms[0]
    fov = np.array(ref.image.shape) * np.array(ref.spacing)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=True))
    ph = make_phantom(shape=shape, spacing=spacing, seed=0, noise=False)
    assert ph.image.shape == ph.labels.shape == shape
    for name in (
        "liver",
        "spleen",
        "kidney_right",
        "kidney_left",
        "stomach",
        "aorta",
        "inferior_vena_cava",
    ):
        v_ref = (ref.labels == ID[name]).sum() * np.prod(ref.spacing)
        v = (ph.labels == ID[name]).sum() * np.prod(spacing)
        assert abs(v / v_ref - 1.0) <= 0.10, (name, v / v_ref)
    c_ref = np.argwhere(ref.labels == ID["liver"]).mean(0) * ref.spacing
    c = np.argwhere(ph.labels == ID["liver"]).mean(0) * np.array(spacing)
    np.testing.assert_allclose(c - fov / 2, c_ref - fov / 2, atol=3.0)


def test_to_nifti_round_trip(tmp_path, phantoms):
    import nibabel as nib

    ph = phantoms[2]
    ct, seg = ph.to_nifti()
    ct.to_filename(tmp_path / "ct.nii.gz")
    seg.to_filename(tmp_path / "seg.nii.gz")
    ct2, seg2 = nib.load(tmp_path / "ct.nii.gz"), nib.load(tmp_path / "seg.nii.gz")
    assert ct2.get_data_dtype() == np.int16 and seg2.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(ct2.affine) == ("R", "A", "S")
    np.testing.assert_allclose(ct2.affine, ph.affine)
    np.testing.assert_allclose(seg2.header.get_sform(), ph.affine)
    np.testing.assert_allclose(seg2.header.get_qform(), ph.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(seg2.dataobj), ph.labels)
    hu = np.asarray(ct2.dataobj)
    assert hu.dtype == np.int16
    np.testing.assert_allclose(hu, ph.image, atol=0.5 + 1e-3)
    slope, inter = seg2.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"shape": (10, 10)}, ValueError),
        ({"shape": (10, 0, 10)}, ValueError),
        ({"spacing": (1.0, -1.0, 1.0)}, ValueError),
        ({"contrast": "arterial"}, ValueError),
        ({"seed": 1.5}, TypeError),
    ],
    ids=["2d-shape", "empty-shape", "negative-spacing", "unknown-contrast", "float-seed"],
)
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        make_phantom(**kwargs)


def test_small_and_odd_grid():
    ph = make_phantom(shape=(33, 27, 41), spacing=(11.0, 11.0, 8.0), seed=5)
    assert ph.labels.shape == (33, 27, 41)
    assert ph.labels.max() > 0 and np.isfinite(ph.image).all()


# --- the overlay picture (fastcascade.viz) ------------------------------------------------


@pytest.fixture(scope="module")
def small_phantom() -> Phantom:
    return make_phantom(shape=(61, 51, 56), spacing=(6.0, 6.0, 6.0), seed=0)


def _colourfulness(path) -> float:
    from matplotlib.image import imread

    rgb = imread(path)[..., :3].astype(np.float64)
    return float(np.abs(rgb - rgb.mean(-1, keepdims=True)).max())


def test_overlay_png_colours_labels_only(tmp_path, small_phantom):
    pytest.importorskip("matplotlib")
    from fastcascade.viz import overlay_png

    ph = small_phantom
    overlay_png(ph.image, ph.labels, tmp_path / "ov.png", ph.spacing)
    overlay_png(ph.image, np.zeros_like(ph.labels), tmp_path / "gray.png", ph.spacing)
    assert (tmp_path / "ov.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Labels add colour; without labels the slices stay gray (the legend is then empty).
    assert _colourfulness(tmp_path / "ov.png") > 0.2
    assert _colourfulness(tmp_path / "gray.png") < 0.02


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda im, lb: (im, lb[:-1]), ValueError),
        (lambda im, lb: (im, lb.astype(np.float32)), TypeError),
        (lambda im, lb: (im, np.full_like(lb, len(CLASS_NAMES))), ValueError),
        (lambda im, lb: (im[..., 0], lb[..., 0]), ValueError),
    ],
    ids=["shape-mismatch", "float-labels", "unknown-id", "2d"],
)
def test_overlay_png_rejects_bad_input(tmp_path, small_phantom, change, error):
    pytest.importorskip("matplotlib")
    from fastcascade.viz import overlay_png

    image, labels = change(small_phantom.image, small_phantom.labels)
    with pytest.raises(error):
        overlay_png(image, labels, tmp_path / "x.png", (6.0, 6.0, 6.0))
    assert not (tmp_path / "x.png").exists()


def test_overlay_png_names_the_extra_without_matplotlib(tmp_path, small_phantom, monkeypatch):
    import sys

    from fastcascade.viz import overlay_png

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    ph = small_phantom
    with pytest.raises(ImportError, match=r"pip install fastcascade\[viz\]"):
        overlay_png(ph.image, ph.labels, tmp_path / "x.png", ph.spacing)


def test_field_of_view_smaller_than_the_body_is_the_centre_of_a_full_one():
    small = make_phantom(shape=(40, 40, 40), spacing=(3.0, 3.0, 3.0), seed=4)
    full = make_phantom(shape=(122, 102, 112), spacing=(3.0, 3.0, 3.0), seed=4)
    centre = (slice(41, 81), slice(31, 71), slice(36, 76))
    np.testing.assert_array_equal(small.labels, full.labels[centre])
    np.testing.assert_array_equal(small.image, full.image[centre])
    np.testing.assert_allclose(small.affine[:3, 3], [-58.5, -58.5, -58.5])
