"""Overlap-averaged stitching: network tiles in, one probability volume and labels out.

Each tile's output ``p`` (C classes) is added into an accumulator as ``p · w`` and its
weight ``w`` into a weight sum, with ``w`` constant or Gaussian (nnU-Net's importance
map, which trusts the tile centre more than its border). :func:`finalize` divides:
probabilities ``acc / weight_sum`` and labels ``argmax(acc)`` (the division by a positive
per-voxel sum does not change the argmax, so labels skip it).

Callers pad the accumulator so that every tile lies inside it; voxels no tile covered
(``weight_sum == 0``) and voxels outside an optional mask come out as background.

Exactness: on the CPU, the scatter path adds in the same order as the slice-add loop and
matches it bit for bit; the tests allow a few ulp on probabilities and none on labels
(``docs/conventions.md``, "Exactness"). On a GPU, ``index_add_`` uses atomics, which add
in no fixed order: probabilities differ from the loop by a few ulp and labels only where
the top two classes are that close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import three_positive

_BACKENDS = ("auto", "torch")
_WEIGHT_MODES = ("constant", "gaussian")

#: The Gaussian weight's floor relative to its centre: every voxel of a tile keeps a
#: positive weight, so a voxel only a tile's corner covers still gets that tile's average.
WEIGHT_FLOOR = 1e-6


def tile_weight(
    size: Sequence[int],
    mode: str = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-voxel weight of one tile, float32 ``(x, y, z)``, maximum 1.

    ``size``: the tile's output size in voxels; ``mode``: ``"constant"`` (all ones) or
    ``"gaussian"``, nnU-Net's importance map: ``exp(-d²/(2σ²))`` per axis around voxel
    ``size // 2`` with ``σ = size · sigma_scale`` voxels, normalised to 1 at the centre and
    raised to at least :data:`WEIGHT_FLOOR`. ``device``: where to create it (``None``:
    PyTorch's default device).

    >>> w = tile_weight((5, 5, 3), "gaussian")
    >>> float(w.max()), tuple(w.shape), bool(w.min() > 0)
    (1.0, (5, 5, 3), True)
    """
    size = three_positive(size, "size", integer=True)
    if mode not in _WEIGHT_MODES:
        raise ValueError(f"mode must be one of {_WEIGHT_MODES}, got {mode!r}")
    if mode == "constant":
        return torch.ones(size, dtype=torch.float32, device=device)
    if not (math.isfinite(sigma_scale) and sigma_scale > 0):
        raise ValueError(f"sigma_scale must be finite and > 0, got {sigma_scale!r}")
    factors = []
    for n in size:
        d = torch.arange(n, dtype=torch.float64, device=device) - n // 2
        factors.append(torch.exp(-(d**2) / (2.0 * (n * sigma_scale) ** 2)))
    w = factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
    return w.clamp_min(WEIGHT_FLOOR).to(torch.float32)


# --- accumulate ---------------------------------------------------------------------------


