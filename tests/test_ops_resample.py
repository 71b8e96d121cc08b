"""Resampling against map_coordinates (linear) and exact fraction arithmetic (nearest)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops.resample import resample, resample_ref, working_shape

# (input shape, output shape): up, down, mixed, odd, to and from a single voxel.
SHAPES = {
    "up-2x": ((4, 5, 3), (8, 10, 6)),
    "down-2x": ((8, 10, 6), (4, 5, 3)),
    "mixed-odd": ((7, 5, 9), (3, 11, 4)),
    "ties-10to3": ((10, 6, 5), (3, 4, 2)),
    "ties-2to61": ((2, 4, 3), (61, 41, 3)),
    "non-integer": ((6, 7, 5), (9, 5, 8)),
    "to-one-voxel": ((5, 4, 3), (1, 1, 1)),
    "from-one-voxel": ((1, 2, 1), (3, 5, 2)),
    "same-z": ((5, 6, 4), (9, 3, 4)),
}


def centres(n: int, m: int) -> np.ndarray:
    """Input coordinates of the output voxel centres, in float64."""
    return (np.arange(m) + 0.5) * n / m - 0.5


def oracle_linear(volume: np.ndarray, out_shape) -> np.ndarray:
    coords = np.meshgrid(
        *[centres(n, m) for n, m in zip(volume.shape, out_shape, strict=True)], indexing="ij"
    )
    return ndimage.map_coordinates(volume.astype(np.float64), coords, order=1, mode="nearest")


def oracle_nearest_indices(n: int, m: int) -> list[int]:
    """floor((x + 1/2) · n / m) with exact rationals."""
    return [int((Fraction(2 * x + 1, 2) * Fraction(n, m)).__floor__()) for x in range(m)]


def oracle_nearest(volume: np.ndarray, out_shape) -> np.ndarray:
    ix, iy, iz = (
        oracle_nearest_indices(n, m) for n, m in zip(volume.shape[-3:], out_shape, strict=True)
    )
    return volume[..., ix, :, :][..., iy, :][..., iz]


@pytest.mark.parametrize("name", list(SHAPES))
def test_linear_matches_map_coordinates(name):
    in_shape, out_shape = SHAPES[name]
    volume = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    expected = oracle_linear(volume, out_shape)
    out = resample(torch.from_numpy(volume), out_shape, mode="linear")
    ref = resample_ref(torch.from_numpy(volume), out_shape, mode="linear")
    assert out.dtype == ref.dtype == torch.float32
    assert out.shape == ref.shape == out_shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.int64, torch.bool, torch.float32]
)
@pytest.mark.parametrize("name", list(SHAPES))
def test_nearest_is_exact_and_keeps_dtype(name, dtype):
    in_shape, out_shape = SHAPES[name]
    labels = np.random.default_rng(1).integers(0, 11, size=in_shape)
    volume = torch.from_numpy(labels).to(dtype)
    expected = oracle_nearest(volume.numpy(), out_shape)
    out = resample(volume, out_shape, mode="nearest")
    ref = resample_ref(volume, out_shape, mode="nearest")
    assert out.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(ref.numpy(), expected)


def test_nearest_exact_ties_take_the_upper_voxel():
    # Output voxel 1 of 3 over 10 inputs is centred at input coordinate 1.5 · 10/3 - 0.5 =
    # 4.5, exactly between voxels 4 and 5: floor((1 + 1/2) · 10/3) = 5 takes the upper one.
    assert oracle_nearest_indices(10, 3) == [1, 5, 8]
    volume = torch.arange(10, dtype=torch.uint8).view(10, 1, 1)
    assert resample(volume, (3, 1, 1), mode="nearest").flatten().tolist() == [1, 5, 8]
    # 2 -> 61: voxel 30 is centred on the boundary between the two inputs (floating-point
    # evaluation of the same formula can round it down to 0).
    two = torch.tensor([7, 9], dtype=torch.uint8).view(2, 1, 1)
    out = resample(two, (61, 1, 1), mode="nearest").flatten().tolist()
    assert out == [7] * 30 + [9] * 31


def test_leading_axes_are_kept_per_channel():
    rng = np.random.default_rng(2)
    volume = torch.from_numpy(rng.random((2, 3, 5, 4, 6)).astype(np.float32))
    out = resample(volume, (7, 3, 5))
    assert out.shape == (2, 3, 7, 3, 5)
    for a in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                out[a, c].numpy(), oracle_linear(volume[a, c].numpy(), (7, 3, 5)), atol=1e-5
            )
    labels = torch.from_numpy(rng.integers(0, 5, (3, 5, 4, 6)).astype(np.uint8))
    out = resample(labels, (7, 3, 5), mode="nearest")
    np.testing.assert_array_equal(out.numpy(), oracle_nearest(labels.numpy(), (7, 3, 5)))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_equal_shapes_return_an_exact_copy(mode):
    volume = torch.randn(2, 5, 4, 3)
    out = resample(volume, (5, 4, 3), mode=mode)
    assert torch.equal(out, volume)
    assert out.data_ptr() != volume.data_ptr()
    two = torch.randn(2, 2, 2)
    assert torch.equal(resample(two, (2, 2, 2), mode=mode), two)


def test_linear_converts_integer_input_to_float32():
    ct = torch.tensor([[[-1000, 1000]]], dtype=torch.int16)
    out = resample(ct, (1, 1, 4))
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == [-1000.0, -500.0, 500.0, 1000.0]


def test_down_then_up_keeps_a_smooth_field():
    g = [np.linspace(0, 1, n) for n in (32, 28, 24)]
    x, y, z = np.meshgrid(*g, indexing="ij")
    field = np.sin(2 * x) * np.cos(1.5 * y) + z**2
    volume = torch.from_numpy(field.astype(np.float32))
    back = resample(resample(volume, (16, 14, 12)), (32, 28, 24))
    interior = (slice(2, -2),) * 3  # the edges clamp instead of extrapolating
    err = (back - volume)[interior].abs().max().item()
    assert err < 5e-3, err


@pytest.mark.parametrize(
    "shape, spacing, target, expected",
    [
        ((512, 512, 100), (0.75, 0.75, 3.0), (1.5, 1.5, 1.5), (256, 256, 200)),
        ((5, 5, 5), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (3, 3, 3)),  # 2.5 rounds up
        ((3, 1, 7), (0.5, 0.5, 0.5), (10.0, 10.0, 10.0), (1, 1, 1)),  # at least 1
        ((122, 101, 112), (3.0, 3.0, 3.0), (1.5, 1.5, 1.5), (244, 202, 224)),
    ],
    ids=["ct-to-1.5mm", "half-rounds-up", "at-least-one", "case-a-like"],
)
def test_working_shape(shape, spacing, target, expected):
    assert working_shape(shape, spacing, target) == expected


#: What each bad input's error says (the test id → a regular expression).
BAD_INPUT_MESSAGES = {
    "2d-volume": "volume must be \\(\\.\\.\\., x, y, z\\)",
    "2-axis-shape": "out_shape must have 3 entries",
    "zero-size": "out_shape must be >= 1 voxel",
    "float-size": "out_shape must be 3 integers",
    "unknown-mode": "mode must be one of",
    "unknown-backend": "backend must be one of",
    "numpy-volume": "volume must be a torch.Tensor",
    "zero-spacing": "spacing must be finite and > 0",
    "2-axis-shape-working": "shape must have 3 entries",
}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: resample(torch.zeros(3, 3), (2, 2, 2)), ValueError),
        (lambda: resample(torch.zeros(3, 3, 3), (2, 2)), ValueError),
        (lambda: resample(torch.zeros(3, 3, 3), (2, 0, 2)), ValueError),
        (lambda: resample(torch.zeros(3, 3, 3), (2.5, 2, 2)), TypeError),
        (lambda: resample(torch.zeros(3, 3, 3), (2, 2, 2), mode="cubic"), ValueError),
        (lambda: resample(torch.zeros(3, 3, 3), (2, 2, 2), backend="triton"), ValueError),
        (lambda: resample(np.zeros((3, 3, 3)), (2, 2, 2)), TypeError),
        (lambda: working_shape((3, 3, 3), (1, 1, 0), (1, 1, 1)), ValueError),
        (lambda: working_shape((3, 3), (1, 1, 1), (1, 1, 1)), ValueError),
    ],
    ids=[
        "2d-volume",
        "2-axis-shape",
        "zero-size",
        "float-size",
        "unknown-mode",
        "unknown-backend",
        "numpy-volume",
        "zero-spacing",
        "2-axis-shape-working",
    ],
)
def test_bad_inputs_raise(call, error, request):
    case = request.node.callspec.id
    with pytest.raises(error, match=BAD_INPUT_MESSAGES[case]):
        call()


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resample_reads_nothing_back_from_the_device(mode):
    volume = torch.rand(2, 5, 6, 7)
    with SyncCounter() as reads:
        resample(volume, (3, 8, 9), mode=mode)
    assert reads.syncs == 0
