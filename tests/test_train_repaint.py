"""Contrast-phase re-painting: targets per phase, texture kept, a blended one-voxel rim,
everything else bit-identical; oracles from SciPy (erosion, dilation, a box filter)."""

import numpy as np
import pytest
import torch
from conftest import CASE_A_NAMES, CASE_E_CT, CASE_E_NAMES, CASE_E_SEG
from scipy import ndimage

from fastcascade.io.structures import read_structure_names
from fastcascade.train.repaint import (
    KINDS,
    PHASE_HU,
    PHASES,
    RepaintPlan,
    apply_repaint,
    enhancement_kind,
    plan_repaint,
    repaint,
    repaint_phases,
)

NAMES = {
    1: "spleen",
    2: "kidney_right",
    5: "liver",
    6: "stomach",
    52: "aorta",
    63: "inferior_vena_cava",
    80: "gluteus_maximus_left",
}
REPAINTED = (1, 2, 5, 52, 63)
BOX = np.ones((3, 3, 3), dtype=bool)


def _scan(seed=0):
    """A 24 x 22 x 12 body with textured structures; the liver touches the IVC and the
    kidney is cut by the bottom slice (z = 0)."""
    g = torch.Generator().manual_seed(seed)
    shape = (24, 22, 12)
    labels = torch.zeros(shape, dtype=torch.uint8)
    ct = -100.0 + 15.0 * torch.randn(shape, generator=g)  # fat
    ct[:, :, :] = torch.where(torch.rand(shape, generator=g) < 0.05, -1000.0, ct)  # a little gas
    labels[2:10, 2:12, 2:10] = 5  # liver
    labels[10:13, 4:8, 2:10] = 63  # IVC against the liver
    labels[15:20, 3:8, 3:9] = 1  # spleen
    labels[14:21, 12:18, 0:5] = 2  # kidney, cut by the field of view
    labels[3:8, 15:20, 4:9] = 6  # stomach (not re-painted)
    labels[16:19, 14:17, 7:11] = 52  # aorta
    labels[0:2, 0:4, 0:12] = 80  # muscle (not re-painted)
    for sid, mean in {5: 45.0, 63: 40.0, 1: 33.0, 2: 15.0, 6: 10.0, 52: 42.0, 80: 30.0}.items():
        m = labels == sid
        ct[m] = mean + 12.0 * torch.randn(int(m.sum()), generator=g)
    return ct, labels


def _core(mask: np.ndarray) -> np.ndarray:
    # One-voxel erosion, the volume's edge counting as inside (as the module documents).
    return ndimage.binary_erosion(mask, BOX, border_value=1)


@pytest.mark.parametrize("phase", PHASES)
def test_phase_moves_the_structures_to_their_targets(phase):
    ct, labels = _scan()
    out = repaint(ct, labels, NAMES, phase, torch.Generator().manual_seed(3))
    plan = plan_repaint(NAMES, phase, torch.Generator().manual_seed(3))
    assert sorted(plan.targets) == list(REPAINTED)
    lab = labels.numpy()
    for sid in REPAINTED:
        lo, hi = PHASE_HU[phase][enhancement_kind(NAMES[sid])]
        core = _core(lab == sid)
        assert core.any()
        mean = float(out.numpy()[core].astype(np.float64).mean())
        assert lo <= plan.targets[sid] <= hi
        assert mean == pytest.approx(plan.targets[sid], abs=1e-3), NAMES[sid]
        # The texture stays: deviations from the core mean are the original ones.
        before = ct.numpy()[core] - ct.numpy()[core].astype(np.float64).mean()
        after = out.numpy()[core] - mean
        np.testing.assert_allclose(after, before, atol=1e-3)


@pytest.mark.parametrize("phase", PHASES)
def test_everything_beyond_the_rim_is_bit_identical(phase):
    ct, labels = _scan()
    out = repaint(ct, labels, NAMES, phase, torch.Generator().manual_seed(1))
    moved = np.isin(labels.numpy(), REPAINTED)
    rim = ndimage.binary_dilation(moved, BOX)
    assert torch.equal(out[torch.from_numpy(~rim)], ct[torch.from_numpy(~rim)])
    # The stomach's and the muscle's voxels away from re-painted neighbours are untouched.
    for sid in (6, 80):
        inner = (labels.numpy() == sid) & ~rim
        assert inner.any()
        assert np.array_equal(out.numpy()[inner], ct.numpy()[inner])


def test_rim_blend_matches_a_box_filter_oracle():
    # Away from the volume's edges the blend weight is the structure's share of the 3x3x3
    # neighbourhood: out - x = sum_s uniform_filter(M_s) * (t_s - mu_s).
    ct, labels = _scan()
    plan = plan_repaint(NAMES, "arterial", torch.Generator().manual_seed(5))
    out = apply_repaint(ct, labels, plan).numpy().astype(np.float64)
    lab = labels.numpy()
    expected = ct.numpy().astype(np.float64)
    for sid in REPAINTED:
        m = lab == sid
        mu = ct.numpy()[_core(m)].astype(np.float64).mean()
        w = ndimage.uniform_filter(m.astype(np.float64), size=3, mode="constant")
        expected += w * (plan.targets[sid] - mu)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(out[inner], expected[inner], atol=2e-3)


