"""Tests of the end-to-end benchmark's comparison (``benchmarks/e2e_report.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fastcascade.evaluate import dice

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def e2e_report():
    sys.path.insert(0, str(BENCH))
    try:
        import e2e_report as module
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.parametrize("slab", [1, 3, 64], ids=["slab1", "slab3", "slab-whole"])
def test_dice_slabs_matches_evaluate_dice(e2e_report, slab):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 5, size=(7, 5, 4)).astype(np.uint8)
    pred = np.where(rng.random(ref.shape) < 0.3, rng.integers(0, 5, ref.shape), ref)
    pred = pred.astype(np.uint8)
    pred[pred == 4] = 0  # class 4 present in the reference only: Dice 0
    ref[ref == 3] = 1  # class 3 present in the prediction only: Dice 0
    ref[ref == 2] = 1  # class 2 likewise ...
    pred[pred == 2] = 1  # ... and absent from both after this: NaN
    expected = dice(pred, ref, 6)
    got = e2e_report.dice_slabs(pred, ref, 6, slab=slab)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-12)
    assert np.isnan(got[2]) and np.isnan(got[5]) and got[3] == 0 and got[4] == 0
