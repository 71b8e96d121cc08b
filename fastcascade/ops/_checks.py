"""Argument checks shared by the ops."""

from __future__ import annotations

import torch


def check_mask(mask: torch.Tensor, op: str) -> None:
    """A bool tensor ``(x, y, z)``, or a TypeError/ValueError naming ``op``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(f"{op}: mask must be 3D (x, y, z), got shape {tuple(mask.shape)}")