def _check_accumulate(acc, weight_sum, tiles, origins, weight) -> tuple[int, int, int]:
    for name, t in (
        ("acc", acc),
        ("weight_sum", weight_sum),
        ("tiles", tiles),
        ("origins", origins),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if acc.dim() != 4 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be float32 (C, X, Y, Z), got {acc.dtype} {tuple(acc.shape)}")
    if weight_sum.dtype != torch.float32 or weight_sum.shape != acc.shape[1:]:
        raise ValueError(
            f"weight_sum must be float32 {tuple(acc.shape[1:])} (acc's spatial shape), got "
            f"{weight_sum.dtype} {tuple(weight_sum.shape)}"
        )
    if tiles.dim() != 5 or tiles.shape[1] != acc.shape[0] or not tiles.is_floating_point():
        raise ValueError(
            f"tiles must be floating (B, {acc.shape[0]}, x, y, z) with acc's {acc.shape[0]} "
            f"channels, got {tiles.dtype} {tuple(tiles.shape)}"
        )
    if origins.dtype in (torch.bool,) or origins.is_floating_point() or origins.is_complex():
        raise TypeError(f"origins must be an integer tensor, got {origins.dtype}")
    if origins.shape != (tiles.shape[0], 3):
        raise ValueError(
            f"origins must be ({tiles.shape[0]}, 3), one (x, y, z) per tile, got "
            f"{tuple(origins.shape)}"
        )
    size = tuple(tiles.shape[2:])
    if weight is not None and (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != size):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be None or a tensor of the tile size {size}, got {got}")
    devices = {acc.device, weight_sum.device, tiles.device}
    if weight is not None:
        devices.add(weight.device)
    if len(devices) != 1:
        raise ValueError(f"acc, weight_sum, tiles and weight must share a device, got {devices}")
    limits = [have - need for have, need in zip(acc.shape[1:], size, strict=True)]
    if tiles.shape[0] and origins.device.type != "cpu":
        # On a device the bounds check must not stall the stream: an asynchronous assert
        # fails the next synchronising call instead of a host read per batch, and the
        # limits stay Python numbers (a tensor built from them would be a blocking copy).
        fits = (origins >= 0).all()
        for axis, limit in enumerate(limits):
            fits &= (origins[:, axis] <= limit).all()
        torch._assert_async(fits)
    elif tiles.shape[0]:
        o = origins.detach()
        bad = ((o < 0) | (o > torch.tensor(limits))).any(dim=1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"tile {b} at origin {tuple(o[b].tolist())} with size {size} does not fit in "
                f"acc's spatial shape {tuple(acc.shape[1:])}; pad acc so that every tile fits"
            )
    return size


def accumulate_ref(
    acc: torch.Tensor,
    weight_sum: torch.Tensor,
    tiles: torch.Tensor,
    origins: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """Reference for :func:`accumulate`: the plain slice-add loop, one tile after another."""
    size = _check_accumulate(acc, weight_sum, tiles, origins, weight)
    w = None if weight is None else weight.to(torch.float32)
    for b, (x, y, z) in enumerate(origins.tolist()):
        region = (slice(x, x + size[0]), slice(y, y + size[1]), slice(z, z + size[2]))
        tile = tiles[b].to(torch.float32)
        if w is None:
            acc[(slice(None), *region)] += tile
            weight_sum[region] += 1.0
        else:
            acc[(slice(None), *region)] += tile * w
            weight_sum[region] += w


def _accumulate_scatter(acc, weight_sum, tiles, origins, weight, size) -> None:
    if not (acc.is_contiguous() and weight_sum.is_contiguous()):
        raise ValueError("acc and weight_sum must be contiguous for the scatter path")
    num_tiles, channels = tiles.shape[:2]
    _, ny, nz = acc.shape[1:]
    device = acc.device
    # Flat voxel index of every tile voxel: origin offset + offset inside the tile.
    ix, iy, iz = (torch.arange(n, device=device, dtype=torch.int64) for n in size)
    inside = (ix[:, None, None] * (ny * nz) + iy[None, :, None] * nz + iz[None, None, :]).view(-1)
    o = origins.to(device=device, dtype=torch.int64)
    start = o[:, 0] * (ny * nz) + o[:, 1] * nz + o[:, 2]
    voxels = (start[:, None] + inside[None, :]).view(-1)  # (B·n,), tile-major
    values = tiles.to(torch.float32)
    if weight is not None:
        w = weight.to(torch.float32)
        values = values * w
        w_all = w.expand(num_tiles, *size).reshape(-1)
    else:
        w_all = torch.ones(voxels.numel(), dtype=torch.float32, device=device)
    # (C, B·n) in tile-major order per class: on the CPU the adds happen in the loop's order.
    values = values.transpose(0, 1).reshape(channels, -1)
    acc.view(channels, -1).index_add_(1, voxels, values)
    weight_sum.view(-1).index_add_(0, voxels, w_all)


def accumulate(
    acc: torch.Tensor,
    weight_sum: torch.Tensor,
    tiles: torch.Tensor,
    origins: torch.Tensor,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Add a batch of tiles into the accumulator, in place.

    ``acc``: float32 ``(C, X, Y, Z)``; ``weight_sum``: float32 ``(X, Y, Z)``; ``tiles``:
    floating ``(B, C, x, y, z)`` (any float dtype, added in float32); ``origins``: integer
    ``(B, 3)``, each tile's first voxel in ``acc`` (voxels), on any device; ``weight``:
    ``(x, y, z)`` from :func:`tile_weight`, or ``None`` for weight 1. For each tile ``b``
    at ``o``: ``acc[:, o:o+size] += tiles[b] · weight`` and
    ``weight_sum[o:o+size] += weight``. Every tile must lie inside ``acc`` (callers pad it);
    otherwise a ValueError names the tile (for CPU origins; device origins are checked by
    an asynchronous assertion, so no host read stalls the GPU).

    ``backend``: ``"torch"`` adds the whole batch with one ``index_add_`` per tensor over
    flat voxel indices (any device, no loop); ``"auto"`` uses it except for CPU tensors,
    where :func:`accumulate_ref`'s slice-add loop is about twice as fast and gives the same
    bits.

    >>> acc, wsum = torch.zeros(2, 4, 4, 4), torch.zeros(4, 4, 4)
    >>> tiles = torch.ones(2, 2, 2, 2, 2)
    >>> accumulate(acc, wsum, tiles, torch.tensor([[0, 0, 0], [1, 1, 1]]))
    >>> float(wsum[1, 1, 1]), float(wsum.sum())
    (2.0, 16.0)
    """
    if backend not in _BACKENDS:
        raise ValueError(f"accumulate: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto" and isinstance(acc, torch.Tensor) and acc.device.type == "cpu":
        accumulate_ref(acc, weight_sum, tiles, origins, weight)
        return
    size = _check_accumulate(acc, weight_sum, tiles, origins, weight)
    if tiles.shape[0]:
        _accumulate_scatter(acc, weight_sum, tiles, origins, weight, size)


# --- finalize -----------------------------------------------------------------------------


def _check_finalize(acc, weight_sum, mask) -> None:
    for name, t in (("acc", acc), ("weight_sum", weight_sum)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if acc.dim() != 4 or acc.dtype != torch.float32 or not 1 <= acc.shape[0] <= 256:
        raise ValueError(
            f"acc must be float32 (C, X, Y, Z) with 1 <= C <= 256 (uint8 labels), got "
            f"{acc.dtype} {tuple(acc.shape)}"
        )
    if weight_sum.dtype != torch.float32 or weight_sum.shape != acc.shape[1:]:
        raise ValueError(
            f"weight_sum must be float32 {tuple(acc.shape[1:])}, got "
            f"{weight_sum.dtype} {tuple(weight_sum.shape)}"
        )
    if weight_sum.device != acc.device:
        raise ValueError(f"acc is on {acc.device} but weight_sum on {weight_sum.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be None or a bool tensor, got {getattr(mask, 'dtype', mask)!r}"
            )
        if mask.shape != acc.shape[1:] or mask.device != acc.device:
            raise ValueError(
                f"mask must be {tuple(acc.shape[1:])} on {acc.device}, got "
                f"{tuple(mask.shape)} on {mask.device}"
            )


def finalize_ref(
    acc: torch.Tensor,
    weight_sum: torch.Tensor,
    mask: torch.Tensor | None = None,
    probabilities: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Reference for :func:`finalize`, written with ``torch.where``."""
    _check_finalize(acc, weight_sum, mask)
    valid = weight_sum > 0
    if mask is not None:
        valid = valid & mask
    labels = torch.where(valid, acc.argmax(dim=0), 0).to(torch.uint8)
    if not probabilities:
        return None, labels
    background = torch.zeros(acc.shape[0], 1, 1, 1, dtype=torch.float32, device=acc.device)
    background[0] = 1.0
    probs = torch.where(valid, acc / weight_sum, background)
    return probs, labels


def finalize(
    acc: torch.Tensor,
    weight_sum: torch.Tensor,
    mask: torch.Tensor | None = None,
    probabilities: bool = True,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Probabilities and labels from an accumulator filled by :func:`accumulate`.

    ``acc``: float32 ``(C, X, Y, Z)``, C <= 256; ``weight_sum``: float32 ``(X, Y, Z)``;
    ``mask``: optional bool ``(X, Y, Z)``. Returns ``(probabilities, labels)``:

    - ``probabilities``: ``acc / weight_sum``, ``(C, X, Y, Z)``, float32 (or ``out``'s
      dtype when ``out`` is given; it is written completely and returned); ``None`` when
      ``probabilities=False``;
    - ``labels``: uint8 ``(X, Y, Z)``, ``argmax`` over classes (ties: the lowest class).

    Where ``weight_sum`` is 0 (no tile) or ``mask`` is False, the label is 0 and the
    probabilities are background 1, every other class 0. Runs on the tensors' device.
    ``backend``: ``"auto"`` or ``"torch"`` (the same for now).

    >>> acc = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 0.0]]]])  # 2 classes, 1x1x2 voxels
    >>> probs, labels = finalize(acc, torch.tensor([[[4.0, 0.0]]]))
    >>> probs[:, 0, 0].tolist(), labels.flatten().tolist()
    ([[0.25, 1.0], [0.75, 0.0]], [1, 0])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"finalize: backend must be one of {_BACKENDS}, got {backend!r}")
    _check_finalize(acc, weight_sum, mask)
    invalid = ~(weight_sum > 0)
    if mask is not None:
        invalid |= ~mask
    labels = acc.argmax(dim=0).to(torch.uint8)
    labels.masked_fill_(invalid, 0)
    if not probabilities:
        return None, labels
    if out is None:
        out = torch.empty_like(acc)
    elif (
        not isinstance(out, torch.Tensor)
        or out.shape != acc.shape
        or out.device != acc.device
        or not out.is_floating_point()
    ):
        got = (out.dtype, tuple(out.shape), out.device) if isinstance(out, torch.Tensor) else out
        raise ValueError(
            f"out must be a floating {tuple(acc.shape)} tensor on {acc.device}, got {got}"
        )
    torch.div(acc, weight_sum, out=out)
    out.masked_fill_(invalid, 0.0)
    out[0].masked_fill_(invalid, 1.0)
    return out, labels
