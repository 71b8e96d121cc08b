"""Warping: the torch reference against SciPy, the Triton kernel against the reference.

Oracles: ``scipy.ndimage.map_coordinates`` (order 1 for the image, order 0 for labels, mode
``grid-constant`` = the volume surrounded by the fill), ``map_coordinates(order=3,
prefilter=False)`` for the B-spline field (it evaluates a cubic B-spline with the given
coefficients), ``scipy.spatial.transform.Rotation`` for the rotation, and hand-written
shifts for integer translations.
"""

import math

import numpy as np
import pytest
import torch
from launch_guard import record_launches
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from fastcascade.ops import _backend
from fastcascade.ops import warp as warp_mod
from fastcascade.ops.warp import (
    affine_coordinates,
    control_grid_shape,
    displacement_field,
    elastic_affine_warp,
    warp,
    warp_ref,
)

AIR = -1024.0

SHAPES = {
    "odd-5x7x3": (5, 7, 3),
    "cube-8": (8, 8, 8),
    "single-voxel-axis": (6, 1, 5),
}

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")


def identity_coords(shape, dtype=torch.float32):
    axes = [torch.arange(n, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def ct_like(shape, channels=2, seed=0):
    """HU-like image and labels 0..4 (uint8)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((channels, *shape), generator=g) * 2000.0 - 1000.0
    labels = torch.randint(0, 5, shape, generator=g, dtype=torch.uint8)
    return image, labels


def jittered_coords(shape, amount, seed=1):
    """Identity plus noise; reaches up to ``amount`` voxels beyond every border."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand((3, *shape), generator=g) * 2.0 - 1.0) * amount
    return identity_coords(shape) + noise


def scipy_warp(image, labels, coords, fill=AIR, label_fill=0):
    q = coords.double().numpy()
    img = np.stack(
        [
            map_coordinates(ch.double().numpy(), q, order=1, mode="grid-constant", cval=fill)
            for ch in image
        ]
    )
    lab = None
    if labels is not None:
        lab = map_coordinates(
            labels.numpy(), q, order=0, mode="grid-constant", cval=label_fill
        ).astype(labels.numpy().dtype)
    return img, lab


# ----------------------------------------------------------------------------------------
# Reference against SciPy
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_warp_ref_matches_map_coordinates(shape):
    image, labels = ct_like(shape)
    coords = jittered_coords(shape, 2.5)
    out, out_lab = warp_ref(image, labels, coords)
    want, want_lab = scipy_warp(image, labels, coords)
    assert out.dtype == torch.float32 and out_lab.dtype == torch.uint8
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-3)  # fp32 output of ~1000 HU
    np.testing.assert_array_equal(out_lab.numpy(), want_lab)
    # The jitter reaches outside, so fill values took part.
    assert (out_lab.numpy() == 0).any() and (out.numpy() < -1000.0).any()


def test_warp_ref_other_output_shape_and_float64_coords():
    image, labels = ct_like((6, 5, 7), channels=1)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand((3, 4, 9, 2), generator=g, dtype=torch.float64) * 8.0 - 1.0
    out, out_lab = warp_ref(image, labels, coords, fill_value=-500.0, label_fill=9)
    want, want_lab = scipy_warp(image, labels, coords, fill=-500.0, label_fill=9)
    assert out.shape == (1, 4, 9, 2) and out_lab.shape == (4, 9, 2)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(out_lab.numpy(), want_lab)


BACKENDS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not _backend.triton_available(), reason="no triton")
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_rounds_ties_half_up(backend):
    labels = torch.arange(5, dtype=torch.int64).reshape(5, 1, 1)
    image = labels[None].float()
    q = torch.tensor([-0.5, 0.5, 1.5, 2.5, 3.49, 3.5, 4.4, 4.5])
    coords = torch.stack([q, torch.zeros_like(q), torch.zeros_like(q)]).reshape(3, -1, 1, 1)
    _, out_lab = warp(image, labels, coords, label_fill=-1, backend=backend)
    by_hand = [0, 1, 2, 3, 3, 4, 4, -1]  # floor(q + 0.5); index 5 is outside
    assert out_lab.flatten().tolist() == by_hand
    _, want_lab = scipy_warp(image, labels, coords, label_fill=-1)
    assert want_lab.flatten().tolist() == by_hand


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_blends_at_the_border_and_fills_far_outside(backend):
    image = torch.full((1, 4, 3, 3), 100.0)
    q = torch.tensor([-0.25, -1.0, -3.0, 3.25, 4.0, 1.5, 1e9, float("-inf")])
    coords = torch.stack([q, torch.ones_like(q), torch.ones_like(q)]).reshape(3, -1, 1, 1)
    labels = torch.full((4, 3, 3), 7, dtype=torch.int32)
    out, out_lab = warp(image, labels, coords, backend=backend)
    # 0.75 of voxel 0 and 0.25 of the air beyond it; whole voxels of air further out.
    by_hand = [0.75 * 100 + 0.25 * AIR, AIR, AIR, 0.75 * 100 + 0.25 * AIR, AIR, 100.0, AIR, AIR]
    np.testing.assert_allclose(out.flatten().numpy(), by_hand, rtol=0, atol=1e-4)
    assert out_lab.flatten().tolist() == [7, 0, 0, 7, 0, 7, 0, 0]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_identity_coordinates_give_back_the_input_exactly(shape):
    image, labels = ct_like(shape)
    for coords in (identity_coords(shape), identity_coords(shape, torch.float64)):
        out, out_lab = warp_ref(image, labels, coords)
        assert torch.equal(out, image) and torch.equal(out_lab, labels)