def test_no_outline_at_the_boundary():
    # A flat 40 HU scan: across a structure's boundary the re-painted profile goes
    # monotonically from 40 to the target, no overshoot (bright or dark ring).
    ct = torch.full((20, 9, 9), 40.0)
    labels = torch.zeros(20, 9, 9, dtype=torch.uint8)
    labels[5:15, 2:7, 2:7] = 1
    for phase in PHASES:
        plan = plan_repaint({1: "aorta"}, phase, torch.Generator().manual_seed(0))
        out = apply_repaint(ct, labels, plan)
        t = plan.targets[1]
        profile = out[:, 4, 4].tolist()
        assert profile[0] == 40.0 and profile[10] == pytest.approx(t, abs=1e-4)
        steps = np.diff(profile[:10])
        assert (steps * np.sign(t - 40.0) >= -1e-5).all(), profile
        # Exactly one blended voxel on either side of the boundary: 1/3 and 2/3 of the way.
        assert profile[4] == pytest.approx(40.0 + (t - 40.0) / 3, abs=1e-3)
        assert profile[5] == pytest.approx(40.0 + 2 * (t - 40.0) / 3, abs=1e-3)
        assert profile[3] == 40.0


def test_structure_cut_by_the_field_of_view_is_shifted_fully_at_the_edge():
    ct, labels = _scan()
    plan = plan_repaint(NAMES, "arterial", torch.Generator().manual_seed(2))
    out = apply_repaint(ct, labels, plan)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[15:20, 13:17, 0] = True  # kidney voxels on the bottom slice, inside in x and y
    mu = ct.numpy()[_core(labels.numpy() == 2)].astype(np.float64).mean()
    shift = out.numpy()[edge] - ct.numpy()[edge]
    np.testing.assert_allclose(shift, plan.targets[2] - mu, atol=1e-3)


def test_neighbouring_structures_blend_convexly():
    # Liver and IVC touch: at their interface every voxel moves by a convex mix of the two
    # shifts, within [min, max] of them (and of zero, for the share of background).
    ct, labels = _scan()
    plan = plan_repaint(NAMES, "portal_venous", torch.Generator().manual_seed(4))
    out = apply_repaint(ct, labels, plan).numpy()
    lab = labels.numpy()
    shifts = []
    for sid in (5, 63):
        mu = ct.numpy()[_core(lab == sid)].astype(np.float64).mean()
        shifts.append(plan.targets[sid] - mu)
    interface = np.zeros(lab.shape, dtype=bool)
    interface[9:11, 5:7, 4:8] = True
    moved = out[interface] - ct.numpy()[interface]
    assert (moved >= min(0.0, *shifts) - 1e-3).all() and (moved <= max(0.0, *shifts) + 1e-3).all()


def test_texture_scale():
    ct, labels = _scan()
    g = torch.Generator().manual_seed(0)
    out = repaint(ct, labels, NAMES, "arterial", g, scale_range=(1.5, 1.5))
    core = _core(labels.numpy() == 5)
    assert out.numpy()[core].std() == pytest.approx(1.5 * ct.numpy()[core].std(), rel=1e-4)


