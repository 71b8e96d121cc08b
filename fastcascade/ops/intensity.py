"""Intensity normalisation: a HU window mapped linearly onto [-1, 1]."""

from __future__ import annotations

import torch


def apply_window(image_hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Clip ``image_hu`` (any shape, HU) to ``window = (lo, hi)`` and map it onto [-1, 1].

    Returns float32 on the input's device.

    >>> apply_window(torch.tensor([-2000.0, 0.0, 2000.0]), (-1000.0, 1000.0))
    tensor([-1.,  0.,  1.])
    """
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    x = image_hu.float().clamp(lo, hi)
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


def window_value(hu: float, window: tuple[float, float]) -> float:
    """``apply_window`` of one Python number, without creating a tensor."""
    lo, hi = float(window[0]), float(window[1])
    return (min(max(float(hu), lo), hi) - lo) * (2.0 / (hi - lo)) - 1.0