@pytest.mark.parametrize("shift", [(2, -1, 3), (-3, 0, 0), (0, 0, -1)], ids=str)
def test_integer_translation_shifts_exactly(shift):
    shape = (6, 5, 7)
    image, labels = ct_like(shape)
    out, out_lab = warp_ref(image, labels, affine_coordinates(shape, (0, 0, 0), shift))
    want = torch.full_like(image, AIR)
    want_lab = torch.zeros_like(labels)
    # out[p] = in[p + shift] where that is inside
    dst, src = [], []
    for n, s in zip(shape, shift, strict=True):
        dst.append(slice(max(0, -s), min(n, n - s)))
        src.append(slice(max(0, s), min(n, n + s)))
    want[(slice(None), *dst)] = image[(slice(None), *src)]
    want_lab[tuple(dst)] = labels[tuple(src)]
    assert torch.equal(out, want) and torch.equal(out_lab, want_lab)


def test_rotation_by_90_degrees_about_z_is_rot90():
    image, labels = ct_like((5, 5, 3))
    out, out_lab = warp_ref(image, labels, affine_coordinates((5, 5, 3), (0, 0, 90), (0, 0, 0)))
    # q = R(p - c) + c: out[i, j] = in[n - 1 - j, i], a clockwise quarter turn in (x, y).
    assert torch.equal(out, torch.rot90(image, -1, dims=(1, 2)))
    assert torch.equal(out_lab, torch.rot90(labels, -1, dims=(0, 1)))


