"""Resampling to and from the working grid, preserving the field of view.

Voxel centres convention: an axis of ``n`` input voxels resampled to ``m`` output voxels
keeps the volume's outer edges, so output voxel ``x_out`` samples the input at

    x_in = (x_out + 0.5) · n / m − 0.5          (in input voxels)

- ``mode="linear"`` (images, probabilities): trilinear interpolation at ``x_in``, clamped
  to the first/last voxel at the edges; this is ``F.interpolate(mode="trilinear",
  align_corners=False)``. No antialiasing: downsampling samples, it does not average.
- ``mode="nearest"`` (labels): input index ``floor((x_out + 0.5) · n / m)``, computed in
  exact integer arithmetic as ``((2·x_out + 1)·n) // (2·m)``; a centre exactly between two
  input voxels takes the upper one. (PyTorch's ``"nearest-exact"`` evaluates the same
  formula in floating point and can land one voxel lower at such ties, e.g. n = 2, m = 61,
  output voxel 30.)

The output's spacing is ``n · s / m`` per axis, which equals the target spacing only when
``n · s / t`` is an integer; :func:`working_shape` picks ``m``.

Exactness: nearest is exact (a gather); linear is fp32 arithmetic, within ~1e-6 relative
of an fp64 evaluation of the same formula; equal shapes return an exact copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._checks import three_positive

_BACKENDS = ("auto", "torch")
_MODES = ("linear", "nearest")


def working_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Number of voxels per axis on the target grid, same field of view.

    ``shape``: voxels ``(x, y, z)``; ``spacing`` and ``target_spacing``: mm per voxel in
    the same order. Returns ``round(n · s / t)`` per axis, halves rounded up, at least 1.

    >>> working_shape((512, 512, 100), (0.75, 0.75, 3.0), (1.5, 1.5, 1.5))
    (256, 256, 200)
    """
    shape = three_positive(shape, "shape", integer=True)
    spacing = three_positive(spacing, "spacing", integer=False)
    target = three_positive(target_spacing, "target_spacing", integer=False)
    return tuple(
        max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target, strict=True)
    )


def _nearest_indices(n: int, m: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(m, device=device, dtype=torch.int64)
    return ((2 * x + 1) * n) // (2 * m)


def _check(volume: torch.Tensor, out_shape: Sequence[int], mode: str) -> tuple[int, int, int]:
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.dim() < 3:
        raise ValueError(f"volume must be (..., x, y, z), got shape {tuple(volume.shape)}")
    if volume.is_complex():
        raise TypeError(f"volume must be real, got dtype {volume.dtype}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if min(volume.shape[-3:]) < 1:
        raise ValueError(f"volume has an empty spatial axis: shape {tuple(volume.shape)}")
    return three_positive(out_shape, "out_shape", integer=True)


def resample_ref(
    volume: torch.Tensor, out_shape: Sequence[int], mode: str = "linear"
) -> torch.Tensor:
    """Reference for :func:`resample`: the convention spelled out with gathers and lerps
    in float64 (linear) or integer index arithmetic (nearest), one axis after another."""
    out_shape = _check(volume, out_shape, mode)
    if mode == "nearest":
        out = volume
        for axis, m in zip((-3, -2, -1), out_shape, strict=True):
            n = out.shape[axis]
            idx = torch.tensor(
                [((2 * i + 1) * n) // (2 * m) for i in range(m)], device=volume.device
            )
            out = out.index_select(axis, idx)
        return out.clone()
    out = volume.to(torch.float64)
    for axis, m in zip((-3, -2, -1), out_shape, strict=True):
        n = out.shape[axis]
        pos = ((torch.arange(m, dtype=torch.float64) + 0.5) * n / m - 0.5).clamp(0, n - 1)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo).to(volume.device)
        shape = [1] * out.dim()
        shape[axis] = m
        frac = frac.view(shape)
        lo, hi = lo.to(volume.device), hi.to(volume.device)
        out = out.index_select(axis, lo) * (1 - frac) + out.index_select(axis, hi) * frac
    return out.to(torch.float32)


def resample(
    volume: torch.Tensor,
    out_shape: Sequence[int],
    mode: str = "linear",
    backend: str = "auto",
) -> torch.Tensor:
    """Resample the last three axes of ``volume`` to ``out_shape``, same field of view.

    ``volume``: ``(..., x, y, z)`` on any device; leading axes (channels, batch) are kept.
    ``out_shape``: ``(x', y', z')`` voxels. ``mode``:

    - ``"linear"`` for images and probabilities: returns float32 (any real input dtype);
    - ``"nearest"`` for labels and masks: returns the input's dtype (uint8 labels stay
      uint8, bool stays bool).

    See the module docstring for the voxel-centre convention. Equal shapes return a copy
    (float32 for linear). ``backend``: ``"auto"`` or ``"torch"`` (the same for now).

    >>> labels = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).view(1, 1, 4)
    >>> resample(labels, (1, 1, 2), mode="nearest")
    tensor([[[1, 3]]], dtype=torch.uint8)
    >>> resample(torch.tensor([0.0, 1.0]).view(1, 1, 2), (1, 1, 4))
    tensor([[[0.0000, 0.2500, 0.7500, 1.0000]]])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"resample: backend must be one of {_BACKENDS}, got {backend!r}")
    out_shape = _check(volume, out_shape, mode)
    lead, in_shape = volume.shape[:-3], tuple(volume.shape[-3:])

    if mode == "nearest":
        if in_shape == out_shape:
            return volume.clone()
        ix, iy, iz = (
            _nearest_indices(n, m, volume.device) for n, m in zip(in_shape, out_shape, strict=True)
        )
        # One gather with broadcast indices: (x', 1, 1), (1, y', 1), (1, 1, z').
        return volume[..., ix[:, None, None], iy[None, :, None], iz[None, None, :]]

    if in_shape == out_shape:
        return volume.to(torch.float32, copy=True)
    flat = volume.reshape(1, -1, *in_shape).to(torch.float32)
    if flat.shape[1] == 0:
        return flat.new_empty(*lead, *out_shape)
    out = F.interpolate(flat, size=out_shape, mode="trilinear", align_corners=False)
    return out.reshape(*lead, *out_shape)
