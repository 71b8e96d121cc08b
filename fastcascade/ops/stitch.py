"""Overlap-averaged stitching: network tiles in, one probability volume and labels out.

Each tile's output ``p`` (C classes) is added into an accumulator as ``p · w`` and its
weight ``w`` into a weight sum, with ``w`` constant or Gaussian (nnU-Net's importance
map, which trusts the tile centre more than its border). :func:`finalize` divides:
probabilities ``acc / weight_sum`` and labels ``argmax(acc)`` (the division by a positive
per-voxel sum does not change the argmax, so labels skip it).

Callers pad the accumulator so that every tile lies inside it; voxels no tile covered
(``weight_sum == 0``) and voxels outside an optional mask come out as background.

**Triton** (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), two kernels:

1. ``_accumulate_kernel`` adds a whole batch of B tiles (or slabs, or phase-shifted
   passes: anything with an origin and the same size) in one launch. A program takes one
   tile's block of ``BR`` rows (``(x, y)`` pairs of the tile) by ``BZ`` voxels along z,
   loads the weight once and, for every class, the tile's values, and adds ``p · w`` into
   ``acc`` and ``w`` into ``weight_sum`` with relaxed atomic adds (tiles overlap, so two
   programs may add to one voxel). Per tile voxel it reads ``C`` values and issues
   ``C + 1`` atomic adds, which the L2 cache performs: for 2,178 tiles of 44×44×28 with
   8 classes into 8×256³ that is 3.8 GB of tile data read, the traffic floor of any
   stitching (≈ 1.1 ms at an H100's 3.35 TB/s).
2. ``_finalize_kernel`` reads each voxel's ``C`` accumulated values, its weight sum and
   its mask bit once, and writes its label (the first largest class, as ``torch.argmax``,
   NaN counting as largest; background where ``weight_sum`` is not positive or the mask
   is False) and, only when asked, its ``C`` probabilities (IEEE division, as PyTorch's).
   Labels alone read ``4·C + 5`` bytes per voxel and write 1, with no probability volume
   in between.

Both take any strides (views into padded accumulators, channel slices of a probability
volume), compute voxel offsets in int64 and leave out-of-range voxels alone.

**torch** (every device): ``index_add_`` over flat voxel indices for the batch, and
``argmax`` / ``div`` / ``masked_fill_`` for the finalisation.

Exactness: on the CPU, the scatter path adds in the same order as the slice-add loop and
matches it bit for bit; the tests allow a few ulp on probabilities and none on labels
(``docs/conventions.md``, "Exactness"). On a GPU, ``index_add_`` and the Triton kernel use
atomics, which add in no fixed order: probabilities differ from the loop by a few ulp and
labels only where the top two classes are that close. The finalize kernel gives the same
labels as ``argmax`` of the same accumulator and the same probabilities as the division.
The Triton kernels have been checked in Triton's CPU interpreter and compiled for sm_90;
they have not run on a GPU yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend
from ._checks import three_positive

triton, tl = _backend.import_triton()

_BACKENDS = ("auto", "triton", "torch")
_WEIGHT_MODES = ("constant", "gaussian")

#: The Gaussian weight's floor relative to its centre: every voxel of a tile keeps a
#: positive weight, so a voxel only a tile's corner covers still gets that tile's average.
WEIGHT_FLOOR = 1e-6


# --- Triton kernels and launchers ---------------------------------------------------------


@triton.jit
def _accumulate_kernel(
    tile_ptr,  # (B, C, TX, TY, TZ) floating, any strides
    origin_ptr,  # (B, 3) int64, contiguous: each tile's first voxel in acc
    w_ptr,  # (TX, TY, TZ) float32, contiguous (not read without HAS_WEIGHT)
    acc_ptr,  # (C, X, Y, Z) float32, added to
    wsum_ptr,  # (X, Y, Z) float32, added to
    C,
    X,
    Y,
    Z,
    TY,
    TZ,
    n_rows,  # TX * TY: a tile's (x, y) rows
    n_zb,  # cdiv(TZ, BZ): z blocks per row
    n_blocks,  # cdiv(n_rows, BR) * n_zb: programs per tile
    stb,
    stc,
    stx,
    sty,
    stz,  # the tiles' strides
    sac,
    sax,
    say,
    saz,  # acc's strides
    swx,
    swy,
    swz,  # weight_sum's strides
    HAS_WEIGHT: tl.constexpr,
    BR: tl.constexpr,  # rows per program
    BZ: tl.constexpr,  # z voxels per program
):
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid - b * n_blocks
    rb = blk // n_zb
    zb = blk - rb * n_zb
    r = rb * BR + tl.arange(0, BR)  # row within the tile: ix * TY + iy
    ix = r // TY
    iy = r - ix * TY
    iz = zb * BZ + tl.arange(0, BZ)
    b64 = b.to(tl.int64)
    gx = tl.load(origin_ptr + 3 * b64) + ix  # int64: the voxel in acc
    gy = tl.load(origin_ptr + 3 * b64 + 1) + iy
    gz = tl.load(origin_ptr + 3 * b64 + 2) + iz
    row_ok = (r < n_rows) & (gx >= 0) & (gx < X) & (gy >= 0) & (gy < Y)
    ok = row_ok[:, None] & ((iz < TZ) & (gz >= 0) & (gz < Z))[None, :]  # [BR, BZ]
    if HAS_WEIGHT:
        # The weight is contiguous and one tile's voxel count is far below 2^31.
        w = tl.load(w_ptr + (r * TZ)[:, None] + iz[None, :], mask=ok, other=0.0)
    else:
        w = tl.full([BR, BZ], 1.0, tl.float32)
    ws_off = (gx * swx + gy * swy)[:, None] + (gz * swz)[None, :]
    tl.atomic_add(wsum_ptr + ws_off, w, mask=ok, sem="relaxed")
    src = b64 * stb + (ix.to(tl.int64) * stx + iy.to(tl.int64) * sty)[:, None]
    src = tile_ptr + src + (iz.to(tl.int64) * stz)[None, :]
    dst = acc_ptr + (gx * sax + gy * say)[:, None] + (gz * saz)[None, :]
    for _ in range(0, C):  # one class after another: pointer steps, no class padding
        v = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * w
        tl.atomic_add(dst, v, mask=ok, sem="relaxed")
        src += stc
        dst += sac


@triton.jit
def _finalize_kernel(
    acc_ptr,  # (C, X, Y, Z) float32, any strides
    wsum_ptr,  # (X, Y, Z) float32
    mask_ptr,  # (X, Y, Z) uint8 (a bool tensor's bytes); not read without HAS_MASK
    prob_ptr,  # (C, X, Y, Z) floating, written; not touched without PROBS
    label_ptr,  # (X, Y, Z) uint8, contiguous, written
    C,
    Y,
    Z,
    n_rows,  # X * Y
    n_zb,  # cdiv(Z, BZ)
    sac,
    sax,
    say,
    saz,
    swx,
    swy,
    swz,
    smx,
    smy,
    smz,
    spc,
    spx,
    spy,
    spz,
    HAS_MASK: tl.constexpr,
    PROBS: tl.constexpr,
    BR: tl.constexpr,
    BZ: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid // n_zb
    zb = pid - rb * n_zb
    r = rb * BR + tl.arange(0, BR)  # x * Y + y
    x = (r // Y).to(tl.int64)
    y = (r % Y).to(tl.int64)
    z = (zb * BZ + tl.arange(0, BZ)).to(tl.int64)
    ok = (r < n_rows)[:, None] & (z < Z)[None, :]
    ws = tl.load(wsum_ptr + (x * swx + y * swy)[:, None] + (z * swz)[None, :], mask=ok, other=0.0)
    valid = ws > 0.0  # False for 0 and NaN, as in finalize_ref
    if HAS_MASK:
        keep = tl.load(
            mask_ptr + (x * smx + y * smy)[:, None] + (z * smz)[None, :], mask=ok, other=0
        )
        valid = valid & (keep != 0)
    src = acc_ptr + (x * sax + y * say)[:, None] + (z * saz)[None, :]
    if PROBS:
        dst = prob_ptr + (x * spx + y * spy)[:, None] + (z * spz)[None, :]
        divisor = tl.where(valid, ws, 1.0)  # no division by 0 where the result is replaced
    best = tl.full([BR, BZ], float("-inf"), tl.float32)
    best_i = tl.zeros([BR, BZ], dtype=tl.int32)
    for c in range(0, C):
        v = tl.load(src, mask=ok, other=0.0)
        # torch.argmax's order: NaN is largest, and the first class among equals wins;
        # once ``best`` is NaN nothing replaces it (both comparisons are False).
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        best_i = tl.where(take, c, best_i).to(tl.int32)
        if PROBS:
            p = tl.where(valid, tl.math.div_rn(v, divisor), tl.where(c == 0, 1.0, 0.0))
            tl.store(dst, p.to(prob_ptr.dtype.element_ty), mask=ok)
            dst += spc
        src += sac
    labels = tl.where(valid, best_i, 0).to(tl.uint8)
    tl.store(label_ptr + (r.to(tl.int64) * Z)[:, None] + z[None, :], labels, mask=ok)


#: Voxels (rows × z) one program handles, one class at a time: on a GPU 8 per thread of
#: 4 warps (untuned); in the interpreter, where one program is one Python loop, as many as
#: keep its NumPy arrays small.
GPU_VOXELS, GPU_WARPS = 1024, 4
INTERPRETER_VOXELS = 4096


def blocks(rows: int, z: int) -> tuple[int, int]:
    """``(BR, BZ)``: rows and z voxels per program over ``rows`` (x, y) rows of ``z`` voxels;
    up to 32 z voxels on a GPU (one 128-byte segment of float32 per row and class), 64 in
    the interpreter."""
    interpreted = _backend.interpreter_on()
    bz = min(_backend.next_pow2(z), 64 if interpreted else 32)
    voxels = INTERPRETER_VOXELS if interpreted else GPU_VOXELS
    return max(1, min(voxels // bz, _backend.next_pow2(rows))), bz


def _accumulate_triton(acc, weight_sum, tiles, origins, weight, size) -> None:
    """Launch :func:`_accumulate_kernel` over the batch; inputs validated by the caller."""
    num_tiles, channels = tiles.shape[:2]
    n_rows = size[0] * size[1]
    if num_tiles == 0 or n_rows * size[2] == 0:
        return
    o = origins.to(device=acc.device, dtype=torch.int64).contiguous()
    w = acc if weight is None else weight.to(torch.float32).contiguous()  # acc: unread
    br, bz = blocks(n_rows, size[2])
    n_zb = triton.cdiv(size[2], bz)
    n_blocks = triton.cdiv(n_rows, br) * n_zb
    if num_tiles * n_blocks >= 2**31 or n_rows * size[2] >= 2**31:
        # Programs are numbered in int32, and so are voxels within one tile (its weight).
        raise ValueError(
            f"accumulate: {num_tiles} tiles of {size} voxels are too many or too large for "
            "the Triton kernel (2^31 programs, 2^31 voxels per tile); use backend='torch'"
        )
    with _backend.on_device(acc):
        _accumulate_kernel[(num_tiles * n_blocks,)](
            tiles, o, w, acc, weight_sum,
            channels, *acc.shape[1:], size[1], size[2], n_rows, n_zb, n_blocks,
            *tiles.stride(), *acc.stride(), *weight_sum.stride(),
            HAS_WEIGHT=weight is not None, BR=br, BZ=bz, num_warps=GPU_WARPS,
        )  # fmt: skip


def _finalize_triton(acc, weight_sum, mask, out, labels=None) -> torch.Tensor:
    """Launch :func:`_finalize_kernel`; writes ``out`` (unless ``None``) and returns the
    labels (``labels``, a contiguous uint8 ``(X, Y, Z)`` buffer, lets tests poison it)."""
    channels, nx, ny, nz = acc.shape
    if labels is None:
        labels = torch.empty((nx, ny, nz), dtype=torch.uint8, device=acc.device)
    assert labels.dtype == torch.uint8 and labels.shape == (nx, ny, nz) and labels.is_contiguous()
    n_rows = nx * ny
    if n_rows * nz == 0:
        return labels
    if n_rows >= 2**31:
        raise ValueError(f"finalize: {nx}x{ny} rows are too many for the Triton kernel")
    keep = None if mask is None else mask.view(torch.uint8)
    br, bz = blocks(n_rows, nz)
    n_zb = triton.cdiv(nz, bz)
    grid = (triton.cdiv(n_rows, br) * n_zb,)
    mask_strides = (0, 0, 0) if keep is None else keep.stride()
    out_strides = (0, 0, 0, 0) if out is None else out.stride()
    with _backend.on_device(acc):
        _finalize_kernel[grid](
            acc, weight_sum, labels if keep is None else keep, acc if out is None else out, labels,
            channels, ny, nz, n_rows, n_zb,
            *acc.stride(), *weight_sum.stride(), *mask_strides, *out_strides,
            HAS_MASK=keep is not None, PROBS=out is not None, BR=br, BZ=bz, num_warps=GPU_WARPS,
        )  # fmt: skip
    return labels


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

    ``backend``: ``"triton"`` adds the whole batch in one kernel launch with atomic adds
    (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; otherwise
    :class:`~fastcascade.ops._backend.BackendUnavailableError`); ``"torch"`` adds it with
    one ``index_add_`` per tensor over flat voxel indices (any device, no loop);
    ``"auto"`` takes ``"triton"`` for CUDA tensors where Triton is installed, else
    ``"torch"``, except for CPU tensors, where :func:`accumulate_ref`'s slice-add loop is
    about twice as fast as ``index_add_`` and gives the same bits.

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
    chosen = _backend.resolve(backend, acc, candidates=("triton", "torch"))
    if chosen == "triton":
        _accumulate_triton(acc, weight_sum, tiles, origins, weight, size)
    elif tiles.shape[0]:
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
      ``probabilities=False``, and then no probability volume is computed at all;
    - ``labels``: uint8 ``(X, Y, Z)``, ``argmax`` over classes (ties: the lowest class).

    Where ``weight_sum`` is not positive (no tile) or ``mask`` is False, the label is 0
    and the probabilities are background 1, every other class 0. Runs on the tensors'
    device; any strides (views) are accepted.

    ``backend``: ``"triton"`` does it all in one kernel that reads every voxel once
    (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"`` with
    ``argmax``, ``div`` and ``masked_fill_``; ``"auto"`` takes ``"triton"`` for CUDA
    tensors where Triton is installed, else ``"torch"``. Both give the same labels and
    the same probabilities.

    >>> acc = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 0.0]]]])  # 2 classes, 1x1x2 voxels
    >>> probs, labels = finalize(acc, torch.tensor([[[4.0, 0.0]]]))
    >>> probs[:, 0, 0].tolist(), labels.flatten().tolist()
    ([[0.25, 1.0], [0.75, 0.0]], [1, 0])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"finalize: backend must be one of {_BACKENDS}, got {backend!r}")
    _check_finalize(acc, weight_sum, mask)
    chosen = _backend.resolve(backend, acc, candidates=("triton", "torch"))
    if probabilities:
        if out is None:
            out = torch.empty_like(acc)
        elif (
            not isinstance(out, torch.Tensor)
            or out.shape != acc.shape
            or out.device != acc.device
            or not out.is_floating_point()
        ):
            got = (
                (out.dtype, tuple(out.shape), out.device) if isinstance(out, torch.Tensor) else out
            )
            raise ValueError(
                f"out must be a floating {tuple(acc.shape)} tensor on {acc.device}, got {got}"
            )
    else:
        out = None
    if chosen == "triton":
        return out, _finalize_triton(acc, weight_sum, mask, out)
    invalid = ~(weight_sum > 0)
    if mask is not None:
        invalid |= ~mask
    labels = acc.argmax(dim=0).to(torch.uint8)
    labels.masked_fill_(invalid, 0)
    if out is None:
        return None, labels
    torch.div(acc, weight_sum, out=out)
    out.masked_fill_(invalid, 0.0)
    out[0].masked_fill_(invalid, 1.0)
    return out, labels