# ----------------------------------------------------------------------------------------
# Sample positions
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_zero_rotation_and_translation_is_the_identity(shape):
    q = affine_coordinates(shape, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    assert q.dtype == torch.float32
    assert torch.equal(q, identity_coords(shape))


@pytest.mark.parametrize(
    "angles,shift",
    [
        ((5.0, -3.0, 4.0), (1.5, -20.0, 0.25)),
        ((0.0, 0.0, 30.0), (0, 0, 0)),
        ((-90, 45, 10), (3, 2, 1)),
    ],
    ids=["small", "z-only", "large"],
)
def test_affine_coordinates_match_scipy_rotation(angles, shift):
    shape = (7, 4, 9)
    q = affine_coordinates(shape, angles, torch.tensor(shift, dtype=torch.float64))
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()  # extrinsic: Rz Ry Rx
    centre = (np.array(shape) - 1) / 2.0
    p = identity_coords(shape, torch.float64).numpy().reshape(3, -1)
    want = rot @ (p - centre[:, None]) + centre[:, None] + np.array(shift, float)[:, None]
    np.testing.assert_allclose(q.numpy().reshape(3, -1), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,spacing,want",
    [
        ((132, 132, 116), 32, (8, 8, 7)),
        ((1, 32, 33), 32, (4, 4, 5)),
        ((10, 10, 10), 2.5, (7, 7, 7)),
    ],
    ids=["paper-tile", "edges", "float-spacing"],
)
def test_control_grid_shape(shape, spacing, want):
    assert control_grid_shape(shape, spacing) == want


@pytest.mark.parametrize(
    "shape,spacing",
    [((13, 9, 20), 4), ((5, 7, 3), 32), ((32, 1, 17), 8)],
    ids=["several-cells", "smaller-than-a-cell", "single-voxel-axis"],
)
def test_displacement_field_matches_scipy_bspline(shape, spacing):
    g = torch.Generator().manual_seed(5)
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 8.0 - 4.0
    field = displacement_field(shape, ctrl, spacing)
    assert field.dtype == torch.float32 and field.shape == (3, *shape)
    # Voxel p is at control-grid position p / spacing + 1; map_coordinates with order 3 and
    # no prefilter sums coefficient * cubic B-spline, which is the field's definition.
    t = np.stack(np.meshgrid(*[np.arange(n) / spacing + 1.0 for n in shape], indexing="ij"))
    want = np.stack(
        [map_coordinates(c.double().numpy(), t, order=3, prefilter=False) for c in ctrl]
    )
    np.testing.assert_allclose(field.numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [2.0, -3.5, 0.0], ids=lambda v: f"d={v}")
def test_constant_control_displacements_give_that_constant(value):
    shape = (9, 20, 6)
    ctrl = torch.full((3, *control_grid_shape(shape, 4)), value, dtype=torch.float64)
    ctrl[1] = -value
    field = displacement_field(shape, ctrl, 4)
    torch.testing.assert_close(field[0], torch.full(shape, value), rtol=0, atol=1e-6)
    torch.testing.assert_close(field[1], torch.full(shape, -value), rtol=0, atol=1e-6)


def test_displacement_field_is_bounded_and_smooth():
    shape, spacing, dmax = (24, 17, 30), 8, 4.0
    g = torch.Generator().manual_seed(7)
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 2 * dmax - dmax
    field = displacement_field(shape, ctrl, spacing)
    assert field.abs().max() <= ctrl.abs().max() + 1e-5  # convex combination
    # |d field / dp| <= max |difference of neighbouring controls| / spacing <= 2 dmax / spacing
    for axis in (1, 2, 3):
        step = field.diff(dim=axis).abs().max()
        assert step <= 2 * dmax / spacing + 1e-5
    # ... and a field that is not trivially constant
    assert field.std() > 0.5


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def test_invalid_inputs_raise_with_what_was_expected():
    image, labels = ct_like((4, 4, 4))
    coords = identity_coords((4, 4, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        warp_ref(image, labels, coords.half())
    with pytest.raises(ValueError, match=r"labels must be \(x, y, z\)"):
        warp_ref(image, labels[:3], coords)
    with pytest.raises(TypeError, match="integer dtype"):
        warp_ref(image, labels.float(), coords)
    with pytest.raises(ValueError, match=r"\(C, x, y, z\)"):
        warp_ref(image[0], labels, coords)
    with pytest.raises(ValueError, match=r"coords must be \(3, X, Y, Z\)"):
        warp_ref(image, labels, coords[:2])
    with pytest.raises(ValueError, match="does not fit the labels' dtype"):
        warp_ref(image, labels, coords, label_fill=-1)  # uint8 labels
    with pytest.raises(ValueError, match="backend must be"):
        warp(image, labels, coords, backend="cuda")
    with pytest.raises(ValueError, match=r"shape \(3, 5, 5, 5\)"):
        displacement_field((4, 4, 4), torch.zeros(3, 3, 3, 3), 2)
    with pytest.raises(ValueError, match="grid_spacing must be > 0"):
        control_grid_shape((4, 4, 4), 0)


def test_auto_backend_on_cpu_uses_the_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors with backend='auto'")

    monkeypatch.setattr(warp_mod, "_warp_triton", refuse)
    image, labels = ct_like((4, 5, 3))
    coords = jittered_coords((4, 5, 3), 1.0)
    out, out_lab = warp(image, labels, coords)
    want, want_lab = warp_ref(image, labels, coords)
    assert torch.equal(out, want) and torch.equal(out_lab, want_lab)


# ----------------------------------------------------------------------------------------
# Triton kernel (interpreted on the CPU) against the reference
# ----------------------------------------------------------------------------------------


def poisoned(image, labels, out_shape):
    out = torch.full((image.shape[0], *out_shape), float("nan"), dtype=image.dtype)
    out_lab = torch.full(out_shape, 99, dtype=labels.dtype)
    return out, out_lab


def assert_labels_equal_away_from_ties(got, want, coords):
    # Coordinates computed in a different order may land on the other side of a .5 tie.
    frac = coords - torch.floor(coords)
    near_tie = ((frac - 0.5).abs() < 1e-4).any(dim=0)
    assert near_tie.float().mean() < 0.01
    assert torch.equal(got[~near_tie], want[~near_tie])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_warp_matches_reference(shape):
    image, labels = ct_like(shape)
    coords = jittered_coords(shape, 2.5)
    out, out_lab = poisoned(image, labels, shape)
    warp_mod._warp_triton(image, labels, coords=coords, out_image=out, out_labels=out_lab)
    want, want_lab = warp_ref(image, labels, coords)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)  # fp32 vs float64, ~1000 HU
    assert torch.equal(out_lab, want_lab)


@needs_triton
def test_triton_warp_identity_and_shift_are_exact():
    shape = (5, 7, 3)
    image, labels = ct_like(shape)
    out, out_lab = warp(image, labels, identity_coords(shape), backend="triton")
    assert torch.equal(out, image) and torch.equal(out_lab, labels)
    coords = affine_coordinates(shape, (0, 0, 0), (1, -2, 1))
    got = warp(image, labels.long(), coords, fill_value=-7.0, label_fill=3, backend="triton")
    want = warp_ref(image, labels.long(), coords, fill_value=-7.0, label_fill=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_triton_warp_other_output_shape_without_labels():
    image, _ = ct_like((6, 5, 7), channels=3)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand((3, 3, 8, 5), generator=g) * 8.0 - 1.0
    out, none = warp(image.double(), None, coords, backend="triton")
    want, _ = warp_ref(image.double(), None, coords)
    assert none is None and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)


CASES = {
    "rigid+elastic-odd": ((5, 7, 3), (4.0, -3.0, 5.0), (1.5, -0.75, 0.3), 2),
    "elastic-only-cube": ((8, 8, 8), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 3),
    "rigid-only-single-voxel-axis": ((6, 1, 5), (0.0, 0.0, 20.0), (0.5, 0.0, -1.25), None),
}


@needs_triton
@pytest.mark.parametrize("shape,angles,shift,spacing", CASES.values(), ids=CASES.keys())
def test_fused_elastic_affine_warp_matches_reference(shape, angles, shift, spacing):
    image, labels = ct_like(shape)
    ctrl = None
    coords = affine_coordinates(shape, angles, shift)
    if spacing is not None:
        g = torch.Generator().manual_seed(11)
        ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 4.0 - 2.0
        coords = coords + displacement_field(shape, ctrl, spacing)
    grid_spacing = spacing or 32
    out, out_lab = poisoned(image, labels, shape)
    affine = warp_mod._affine_params(shape, angles, shift, image.device)
    warp_mod._warp_triton(
        image,
        labels,
        affine=affine,
        control_displacements=ctrl,
        grid_spacing=grid_spacing,
        out_image=out,
        out_labels=out_lab,
    )
    want, want_lab = warp_ref(image, labels, coords)
    # Positions differ by float32 rounding (~1e-6 voxel) times gradients of up to 2000 HU.
    torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
    assert_labels_equal_away_from_ties(out_lab, want_lab, coords)
    # The public function gives the same through either backend.
    args = (image, labels, angles, shift, ctrl, grid_spacing)
    got = elastic_affine_warp(*args, backend="triton")
    ref = elastic_affine_warp(*args, backend="torch")
    assert torch.equal(got[0], out) and torch.equal(got[1], out_lab)
    assert torch.equal(ref[0], want) and torch.equal(ref[1], want_lab)


@needs_triton
def test_fused_identity_is_exact():
    shape = (5, 7, 3)
    image, labels = ct_like(shape)
    zeros = torch.zeros((3, *control_grid_shape(shape, 2)))
    for backend in ("triton", "torch"):
        out, out_lab = elastic_affine_warp(
            image, labels, (0, 0, 0), (0, 0, 0), zeros, 2, backend=backend
        )
        assert torch.equal(out, image) and torch.equal(out_lab, labels), backend


def test_elastic_affine_warp_torch_path_matches_scipy():
    shape, spacing = (7, 6, 5), 3
    image, labels = ct_like(shape, channels=1)
    g = torch.Generator().manual_seed(2)
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 3.0 - 1.5
    out, out_lab = elastic_affine_warp(
        image, labels, (2, -4, 3), (0.4, 1.2, -0.6), ctrl, spacing, backend="torch"
    )
    # Independent positions: SciPy rotation + SciPy B-spline evaluation.
    rot = Rotation.from_euler("xyz", (2, -4, 3), degrees=True).as_matrix()
    centre = (np.array(shape) - 1) / 2.0
    p = identity_coords(shape, torch.float64).numpy()
    q = np.einsum("rc,cxyz->rxyz", rot, p - centre[:, None, None, None])
    q += (centre + np.array((0.4, 1.2, -0.6)))[:, None, None, None]
    t = p / spacing + 1.0
    q += np.stack([map_coordinates(c.double().numpy(), t, order=3, prefilter=False) for c in ctrl])
    want, want_lab = scipy_warp(image, labels, torch.from_numpy(q))
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-2)
    frac = q - np.floor(q)
    away = ~(np.abs(frac - 0.5) < 1e-4).any(axis=0)
    np.testing.assert_array_equal(out_lab.numpy()[away], want_lab[away])
    assert math.isclose(away.mean(), 1.0, abs_tol=0.01)


@needs_triton
def test_tiles_across_every_axis_match_reference(monkeypatch):
    # Small tiles, so that the volume spans several along every axis, partial ones
    # included: the tile indexing, the masks of overhanging tiles and the per-row
    # B-spline weights are exercised where the default tile would cover everything.
    monkeypatch.setattr(warp_mod, "_TILE_VOXELS", 8)
    monkeypatch.setattr(warp_mod, "_TILE_Z", 4)
    shape, spacing = (1, 3, 9), 2
    assert warp_mod._tile(shape) == (1, 2, 4)  # 1 x 2 x 3 tiles, partial in y and z
    image, labels = ct_like(shape, channels=1)
    g = torch.Generator().manual_seed(4)
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 4.0 - 2.0
    angles, shift = (3.0, -2.0, 4.0), (0.5, 0.25, -1.5)
    coords = affine_coordinates(shape, angles, shift) + displacement_field(shape, ctrl, spacing)
    out, out_lab = poisoned(image, labels, shape)
    affine = warp_mod._affine_params(shape, angles, shift, image.device)
    warp_mod._warp_triton(
        image,
        labels,
        affine=affine,
        control_displacements=ctrl,
        grid_spacing=spacing,
        out_image=out,
        out_labels=out_lab,
    )
    want, want_lab = warp_ref(image, labels, coords)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
    assert_labels_equal_away_from_ties(out_lab, want_lab, coords)
    # Tiles several voxels wide along x (thin volumes), partial in x and z.
    monkeypatch.setattr(warp_mod, "_TILE_Z", 2)
    shape = (5, 1, 3)
    assert warp_mod._tile(shape) == (4, 1, 2)
    image, labels = ct_like(shape)
    coords = jittered_coords(shape, 1.5)
    out, out_lab = poisoned(image, labels, shape)
    warp_mod._warp_triton(image, labels, coords=coords, out_image=out, out_labels=out_lab)
    want, want_lab = warp_ref(image, labels, coords)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)
    assert torch.equal(out_lab, want_lab)


