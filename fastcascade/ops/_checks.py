"""Argument checks shared by the ops."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch


def check_mask(mask: torch.Tensor, op: str) -> None:
    """A bool tensor ``(x, y, z)``, or a TypeError/ValueError naming ``op``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(f"{op}: mask must be 3D (x, y, z), got shape {tuple(mask.shape)}")


def three_positive(values: Sequence, what: str, integer: bool) -> tuple:
    """``values`` as 3 ints >= 1 (``integer``: voxel counts, NumPy integers accepted) or 3
    finite floats > 0 (mm); a TypeError or ValueError naming ``what`` otherwise."""
    convert = operator.index if integer else float
    try:
        out = tuple(convert(v) for v in values)
    except (TypeError, ValueError):
        kind = "integers (voxels)" if integer else "numbers (mm)"
        raise TypeError(f"{what} must be 3 {kind}, got {values!r}") from None
    if len(out) != 3:
        raise ValueError(f"{what} must have 3 entries (x, y, z), got {values!r}")
    if integer and not all(v >= 1 for v in out):
        raise ValueError(f"{what} must be >= 1 voxel along each axis, got {values!r}")
    if not integer and not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{what} must be finite and > 0 (mm), got {values!r}")
    return out
