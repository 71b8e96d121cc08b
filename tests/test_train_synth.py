"""Images synthesized from label maps: determinism, labels untouched by the intensity
steps, one intensity distribution per structure as drawn, air and body on their sides of
the body threshold, the acquisition resolution on the same grid."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import CASE_A_NAMES, CASE_E_CT, CASE_E_NAMES, CASE_E_SEG
from scipy import ndimage

from fastcascade.io.structures import read_structure_names
from fastcascade.ops.morphology import body_mask
from fastcascade.ops.warp import warp_ref
from fastcascade.train.repaint import PHASE_HU
from fastcascade.train.synth import (
    KIND_PRIORS,
    SynthParams,
    deformation_coordinates,
    draw_params,
    structure_kind,
    synthesize,
    tissue_classes,
)

NAMES = {
    5: "liver",
    6: "stomach",
    11: "lung_lower_lobe_left",
    31: "vertebrae_L1",
    52: "aorta",
    88: "iliopsoas_left",
    4: "gallbladder",  # named, absent from the map
}
SPACING = (1.5, 1.5, 2.0)

#: Every step that is not the Gaussian mixture switched off.
PLAIN = dict(
    deform=False,
    blur_sigma_mm=(0.0, 0.0),
    max_bias_mult=0.0,
    max_bias_add_hu=0.0,
    noise_std_hu=(0.0, 0.0),
    slice_thickness_mm=(0.5, 0.5),  # finer than the grid: nothing to simulate
    p_inplane=0.0,
    p_random=0.0,
)


def _scan():
    """A 28 x 24 x 12 body in air: fat, soft tissue and a dense spot in label 0, a liver,
    an aorta, a vertebra, a psoas, a lung base and a stomach with a gas pocket."""
    g = torch.Generator().manual_seed(0)
    shape = (28, 24, 12)
    hu = torch.full(shape, -1000.0)
    labels = torch.zeros(shape, dtype=torch.uint8)
    hu[3:25, 3:21, :] = -100.0 + 10.0 * torch.randn(22, 18, 12, generator=g)  # fat
    hu[3:25, 3:6, :] = 45.0  # a slab of unlabelled muscle (the wall)
    hu[12:14, 8:10, :] = 500.0  # an unlabelled calcification
    boxes = {
        5: np.s_[4:12, 10:20, 1:11],
        52: np.s_[13:16, 12:15, 0:12],
        31: np.s_[12:17, 6:10, 0:12],
        88: np.s_[18:22, 7:11, 2:10],
        11: np.s_[16:24, 14:20, 8:12],
        6: np.s_[18:24, 14:20, 1:7],
    }
    base = {5: 50.0, 52: 40.0, 31: 250.0, 88: 45.0, 11: -850.0, 6: 20.0}
    for sid, box in boxes.items():
        labels[box] = sid
        hu[box] = base[sid]
    hu[20:23, 16:19, 2:5] = -900.0  # gas in the stomach
    return labels, hu


def _params(**kw):
    return SynthParams(**{**PLAIN, **kw})


def test_a_seed_gives_the_same_image_twice():
    labels, hu = _scan()
    a = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(11))
    b = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(11))
    c = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.float32 and a[0].shape == labels.shape
    assert a[1].dtype == labels.dtype and torch.isfinite(a[0]).all()


def test_without_deformation_the_labels_are_the_input():
    labels, hu = _scan()
    image, out = synthesize(labels, hu, SPACING, NAMES, torch.Generator(), params=_params())
    assert out is labels
    # All other steps on: the labels still come back untouched.
    full = SynthParams(deform=False, p_random=0.5)
    _, out = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(1), params=full)
    assert torch.equal(out, labels)


def test_the_labels_are_the_deformed_map():
    labels, hu = _scan()
    params = SynthParams(max_rotation_deg=8.0, max_displacement=2.0, grid_spacing=8.0)
    _, out = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(3), params=params)
    draw = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(3), params)
    coords = deformation_coordinates(labels.shape, draw, params.grid_spacing)
    _, expected = warp_ref(torch.zeros(1, *labels.shape), labels, coords)
    assert torch.equal(out, expected)
    assert not torch.equal(out, labels)
    # Independent oracle: SciPy's nearest-neighbour sampling at the same positions.
    oracle = ndimage.map_coordinates(
        labels.numpy(), coords.double().numpy(), order=0, mode="grid-constant", cval=0
    )
    assert np.array_equal(oracle, out.numpy())
    assert set(np.unique(out.numpy())) <= set(np.unique(labels.numpy()))


def test_each_structure_follows_its_drawn_distribution():
    labels, hu = _scan()
    params = _params()
    image, _ = synthesize(
        labels, hu, SPACING, NAMES, torch.Generator().manual_seed(5), params=params
    )
    draw = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(5), params)
    lab, img, h = labels.numpy(), image.numpy().astype(np.float64), hu.numpy()
    means = {}
    for k, c in enumerate(draw.classes):
        if c.label == 0:
            continue
        mask = lab == c.label
        if c.part == "all" and c.kind == "bowel":
            mask &= h > params.split_hu
        elif c.part == "gas":
            mask &= h <= params.split_hu
        if not mask.any():
            assert c.label == 4  # the named gallbladder is absent
            continue
        values = img[mask]
        n = values.size
        assert values.mean() == pytest.approx(draw.means[k], abs=5 * draw.stds[k] / n**0.5 + 1e-3)
        assert values.std() == pytest.approx(draw.stds[k], rel=0.25, abs=0.5)
        if c.part == "all":
            prior, _ = KIND_PRIORS[c.kind]
            lo, hi = PHASE_HU[draw.phase][c.kind] if prior is None else prior
            assert lo <= draw.means[k] <= hi, c
            means[c.label] = values.mean()
    # Every structure its own distribution: the means differ pairwise.
    vals = sorted(means.values())
    assert len(vals) == 6 and min(np.diff(vals)) > 0.5


def test_fully_random_intensities_stay_in_their_ranges():
    labels, hu = _scan()
    params = _params(p_random=1.0, random_mean_hu=(-200.0, 500.0), random_std_hu=(0.0, 5.0))
    draw = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(2), params)
    for c, m, s in zip(draw.classes, draw.means, draw.stds, strict=True):
        lo, hi = params.random_air_mean_hu if c.side == "air" else params.random_mean_hu
        assert lo <= m <= hi and 0.0 <= s <= 5.0
    prior = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(2), _params())
    assert prior.means != draw.means


@pytest.mark.parametrize("seed", range(4))
def test_air_and_body_stay_on_their_sides(seed):
    # Everything on, including fully random intensities for half of the classes.
    labels, hu = _scan()
    params = SynthParams(p_random=0.5, grid_spacing=8.0, noise_std_hu=(20.0, 60.0))
    image, out = synthesize(
        labels, hu, SPACING, NAMES, torch.Generator().manual_seed(seed), params=params
    )
    draw = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(seed), params)
    coords = deformation_coordinates(labels.shape, draw, params.grid_spacing)
    warped, _ = warp_ref(hu[None], None, coords)
    background = out == 0
    air = background & (warped[0] <= -300.0)
    body = background & (warped[0] > -300.0)
    assert air.any() and body.any()
    assert image[air].max() <= -500.0
    assert image[body].min() > -300.0
    assert image.min() >= -1024.0
    # Lung and stomach gas are air-side structures, the other structures tissue-side.
    assert image[out == 11].max() <= -500.0
    assert image[(out == 31) | (out == 5) | (out == 88)].min() > -300.0


def test_body_mask_is_kept():
    labels, hu = _scan()
    for seed in range(3):
        params = SynthParams(deform=False, p_random=0.5)
        image, _ = synthesize(
            labels, hu, SPACING, NAMES, torch.Generator().manual_seed(seed), params=params
        )
        assert torch.equal(body_mask(image), body_mask(hu))


def test_gas_in_the_bowel_stays_gas():
    labels, hu = _scan()
    image, _ = synthesize(labels, hu, SPACING, NAMES, torch.Generator().manual_seed(0))
    classes = [c.part for c in tissue_classes(NAMES, has_hu=True) if c.label == 6]
    assert classes == ["all", "gas"]
    params = _params(noise_std_hu=(30.0, 30.0), blur_sigma_mm=(1.0, 1.0))
    image, _ = synthesize(
        labels, hu, SPACING, NAMES, torch.Generator().manual_seed(0), params=params
    )
    gas = (labels == 6) & (hu <= -300)
    assert image[gas].max() <= -500.0
    assert image[(labels == 6) & ~gas].min() > -300.0


def test_without_original_hu_label_zero_is_split_by_the_labels():
    # A ring of labelled muscle around unlabelled tissue, in air: inside the ring is body.
    labels = torch.zeros(20, 20, 6, dtype=torch.int16)
    labels[3:17, 3:17, :] = 88
    labels[6:14, 6:14, :] = 0
    names = {88: "iliopsoas_left"}
    image, out = synthesize(
        labels, None, (1.0, 1.0, 1.0), names, torch.Generator(), params=_params()
    )
    assert out is labels
    assert image[6:14, 6:14, :].min() > -300.0
    assert image[:3].max() <= -500.0 and image[:, :3].max() <= -500.0
    assert [c.part for c in tissue_classes(names, has_hu=False)] == ["air", "body", "all"]
    deformed, out = synthesize(labels, None, (1.0, 1.0, 1.0), names, torch.Generator())
    assert deformed.shape == labels.shape and out.dtype == torch.int16


def _centroid_z(image, mask):
    w = image.clamp(min=0.0) * mask
    z = torch.arange(image.shape[2], dtype=torch.float64)
    return float((w.double().sum(dim=(0, 1)) * z).sum() / w.double().sum())


@pytest.mark.parametrize("thickness", [3.0, 5.0])
def test_resolution_keeps_the_grid(thickness):
    # Thick slices blur along z only, on the same grid: shape unchanged, a structure's
    # intensity-weighted centre stays put, edges along z get softer and those in-plane
    # stay as sharp; an in-plane resolution softens x and y. Piecewise-constant classes
    # (std 0) so that only edges make the image rough.
    labels, hu = _scan()
    spacing = (1.0, 1.0, 1.0)
    flat = dict(p_random=1.0, random_std_hu=(0.0, 0.0))
    fine = _params(**flat)
    thick = _params(**flat, slice_thickness_mm=(thickness, thickness))
    inplane = dataclasses.replace(thick, p_inplane=1.0, inplane_mm=(3.0, 3.0))
    a, b, c = (
        synthesize(labels, hu, spacing, NAMES, torch.Generator().manual_seed(7), params=p)[0]
        for p in (fine, thick, inplane)
    )
    assert a.shape == b.shape == c.shape == labels.shape
    bright = torch.zeros(labels.shape, dtype=torch.bool)
    bright[10:18, 4:12, :] = True  # around the vertebra and aorta, full z
    assert _centroid_z(b, bright) == pytest.approx(_centroid_z(a, bright), abs=0.3)

    def roughness(img, axis):
        return float(img.diff(dim=axis).abs().mean())

    assert roughness(b, 2) < 0.6 * roughness(a, 2)
    for axis in (0, 1):
        assert roughness(b, axis) == pytest.approx(roughness(a, axis), rel=0.05)
        assert roughness(c, axis) < 0.8 * roughness(b, axis)


def test_noise_and_bias_are_as_drawn():
    labels, hu = _scan()
    flat = dict(p_random=1.0, random_mean_hu=(40.0, 40.0), random_std_hu=(0.0, 0.0))
    params = _params(**flat, noise_std_hu=(10.0, 30.0))
    image, _ = synthesize(
        labels, hu, SPACING, NAMES, torch.Generator().manual_seed(4), params=params
    )
    draw = draw_params(labels.shape, NAMES, torch.Generator().manual_seed(4), params)
    tissue = (labels == 5) | (labels == 31) | (labels == 52) | (labels == 88)
    assert float((image[tissue] - 40.0).std()) == pytest.approx(draw.noise_std_hu, rel=0.1)
    params = _params(**flat, max_bias_mult=0.05, max_bias_add_hu=10.0)
    image, _ = synthesize(
        labels, hu, SPACING, NAMES, torch.Generator().manual_seed(4), params=params
    )
    dev = (image[tissue] - 40.0).abs()
    assert 0.5 < float(dev.max()) <= 1040.0 * 0.05 + 10.0 + 1e-3
    # Smooth: neighbouring voxels differ far less than the field's range.
    inner = image[4:12, 10:20, 1:11]  # inside the liver
    assert float(inner.diff(dim=0).abs().max()) < 0.25 * float(dev.max()) + 1e-3


@pytest.mark.parametrize(
    "name,kind",
    [
        ("liver", "liver"),
        ("kidney_left", "kidney"),
        ("portal_vein_and_splenic_vein", "portal_vein"),
        ("lung_upper_lobe_right", "lung"),
        ("trachea", "air"),
        ("heart", "heart"),
        ("small_bowel", "bowel"),
        ("esophagus", "bowel"),
        ("urinary_bladder", "fluid"),
        ("kidney_cyst_right", "fluid"),
        ("costal_cartilages", "cartilage"),
        ("rib_left_3", "bone"),
        ("hip_right", "bone"),
        ("sacrum", "bone"),
        ("gluteus_medius_left", "muscle"),
        ("autochthon_right", "muscle"),
        ("spinal_cord", "cns"),
        ("thyroid_gland", "organ"),
        ("prostate", "organ"),
    ],
)
def test_structure_kind(name, kind):
    assert structure_kind(name) == kind


def test_priors_cover_every_kind_and_keep_sides():
    for kind, (mean, std) in KIND_PRIORS.items():
        assert std[0] >= 0 and std[0] <= std[1], kind
        if mean is not None:
            assert mean[0] <= mean[1]
            if kind not in ("air", "lung"):
                assert mean[0] > -300.0, kind  # tissue kinds sit above the body threshold
            else:
                assert mean[1] < -500.0, kind


def test_input_errors():
    labels, hu = _scan()
    g = torch.Generator()
    with pytest.raises(ValueError, match="no name"):
        synthesize(labels, hu, SPACING, {5: "liver"}, g)
    with pytest.raises(TypeError, match="integer"):
        synthesize(labels.float(), hu, SPACING, NAMES, g)
    with pytest.raises(ValueError, match="like label_map"):
        synthesize(labels, hu[:-1], SPACING, NAMES, g)
    with pytest.raises(ValueError, match="spacing"):
        synthesize(labels, hu, (1.0, 0.0, 1.0), NAMES, g)
    with pytest.raises(ValueError, match="low <= high"):
        SynthParams(noise_std_hu=(5.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        SynthParams(p_random=1.5)
    with pytest.raises(ValueError, match="split_hu"):
        SynthParams(tissue_min_hu=-400.0)


def test_real_label_maps_synthesize_in_range(case_a_paths):
    # One synthesis per real case on a crop: labels kept, air below -500, body above -300,
    # organs within their priors' reach, and every kind of the real maps recognised.
    import nibabel as nib

    ct_a, seg_a = case_a_paths
    cases = [
        (
            ct_a,
            seg_a,
            CASE_A_NAMES,
            (3.0,) * 3,
            np.s_[10:110, 10:95, 50:80],
        )
    ]
    if CASE_E_CT.exists():
        cases.append(
            (
                CASE_E_CT,
                CASE_E_SEG,
                CASE_E_NAMES,
                (2.8, 2.8, 2.5),
                np.s_[32:480:4, 32:480:4, 10:40],
            )
        )
    checked = []
    for ct_path, seg_path, names_path, spacing, crop in cases:
        names = read_structure_names(names_path)
        assert all(structure_kind(n) in KIND_PRIORS for n in names.values())
        hu = torch.from_numpy(np.asarray(nib.load(ct_path).dataobj[crop], dtype=np.float32))
        seg = torch.from_numpy(np.asarray(nib.load(seg_path).dataobj[crop], dtype=np.uint8))
        params = SynthParams(grid_spacing=12.0)
        image, out = synthesize(
            seg, hu, spacing, names, torch.Generator().manual_seed(0), params=params
        )
        assert image.shape == seg.shape and torch.isfinite(image).all()
        draw = draw_params(seg.shape, names, torch.Generator().manual_seed(0), params)
        coords = deformation_coordinates(seg.shape, draw, params.grid_spacing)
        warped, expected = warp_ref(hu[None], seg, coords)
        assert torch.equal(out, expected)
        background = out == 0
        assert image[background & (warped[0] <= -300)].max() <= -500.0
        assert image[background & (warped[0] > -300)].min() > -300.0
        liver = out == 5
        assert liver.any()
        assert -200.0 < float(image[liver].mean()) < 400.0
        assert float(image.min()) >= -1024.0
        checked.append(ct_path)
    assert len(checked) == len(cases)