@needs_triton
def test_int64_offsets_give_the_int32_result():
    # The int64 variant (volumes past 2^31 voxels) computes the same: forced on a small one.
    shape, spacing = (5, 7, 3), 2
    image, labels = ct_like(shape)
    g = torch.Generator().manual_seed(8)
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 4.0 - 2.0
    affine = warp_mod._affine_params(shape, (4.0, -3.0, 5.0), (1.5, -0.75, 0.3), image.device)
    coords = jittered_coords(shape, 2.5)
    runs = {}
    for int64 in (False, True):
        fused = warp_mod._warp_triton(
            image,
            labels,
            affine=affine,
            control_displacements=ctrl,
            grid_spacing=spacing,
            out_image=poisoned(image, labels, shape)[0],
            force_int64=int64,
        )
        sampled = warp_mod._warp_triton(image, labels, coords=coords, force_int64=int64)
        runs[int64] = (*fused, *sampled)
    for a, b in zip(runs[False], runs[True], strict=True):
        assert torch.equal(a, b)


def test_int64_offsets_only_where_int32_could_overflow():
    small = (512, 512, 512)  # 1.3e8 voxels
    tile, big_tile = warp_mod._tile(small), warp_mod._tile((1300, 1300, 1300))
    assert not warp_mod._needs_int64(small, small, tile)
    big = (1300, 1300, 1300)  # 2.2e9 voxels: past 2^31 on input and output
    assert warp_mod._needs_int64(big, big, big_tile)
    # Only the output past 2^31 (sampling a small input on a large grid) ...
    assert warp_mod._needs_int64(small, big, big_tile)
    # ... or only the input (a small output cut from a large volume).
    assert warp_mod._needs_int64(big, small, tile)
    # Below 2^31 voxels, but positions clamped two voxels beyond the input are not.
    n = 1288
    assert n**3 < 2**31 - 1 < (n + 4) ** 3
    assert warp_mod._needs_int64((n, n, n), (8, 8, 8), (8, 8, 8))
    # The voxels of tiles that overhang the output count too.
    assert 32786 * 65500 < 2**31 - 1 < 32792 * 65536
    assert warp_mod._needs_int64((8, 8, 8), (1, 32786, 65500), (1, 8, 64))
    assert not warp_mod._needs_int64((8, 8, 8), (1, 32000, 65500), (1, 8, 64))


