"""Ball dilation: torch path == SciPy bit for bit, SciPy == a distance-transform oracle."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops.dilate import dilate, dilate_ref, structuring_element


def blobs(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


def corner_voxels(shape):
    m = np.zeros(shape, dtype=bool)
    m[0, 0, 0] = m[-1, -1, -1] = m[0, -1, shape[2] // 2] = True
    return m


def border_slab(shape):
    m = np.zeros(shape, dtype=bool)
    m[:, :, 0] = True
    m[-1, :, :] = True
    return m


MASKS = {
    "sparse-13x9x11": blobs((13, 9, 11), 0.02, 0),
    "dense-12x10x8": blobs((12, 10, 8), 0.4, 1),
    "odd-7x5x3": blobs((7, 5, 3), 0.2, 2),
    "corners": corner_voxels((9, 8, 10)),
    "border-slabs": border_slab((6, 7, 8)),
    "empty": np.zeros((6, 5, 7), dtype=bool),
    "full": np.ones((6, 5, 7), dtype=bool),
    "smaller-than-element-2x3x1": np.array(
        [[[True], [False], [False]], [[False], [False], [True]]]
    ),
    "single-voxel-1x1x1": np.ones((1, 1, 1), dtype=bool),
    "line-1x1x12": np.eye(1, 12, 5, dtype=bool).reshape(1, 1, 12),
}

# (radius, spacing in mm): spacing ratios that are exact binary fractions, so the oracle's
# squared distances are exact and ties on the ellipsoid's surface are well defined.
ELEMENTS = {
    "r0": (0, (1.0, 1.0, 1.0)),
    "r1": (1, (1.0, 1.0, 1.0)),
    "r2": (2, (1.0, 1.0, 1.0)),
    "r3": (3, (1.0, 1.0, 1.0)),
    "r3-iso-1.5mm": (3, (1.5, 1.5, 1.5)),
    "r3-z2x": (3, (1.0, 1.0, 2.0)),
    "r3-x2x": (3, (2.0, 1.0, 1.0)),
    "r4-1x1.5x3": (4, (1.0, 1.5, 3.0)),
    "r3-0.8x0.8x2": (3, (0.8, 0.8, 2.0)),
    "r5": (5, (1.0, 1.0, 1.0)),
}


def oracle_dilate(mask: np.ndarray, radius: int, spacing) -> np.ndarray:
    """Dilated iff the nearest mask voxel (Euclidean, in mm) is within r·min(spacing).

    The nearest voxel comes from ``distance_transform_edt``; the distance to it is then
    recomputed in units of the finest spacing from integer offsets, so the comparison with
    r² is exact whenever the spacing ratios are binary fractions.
    """
    if not mask.any():
        return np.zeros_like(mask)
    indices = ndimage.distance_transform_edt(
        ~mask, sampling=spacing, return_distances=False, return_indices=True
    )
    ratio = np.asarray(spacing, dtype=np.float64) / min(spacing)
    grid = np.indices(mask.shape)
    d2 = sum(((indices[a] - grid[a]) * ratio[a]) ** 2 for a in range(3))
    return d2 <= radius * radius


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy())


@pytest.mark.parametrize("element", list(ELEMENTS))
@pytest.mark.parametrize("name", list(MASKS))
def test_torch_path_equals_scipy_equals_oracle(name, element):
    mask = MASKS[name]
    radius, spacing = ELEMENTS[element]
    expected = oracle_dilate(mask, radius, spacing)
    ref = dilate_ref(t(mask), radius, spacing)
    fast = dilate(t(mask), radius, spacing)
    assert ref.dtype == fast.dtype == torch.bool
    np.testing.assert_array_equal(ref.numpy(), expected)
    np.testing.assert_array_equal(fast.numpy(), ref.numpy())


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_larger_volume_and_noncontiguous_input(radius):
    mask = np.random.default_rng(7).random((20, 17, 24)) < 0.01
    view = t(mask).permute(2, 0, 1)  # a non-contiguous (x, y, z) view
    spacing = (1.5, 0.75, 1.5)
    np.testing.assert_array_equal(
        dilate(view, radius, spacing).numpy(),
        ndimage.binary_dilation(view.numpy(), structuring_element(radius, spacing)),
    )
    np.testing.assert_array_equal(
        dilate(view, radius, spacing, backend="scipy").numpy(),
        oracle_dilate(view.numpy(), radius, spacing),
    )


def test_radius_zero_is_identity_and_a_copy():
    mask = t(MASKS["dense-12x10x8"])
    out = dilate(mask, 0, (0.7, 0.9, 2.5))
    assert torch.equal(out, mask)
    out[0, 0, 0] = ~out[0, 0, 0]
    assert not torch.equal(out, mask)


@pytest.mark.parametrize(
    "radius, count", [(0, 1), (1, 7), (2, 33), (3, 123), (4, 257)], ids=lambda v: str(v)
)
def test_isotropic_element_counts_lattice_points_in_the_ball(radius, count):
    element = structuring_element(radius)
    assert element.shape == (2 * radius + 1,) * 3
    assert element.sum() == count
    assert np.array_equal(element, element[::-1, ::-1, ::-1])


@pytest.mark.parametrize(
    "spacing, ratio",
    [((1.0, 1.0, 2.0), (1, 1, 2)), ((3.0, 1.5, 1.5), (2, 1, 1)), ((0.5, 1.5, 1.0), (1, 3, 2))],
    ids=["z2", "x2", "1-3-2"],
)
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_anisotropic_element_is_the_mm_ball(radius, spacing, ratio):
    element = structuring_element(radius, spacing)
    half = [radius // q for q in ratio]
    assert element.shape == tuple(2 * h + 1 for h in half)
    i, j, k = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    d2 = (i * ratio[0]) ** 2 + (j * ratio[1]) ** 2 + (k * ratio[2]) ** 2  # exact integers
    np.testing.assert_array_equal(element, d2 <= radius**2)


def test_element_ties_on_the_surface_survive_decimal_spacings():
    # 2.1 / 0.7 is 3.0000000000000004 in binary: without the surface margin, the offsets
    # (0, 0, ±1), exactly r·min(spacing) = 2.1 mm away, would drop out.
    assert (1 * 2.1 / 0.7) ** 2 > 3**2
    element = structuring_element(3, (0.7, 0.7, 2.1))
    assert element.shape == (7, 7, 3) and element[3, 3, 0] and element[3, 3, 2]
    np.testing.assert_array_equal(element, structuring_element(3, (1, 1, 3)))
    np.testing.assert_array_equal(
        structuring_element(3, (0.7, 0.7, 1.4)), structuring_element(3, (1, 1, 2))
    )


#: What each bad input's error says (the test id → a regular expression).
BAD_INPUT_MESSAGES = {
    "float-mask": "mask must be a bool tensor",
    "2d-mask": "mask must be 3D",
    "negative-radius": "radius must be >= 0",
    "float-radius": "radius must be an int",
    "two-spacings": "spacing must have 3 entries",
    "zero-spacing": "spacing must be finite and > 0",
    "unknown-backend": "backend must be one of",
    "ref-numpy-mask": "mask must be a torch.Tensor",
}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: dilate(torch.zeros(3, 3, 3), 1), TypeError),
        (lambda: dilate(torch.zeros(3, 3, dtype=torch.bool), 1), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), -1), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1.5), TypeError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, (1.0, 1.0)), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, (1.0, 0.0, 1.0)), ValueError),
        (lambda: dilate(torch.zeros(3, 3, 3, dtype=torch.bool), 1, backend="cupy"), ValueError),
        (lambda: dilate_ref(np.zeros((3, 3, 3), dtype=bool), 1), TypeError),
    ],
    ids=[
        "float-mask",
        "2d-mask",
        "negative-radius",
        "float-radius",
        "two-spacings",
        "zero-spacing",
        "unknown-backend",
        "ref-numpy-mask",
    ],
)
def test_bad_inputs_raise(call, error, request):
    case = request.node.callspec.id
    with pytest.raises(error, match=BAD_INPUT_MESSAGES[case]):
        call()


def test_torch_path_reads_nothing_back_from_the_device():
    mask = t(MASKS["dense-12x10x8"])
    with SyncCounter() as reads:
        dilate(mask, 3, (1.0, 1.0, 2.0))
    assert reads.syncs == 0
