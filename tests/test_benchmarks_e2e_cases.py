"""Tests of the end-to-end benchmark's cases (``benchmarks/e2e_cases.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def e2e_cases():
    sys.path.insert(0, str(BENCH))
    try:
        import e2e_cases as module
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.parametrize("spacing_mm", [0.8, 1.5], ids=["0.8mm", "1.5mm"])
def test_resample_to_spacing_keeps_field_of_view(e2e_cases, spacing_mm):
    """The outer voxel edges of the resampled grid land where the input's are, in world
    coordinates, for an oblique-free affine with a flip and an offset; values of a linear
    ramp are reproduced where trilinear interpolation is exact."""
    shape, spacing = (12, 10, 7), (3.0, 3.0, 2.5)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, -25.0, 7.0]
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    volume = np.broadcast_to(2.0 * x + 0.0, shape).astype(np.float32)

    fine, fine_affine, fine_shape = e2e_cases.resample_to_spacing(volume, affine, spacing_mm)

    expected_shape = tuple(
        int(math.floor(n * s / spacing_mm + 0.5)) for n, s in zip(shape, spacing, strict=True)
    )
    assert fine_shape == expected_shape == fine.shape
    for corner in (np.zeros(3), np.array(shape, float)):
        edge_in = affine @ np.append(corner - 0.5, 1.0)
        fine_corner = np.where(corner > 0, np.array(fine_shape, float), 0.0)
        edge_out = fine_affine @ np.append(fine_corner - 0.5, 1.0)
        np.testing.assert_allclose(edge_out, edge_in, atol=1e-9)
    # Inside the first and last half input voxel the ramp is clamped; elsewhere exact.
    pos = (np.arange(fine_shape[0]) + 0.5) * shape[0] / fine_shape[0] - 0.5
    inner = (pos >= 0) & (pos <= shape[0] - 1)
    np.testing.assert_allclose(fine[inner, 0, 0], 2.0 * pos[inner], atol=1e-4)