def test_a_control_grid_too_fine_for_int32_indices_is_refused():
    image = torch.zeros((1, 4, 4, 4))
    shape = (4, 4, 4)
    tile = warp_mod._tile(shape)
    warp_mod._check_control_indices(shape, tile, control_grid_shape(shape, 0.5), 0.5)
    with pytest.raises(ValueError, match="too fine"):
        warp_mod._check_control_indices((1300,) * 3, (1, 8, 64), (4, 4, 4), 0.5)
    with pytest.raises(ValueError, match="too fine"):
        warp_mod._warp_triton(
            image,
            None,
            affine=warp_mod._affine_params(shape, (0, 0, 0), (0, 0, 0), "cpu"),
            control_displacements=torch.zeros((3, 1300, 1300, 1300), device="meta"),
            grid_spacing=1e-3,
        )


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (5, 7, 3), (256, 256, 256), (256, 256, 150), (3, 1, 1000)], ids=str
)
def test_tile_is_small_and_at_most_the_volume(shape):
    bx, by, bz = warp_mod._tile(shape)
    for b in (bx, by, bz):
        assert b >= 1 and b & (b - 1) == 0  # powers of two (tl.arange)
    assert bx * by * bz <= warp_mod._TILE_VOXELS and bz <= warp_mod._TILE_Z
    assert bx < 2 * shape[0] and by < 2 * shape[1] and bz < 2 * shape[2]


