"""Binary dilation by a ball of radius r: the candidate map C2 from stage 1's foreground.

The structuring element (``docs/conventions.md``, "Geometry"): the
offsets ``(i, j, k)`` with ``(i·sx)² + (j·sy)² + (k·sz)² ≤ (r·min(s))²``, i.e. a ball of
radius r voxels on an isotropic grid and the ball of radius ``r × finest spacing`` mm, an
ellipsoid in voxels, on an anisotropic one.

The torch path decomposes the element into its rows along z: every ``(i, j)`` column of
an ellipsoid is one run of offsets ``-w..w``. The mask is dilated along z once per
distinct half-width ``w`` (incrementally, two shifted ORs per step) and each row ORs that
result, shifted by ``(i, j)``, into the output. Only boolean ORs of shifted slices: it is
exact by construction and runs on the tensor's device with no host transfer.

Exactness: bit-exact against ``scipy.ndimage.binary_dilation`` with the same element
(voxels outside the volume count as background), which the tests check, together with a
Euclidean distance transform as an independent oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from ._checks import check_mask, three_positive

_BACKENDS = ("auto", "torch", "scipy")

# Offsets within this relative margin of the ellipsoid's surface count as inside, so that
# spacings whose ratios are exact in decimal, e.g. (0.7, 0.7, 1.4) mm, give the same
# element as (1, 1, 2) mm despite binary rounding.
_SURFACE_RTOL = 1e-9


def _check_radius(radius: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise TypeError(f"radius must be an int (voxels), got {type(radius).__name__}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0 voxels, got {radius}")
    return int(radius)


def structuring_element(radius: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The dilation's structuring element as a bool array, centred, of odd shape.

    ``radius``: r in voxels of the finest axis (int >= 0); ``spacing``: voxel size in mm,
    ``(sx, sy, sz)``. True at offset ``(i, j, k)`` (index ``(i + a, j + b, k + c)`` for an
    element of shape ``(2a+1, 2b+1, 2c+1)``) when
    ``(i·sx)² + (j·sy)² + (k·sz)² ≤ (r·min(s))²``; the array is cropped to that set.

    >>> int(structuring_element(3).sum())  # lattice points in a ball of radius 3
    123
    >>> structuring_element(2, spacing=(1.0, 1.0, 2.0)).shape
    (5, 5, 3)
    """
    r = _check_radius(radius)
    s = np.asarray(three_positive(spacing, "spacing", integer=False))
    ratio = s / s.min()  # >= 1, exactly 1 on the finest axis
    half = [int(math.floor(r / q)) + 1 for q in ratio]  # generous; cropped below
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    d2 = sum((g * q) ** 2 for g, q in zip(grids, ratio, strict=True))
    element = d2 <= r * r * (1.0 + _SURFACE_RTOL)
    keep = [
        np.flatnonzero(element.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
    ]
    element = element[tuple(slice(k[0], k[-1] + 1) for k in keep)]
    assert all(n % 2 == 1 for n in element.shape) and element[tuple(n // 2 for n in element.shape)]
    return element


def _z_runs(element: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    """Half-widths of the element's z rows: ``{w: [(i, j), ...]}`` for rows ``-w..w``."""
    a, b, c = (n // 2 for n in element.shape)
    runs: dict[int, list[tuple[int, int]]] = {}
    for ii in range(element.shape[0]):
        for jj in range(element.shape[1]):
            row = element[ii, jj]
            count = int(row.sum())
            if count == 0:
                continue
            w = count // 2
            # A symmetric convex element has centred, unbroken rows.
            assert count % 2 == 1 and row[c - w : c + w + 1].all()
            runs.setdefault(w, []).append((ii - a, jj - b))
    return runs


def _dilate_torch(mask: torch.Tensor, element: np.ndarray) -> torch.Tensor:
    m = mask.contiguous()
    nx, ny, _ = m.shape
    out = torch.zeros_like(m)
    segment = m  # m dilated along z by -w..w, for the current w
    w_done = 0
    runs = _z_runs(element)
    for w in sorted(runs):
        if w > w_done:
            if segment is m:
                segment = m.clone()
            for step in range(w_done + 1, w + 1):
                segment[..., step:] |= m[..., :-step]
                segment[..., :-step] |= m[..., step:]
            w_done = w
        for i, j in runs[w]:
            # out[x, y] |= segment[x - i, y - j] wherever both are inside the volume
            x0, x1 = max(0, i), min(nx, nx + i)
            y0, y1 = max(0, j), min(ny, ny + j)
            if x0 < x1 and y0 < y1:
                out[x0:x1, y0:y1] |= segment[x0 - i : x1 - i, y0 - j : y1 - j]
    return out


def dilate_ref(
    mask: torch.Tensor, radius: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> torch.Tensor:
    """Reference for :func:`dilate`: ``scipy.ndimage.binary_dilation`` with
    :func:`structuring_element`, on the host (one round trip for a device tensor)."""
    check_mask(mask, "dilate_ref")
    element = structuring_element(radius, spacing)
    host = mask.detach().cpu().numpy()
    out = ndimage.binary_dilation(host, structure=element)
    return torch.from_numpy(out).to(mask.device)


def dilate(
    mask: torch.Tensor,
    radius: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
) -> torch.Tensor:
    """Dilate a boolean volume by the ball of radius ``radius`` voxels (see the module).

    ``mask``: bool ``(x, y, z)`` on any device; ``radius``: r >= 0 in voxels of the
    finest axis; ``spacing``: voxel size in mm ``(sx, sy, sz)``, which only shapes the
    element (an ellipsoid in voxels when anisotropic). Returns a new bool ``(x, y, z)``
    tensor on the same device; voxels outside the volume count as background; r = 0
    returns a copy.

    ``backend``: ``"auto"`` and ``"torch"`` run the exact row decomposition on the
    tensor's device (faster than SciPy on the CPU too); ``"scipy"`` runs :func:`dilate_ref`.

    >>> m = torch.zeros(5, 5, 5, dtype=torch.bool)
    >>> m[2, 2, 2] = True
    >>> int(dilate(m, 1).sum())  # the 6 face neighbours and the centre
    7
    """
    if backend not in _BACKENDS:
        raise ValueError(f"dilate: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "scipy":
        return dilate_ref(mask, radius, spacing)
    check_mask(mask, "dilate")
    return _dilate_torch(mask, structuring_element(radius, spacing))