def test_deterministic_for_a_seed_and_different_across_seeds():
    ct, labels = _scan()
    a = repaint(ct, labels, NAMES, "delayed", torch.Generator().manual_seed(7))
    b = repaint(ct, labels, NAMES, "delayed", torch.Generator().manual_seed(7))
    c = repaint(ct, labels, NAMES, "delayed", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == ct.shape


def test_integer_input_and_draw_count():
    ct, labels = _scan()
    ct_int = ct.round().to(torch.int16)
    out = repaint(ct_int, labels, NAMES, "arterial", torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    far = ~torch.from_numpy(ndimage.binary_dilation(np.isin(labels.numpy(), REPAINTED), BOX))
    assert torch.equal(out[far], ct_int.float()[far])
    # Targets are drawn per kind and scales per named id in ascending order, so a name
    # absent from the map (drawn last here) leaves the present structures' plan as it was.
    plan = plan_repaint(NAMES, "arterial", torch.Generator().manual_seed(0), scale_range=(0.5, 2))
    extra = plan_repaint(
        {**NAMES, 99: "splenic_artery"},
        "arterial",
        torch.Generator().manual_seed(0),
        scale_range=(0.5, 2),
    )
    assert sorted(extra.targets) == [*REPAINTED, 99]
    assert all(extra.targets[i] == plan.targets[i] for i in REPAINTED)
    assert all(extra.scales[i] == plan.scales[i] for i in REPAINTED)
    assert extra.targets[99] == extra.targets[52]  # one target per kind


def test_repaint_phases_gives_every_phase():
    ct, labels = _scan()
    versions = repaint_phases(ct, labels, NAMES, torch.Generator().manual_seed(0))
    assert tuple(versions) == PHASES
    core = _core(labels.numpy() == 52)
    means = {p: float(v.numpy()[core].mean()) for p, v in versions.items()}
    assert means["arterial"] > means["portal_venous"] > means["non_contrast"]


@pytest.mark.parametrize(
    "name,kind",
    [
        ("aorta", "artery"),
        ("iliac_artery_left", "artery"),
        ("brachiocephalic_trunk", "artery"),
        ("pulmonary_vein", "artery"),
        ("portal_vein_and_splenic_vein", "portal_vein"),
        ("inferior_vena_cava", "vein"),
        ("iliac_vena_right", "vein"),
        ("brachiocephalic_vein_left", "vein"),
        ("kidney_left", "kidney"),
        ("kidney_cortex_right", "kidney_cortex"),
        ("kidney_medulla_left", "kidney_medulla"),
        ("kidney_cyst_left", None),
        ("spleen", "spleen"),
        ("liver", "liver"),
        ("pancreas", "pancreas"),
        ("stomach", None),
        ("heart", None),
        ("vertebrae_L1", None),
    ],
)
def test_enhancement_kind(name, kind):
    assert enhancement_kind(name) == kind


def test_table_is_complete_and_ordered():
    for phase in PHASES:
        assert set(PHASE_HU[phase]) == set(KINDS)
        assert all(lo < hi for lo, hi in PHASE_HU[phase].values())
    # The arterial phase is where arteries peak; the portal vein peaks in portal_venous.
    assert PHASE_HU["arterial"]["artery"][0] > PHASE_HU["portal_venous"]["artery"][1]
    assert PHASE_HU["portal_venous"]["portal_vein"][0] > PHASE_HU["non_contrast"]["portal_vein"][1]


def test_input_errors():
    ct, labels = _scan()
    g = torch.Generator()
    with pytest.raises(ValueError, match="phase"):
        repaint(ct, labels, NAMES, "venous", g)
    with pytest.raises(TypeError, match="integer"):
        repaint(ct, labels.float(), NAMES, "arterial", g)
    with pytest.raises(ValueError, match="like image_hu"):
        repaint(ct, labels[:-1], NAMES, "arterial", g)
    with pytest.raises(TypeError, match="names"):
        repaint(ct, labels, {"1": "liver"}, "arterial", g)
    with pytest.raises(TypeError, match="RepaintPlan"):
        apply_repaint(ct, labels, {1: 100.0})
    with pytest.raises(ValueError, match="low <= high"):
        plan_repaint(NAMES, "arterial", g, scale_range=(2.0, 1.0))
    assert isinstance(plan_repaint(NAMES, "arterial", g), RepaintPlan)


def test_real_scans_repaint_in_range(case_a_paths):
    # Case A (non-contrast) made arterial and case E (arterial) made non-contrast, on a
    # crop around the upper abdomen: the moved structures' cores reach the phase's range,
    # the rest of the crop beyond the rims is unchanged.
    import nibabel as nib

    ct_a, seg_a = case_a_paths
    cases = [
        (
            ct_a,
            seg_a,
            CASE_A_NAMES,
            "arterial",
            np.s_[20:100, 20:90, 60:100],
        ),
    ]
    if CASE_E_CT.exists():
        cases.append(
            (
                CASE_E_CT,
                CASE_E_SEG,
                CASE_E_NAMES,
                "non_contrast",
                np.s_[96:416:2, 96:416:2, 10:40],
            )
        )
    checked = []
    for ct_path, seg_path, names_path, phase, crop in cases:
        names = read_structure_names(names_path)
        ct = torch.from_numpy(np.asarray(nib.load(ct_path).dataobj[crop], dtype=np.float32))
        seg = torch.from_numpy(np.asarray(nib.load(seg_path).dataobj[crop], dtype=np.uint8))
        out = repaint(ct, seg, names, phase, torch.Generator().manual_seed(0))
        lab = seg.numpy()
        present = [i for i in np.unique(lab) if i and enhancement_kind(names[int(i)])]
        assert {5, 52}.issubset(set(int(i) for i in present)), ct_path
        checked.append(ct_path)
        for sid in present:
            core = _core(lab == sid)
            if core.sum() < 20:
                continue
            lo, hi = PHASE_HU[phase][enhancement_kind(names[int(sid)])]
            mean = float(out.numpy()[core].mean())
            assert lo - 1e-3 <= mean <= hi + 1e-3, (ct_path.name, names[int(sid)], mean)
        far = ~ndimage.binary_dilation(np.isin(lab, present), BOX)
        assert np.array_equal(out.numpy()[far], ct.numpy()[far])
    assert len(checked) == len(cases)