# ----------------------------------------------------------------------------------------
# GPU (opt-in: pytest -m gpu, with TRITON_INTERPRET=0); the sm_90 compile checks of the
# kernel are in test_compile_sm90.py
# ----------------------------------------------------------------------------------------


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if _backend.interpreter_on():
        pytest.skip("run GPU tests with TRITON_INTERPRET=0 (the interpreter is on)")


def paper_warp(shape, seed, device, spacing=32):
    """The paper's augmentation at its bounds: rotations of 5 degrees, translations up to
    20 voxels, control displacements up to 4 voxels every 32 voxels."""
    g = torch.Generator().manual_seed(seed)
    angles = tuple((torch.rand(3, generator=g) * 10.0 - 5.0).tolist())
    shift = tuple((torch.rand(3, generator=g) * 40.0 - 20.0).tolist())
    ctrl = torch.rand((3, *control_grid_shape(shape, spacing)), generator=g) * 8.0 - 4.0
    return angles, shift, ctrl.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(132, 132, 116), (256, 256, 150)], ids=["paper-tile", "half-res-512"]
)
def test_gpu_fused_warp_matches_reference_at_training_size(shape):
    _needs_cuda()
    image, labels = ct_like(shape, channels=1, seed=3)
    image, labels = image.cuda(), labels.cuda()
    angles, shift, ctrl = paper_warp(shape, 5, "cuda")
    out, out_lab = poisoned(image, labels, shape)
    out, out_lab = out.cuda(), out_lab.cuda()
    affine = warp_mod._affine_params(shape, angles, shift, "cuda")
    warp_mod._warp_triton(
        image,
        labels,
        affine=affine,
        control_displacements=ctrl,
        out_image=out,
        out_labels=out_lab,
    )
    # The reference: float32 positions (as the kernel), float64 interpolation.
    coords = affine_coordinates(shape, angles, shift, device="cuda")
    coords = coords + displacement_field(shape, ctrl, 32)
    want, want_lab = warp_ref(image, labels, coords)
    assert not out.isnan().any()
    # Positions agree to float32 rounding at positions up to ~300 (a few 1e-5 voxels),
    # times the noise image's gradients of up to 2000 HU per voxel
    # (Emulated on the CPU: at most 0.04 HU, 1e-4 HU on average.)
    err = (out - want).abs()
    assert float(err.max()) < 0.5 and float(err.mean()) < 0.01, (err.max(), err.mean())
    frac = coords - torch.floor(coords)
    near_tie = ((frac - 0.5).abs() < 1e-3).any(dim=0)
    assert near_tie.float().mean() < 0.01
    assert torch.equal(out_lab[~near_tie], want_lab[~near_tie])
    # "auto" on CUDA tensors is this kernel.
    got = elastic_affine_warp(image, labels, angles, shift, ctrl)
    assert torch.equal(got[0], out) and torch.equal(got[1], out_lab)


@pytest.mark.gpu
def test_gpu_sampled_warp_matches_reference_and_int64_agrees():
    _needs_cuda()
    shape = (96, 80, 112)
    image, labels = ct_like(shape, channels=2, seed=6)
    image, labels = image.cuda(), labels.long().cuda()
    coords = jittered_coords(shape, 3.0).cuda()
    out, out_lab = warp(image, labels, coords, backend="triton")
    want, want_lab = warp_ref(image, labels, coords)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
    assert_labels_equal_away_from_ties(out_lab, want_lab, coords)
    wide = warp_mod._warp_triton(image, labels, coords=coords, force_int64=True)
    assert torch.equal(wide[0], out) and torch.equal(wide[1], out_lab)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets_past_two_to_the_31():
    _needs_cuda()
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    n = 1300  # 2.2e9 voxels, an fp16 image and uint8 labels: 13 GiB in and out
    shape = (n, n, n)
    assert warp_mod._needs_int64(shape, shape, warp_mod._tile(shape))
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.randn((1, *shape), generator=g, device="cuda", dtype=torch.float16)
    labels = torch.randint(1, 200, shape, generator=g, device="cuda", dtype=torch.uint8)
    # An integer shift: every position is exact, so out[p] = in[p + shift] bit for bit.
    shift = (-1, 2, 3)
    out, out_lab = elastic_affine_warp(image, labels, (0, 0, 0), shift, fill_value=-7.0)
    for lo in (n // 2, n - 40):  # the middle and the far corner (offsets past 2^31)
        dst = (slice(lo, lo + 40), slice(lo, min(lo + 40, n - 2)), slice(lo, min(lo + 40, n - 3)))
        src = tuple(slice(d.start + t, d.stop + t) for d, t in zip(dst, shift, strict=True))
        assert torch.equal(out[(0, *dst)], image[(0, *src)])
        assert torch.equal(out_lab[dst], labels[src])
    # Positions beyond the input read the fill: x = 0 samples x = -1, the last two y rows
    # and the last three z columns sample past the far faces.
    for fill_region in ((0,), (slice(None), slice(n - 2, None)), (Ellipsis, slice(n - 3, None))):
        assert bool((out[0][fill_region] == -7.0).all())
        assert bool((out_lab[fill_region] == 0).all())


@needs_triton
def test_triton_warp_launches_inside_the_images_device_guard(monkeypatch):
    launches = record_launches(monkeypatch, warp_mod, "_warp_kernel")
    shape = (5, 7, 3)
    image, labels = ct_like(shape)
    coords = jittered_coords(shape, 1.5)
    out, out_lab = poisoned(image, labels, shape)
    warp_mod._warp_triton(image, labels, coords=coords, out_image=out, out_labels=out_lab)
    assert len(launches) == 1 and launches[0] and launches[0][-1] is image
    want, want_lab = warp_ref(image, labels, coords)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)
    assert torch.equal(out_lab, want_lab)
