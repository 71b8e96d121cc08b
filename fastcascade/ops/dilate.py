"""Binary dilation by a ball of radius r: the candidate map C2 from stage 1's foreground.

The structuring element (``docs/conventions.md``, "Geometry"): the
offsets ``(i, j, k)`` with ``(i·sx)² + (j·sy)² + (k·sz)² ≤ (r·min(s))²``, i.e. a ball of
radius r voxels on an isotropic grid and the ball of radius ``r × finest spacing`` mm, an
ellipsoid in voxels, on an anisotropic one. The input is a bool mask or a label map
(uint8, int8, int16, int32 or int64; foreground = ``label > 0``), so the cascade's labels
need no extra pass to become a mask; the output is a bool ``(x, y, z)`` volume.

Every ``(i, j)`` column of the element is one run of offsets ``-w..w`` along z (the
element is convex and symmetric), so

    out[x, y, z] = OR over columns (i, j) of  Dz_w(i,j)(m)[x - i, y - j, z]

where ``Dz_w`` dilates along z by ``-w..w``. Both paths below compute exactly this, with
boolean ORs only: they are exact by construction.

**Triton** (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), two kernels on a
bit-packed intermediate, 32 z-voxels per uint32 word (``NW = ceil(Z / 32)`` words per
z row, bit ``b`` of word ``q`` = voxel ``z = 32·q + b``):

1. ``_pack_z_kernel`` reads the input once (each word's 32 bytes, plus ``HALO`` =
   4–32 bytes either side for the carries, which the neighbouring word's program reads
   too: L1/L2 hits), packs ``m > 0`` into words and, for each distinct half-width ``w``
   the element needs (``r + 1`` of them at most), writes ``Dz_w`` as words:
   ``d |= p << s | p >> s`` plus the neighbours' carry bits, ``s = 1..w`` (so
   ``w <= 31``; the ``"auto"`` choice takes the torch path beyond that).
2. ``_or_columns_kernel`` ORs, per output word, the element's columns' words
   ``Dz_w(i,j)[x - i, y - j, q]`` (one uint32 load per column, 29 for r = 3: 3.6 bytes
   of L2 traffic per output voxel) and unpacks the 32 bits to 32 output bytes.

Bytes moved for an ``N``-voxel uint8/bool volume: ``N`` read and ``N`` written to HBM,
plus ``n_w·N/8`` for the packed ``Dz_w`` words (written by kernel 1, read by kernel 2;
8.4 MB for 256³ at r = 3, which fits in an H100's 50 MB L2). At 256³, r = 3: about
34 MB to 50 MB of HBM traffic, 10–15 µs at the H100's ~3 TB/s achievable bandwidth. The
instruction count is of the same order (sm_90 PTX: kernel 1 ≈ 10 instructions per voxel,
byte extraction and packing; kernel 2 ≈ 6 per column per word plus ≈ 3 per voxel to
unpack, ≈ 8–9 per voxel at r = 3; about 10–12 µs of issue at full occupancy on 132 SMs),
so the estimate for 256³, r = 3 on an H100 is **15–30 µs** for both launches, against
0.995 ms for a simple Triton kernel (one byte load per element offset, 123 per voxel at
r = 3) and 1.51 ms for CuPy's EDT route; it has not been measured on a GPU yet
(``benchmarks/bench_dilate.py`` does). Rows whose length ``Z`` is not a multiple of 16
(e.g. the 150 slices of a half-resolution grid) cannot be moved as 16-byte vectors:
there every voxel is its own byte load and store, with smaller blocks
(:data:`GPU_BLOCKS_UNALIGNED`), perhaps 1.5–2× slower. Alternatives weighed:
byte-wise z-dilation (``2w + 1`` unaligned byte loads per voxel, ≈ 40 operations per
voxel) and byte-wise column ORs (29 byte loads per voxel from L2, ≈ 0.5 GB at 256³)
both cost several times more than the packed words; a single fused kernel would need the
halo's z-dilations in shared memory, which Triton does not expose. Offsets are int64
wherever they span the volume (x planes, slots), int32 within one x plane.

**torch** (every device; the CPU path): the same decomposition on whole tensors, the
mask dilated along z once per distinct half-width ``w`` (incrementally, two shifted ORs
per step), each column ORing that result, shifted by ``(i, j)``, into the output.

Exactness: both are bit-exact against ``scipy.ndimage.binary_dilation`` with the same
element (voxels outside the volume count as background, :func:`dilate_ref`), which the
tests check, together with a Euclidean distance transform as an independent oracle.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from . import _backend
from ._checks import three_positive

triton, tl = _backend.import_triton()

__all__ = ["dilate", "dilate_ref", "structuring_element"]

_BACKENDS = ("auto", "triton", "torch", "scipy")

#: Input dtypes besides bool: label maps, foreground = label > 0.
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

#: The largest z half-width the Triton kernels handle (one neighbour word per side).
TRITON_MAX_Z_HALF_WIDTH = 31

# Offsets within this relative margin of the ellipsoid's surface count as inside, so that
# spacings whose ratios are exact in decimal, e.g. (0.7, 0.7, 1.4) mm, give the same
# element as (1, 1, 2) mm despite binary rounding.
_SURFACE_RTOL = 1e-9

_WORD = 32  # z voxels per packed word


# ----------------------------------------------------------------------------------------
# Triton kernels and launcher
# ----------------------------------------------------------------------------------------


@triton.jit
def _packed_bits(m_ptr, row, z, ok, lane_bit):
    # Bits ``lane_bit`` set where ``m > 0`` at voxels ``z`` ([BX, BP, n] -> [BX, BP]).
    v = tl.load(m_ptr + row + z, mask=ok, other=0)
    bits = (v > 0).to(tl.uint32) << lane_bit
    # The lanes' bits are distinct, so their sum is their OR; tl.sum, unlike tl.reduce
    # with an OR combine function, is vectorised in the interpreter (~1000x faster there).
    return tl.sum(bits, axis=2)


@triton.jit
def _pack_z_kernel(
    m_ptr,  # (X, Y, Z) input, bool viewed as uint8 or integer labels, contiguous
    s_ptr,  # (n_slots, X, Y, NW) int32 packed words, written
    slot_ptr,  # (wmax + 1,) int32: slot of Dz_w, or -1 where no column has half-width w
    X,
    Y,
    Z,
    NW,  # words per z row
    plane_words,  # Y * NW
    n_words,  # X * Y * NW, the stride between slots
    wmax,  # the largest half-width, <= HALO
    HALO: tl.constexpr,  # neighbour voxels read on each side (power of 2, <= 32)
    BX: tl.constexpr,  # x planes per program
    BP: tl.constexpr,  # words of one x plane per program
):
    x = tl.program_id(1) * BX + tl.arange(0, BX)
    p = tl.program_id(0) * BP + tl.arange(0, BP)  # word index within an x plane
    y = p // NW
    q = p - y * NW
    valid = (x[:, None] < X) & (p[None, :] < plane_words)  # [BX, BP]
    # Voxel offsets: x planes in int64 (volumes pass 2^31 voxels), int32 within a plane.
    row = x[:, None, None].to(tl.int64) * Y * Z + (y * Z)[None, :, None]
    row_ok = valid[:, :, None]
    z0 = (q * 32)[None, :, None]
    lane = tl.arange(0, 32)[None, None, :]
    z = z0 + lane
    word = _packed_bits(m_ptr, row, z, row_ok & (z < Z), lane)
    # Only the HALO voxels next to the word reach into it: the previous word's top bits
    # and the next word's low bits, as they would sit in those words.
    h = tl.arange(0, HALO)[None, None, :]
    zp = z0 - HALO + h
    prev = _packed_bits(m_ptr, row, zp, row_ok & (zp >= 0), 32 - HALO + h)
    zn = z0 + 32 + h
    nxt = _packed_bits(m_ptr, row, zn, row_ok & (zn < Z), h)
    dst = s_ptr + x[:, None].to(tl.int64) * plane_words + p[None, :]
    d = word
    slot = tl.load(slot_ptr)
    if slot >= 0:
        tl.store(dst + slot.to(tl.int64) * n_words, d.to(tl.int32, bitcast=True), mask=valid)
    for s in range(1, wmax + 1):
        # Bit b gets voxels z - s and z + s; shifts stay within 1..31 (defined in LLVM).
        sh = tl.cast(s, tl.uint32)  # a Python int in the interpreter, i32 or i64 compiled
        d = d | (word << sh) | (prev >> (32 - sh)) | (word >> sh) | (nxt << (32 - sh))
        slot = tl.load(slot_ptr + s)
        if slot >= 0:
            tl.store(dst + slot.to(tl.int64) * n_words, d.to(tl.int32, bitcast=True), mask=valid)


@triton.jit
def _or_columns_kernel(
    s_ptr,  # (n_slots, X, Y, NW) int32 packed Dz_w words
    col_ptr,  # (n_cols, 3) int32: (i, j, slot) per column of the element
    out_ptr,  # (X, Y, Z) uint8 (a bool tensor's bytes), written
    X,
    Y,
    Z,
    NW,
    plane_words,
    n_words,
    n_cols,
    BX: tl.constexpr,
    BP: tl.constexpr,
):
    x = tl.program_id(1) * BX + tl.arange(0, BX)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    y = p // NW
    q = p - y * NW
    valid = (x[:, None] < X) & (p[None, :] < plane_words)
    acc = tl.zeros([BX, BP], dtype=tl.uint32)
    for c in range(n_cols):
        di = tl.load(col_ptr + 3 * c)
        dj = tl.load(col_ptr + 3 * c + 1)
        slot = tl.load(col_ptr + 3 * c + 2)
        # Bounds and offsets per x plane and per in-plane word, combined once per word.
        xs = x - di
        ys = y - dj
        x_ok = (xs >= 0) & (xs < X)
        y_ok = (ys >= 0) & (ys < Y)
        plane = slot.to(tl.int64) * n_words + xs.to(tl.int64) * plane_words
        src = s_ptr + plane[:, None] + (p - dj * NW)[None, :]
        ok = valid & x_ok[:, None] & y_ok[None, :]
        acc = acc | tl.load(src, mask=ok, other=0).to(tl.uint32, bitcast=True)
    lane = tl.arange(0, 32)
    bits = ((acc[:, :, None] >> lane[None, None, :]) & 1).to(tl.uint8)
    z = (q * 32)[None, :, None] + lane[None, None, :]
    dst = out_ptr + x[:, None, None].to(tl.int64) * Y * Z + (y * Z)[None, :, None] + z
    tl.store(dst, bits, mask=valid[:, :, None] & (z < Z))


#: (BX, BP, num_warps) per kernel on a GPU, for z rows that start 16-byte aligned
#: (``Z % 16 == 0``): 256 words (8 KiB of voxels) per program, the voxels moved as 16-byte
#: vectors, 64 per thread. Untuned: chosen for the vector accesses and for L1 reuse of the
#: column loads across neighbouring x planes.
GPU_BLOCKS = {"pack": (2, 128, 4), "columns": (4, 64, 4)}
#: Unaligned rows move byte by byte, one register each: 64 words per program, 16 voxels
#: per thread (the aligned blocks would need 120-250 registers and spill at HALO = 32).
GPU_BLOCKS_UNALIGNED = {"pack": (2, 32, 4), "columns": (2, 32, 4)}
#: In the interpreter one program is one Python loop: large blocks keep tests fast.
INTERPRETER_BLOCKS = {"pack": (16, 256, 4), "columns": (16, 256, 4)}


def gpu_blocks(kernel: str, aligned: bool) -> tuple[int, int, int]:
    """``(BX, BP, num_warps)`` of ``kernel`` ("pack" or "columns") on a GPU."""
    return (GPU_BLOCKS if aligned else GPU_BLOCKS_UNALIGNED)[kernel]


def _halo_voxels(wmax: int) -> int:
    """The pack kernel's ``HALO``: neighbour voxels per side, a power of 2 in 4..32."""
    assert 0 <= wmax <= TRITON_MAX_Z_HALF_WIDTH
    return max(4, 1 << max(wmax - 1, 0).bit_length())


def _blocks(kernel: str, aligned: bool) -> tuple[int, int, int]:
    if _backend.interpreter_on():
        return INTERPRETER_BLOCKS[kernel]
    return gpu_blocks(kernel, aligned)


def _tables(element: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(slot_of_w, columns)``: int32 ``(wmax + 1,)`` with the slot that holds ``Dz_w``
    (``-1`` where no column needs it) and int32 ``(n_cols, 3)`` rows ``(i, j, slot)``."""
    runs = _z_runs(element)
    wmax = element.shape[2] // 2
    slot_of_w = np.full(wmax + 1, -1, dtype=np.int32)
    for slot, w in enumerate(sorted(runs)):
        slot_of_w[w] = slot
    columns = [(i, j, slot_of_w[w]) for w in sorted(runs) for i, j in runs[w]]
    return slot_of_w, np.asarray(columns, dtype=np.int32).reshape(-1, 3)


@functools.lru_cache(maxsize=64)
def _device_tables(radius: int, spacing: tuple, device: torch.device):
    # One small host-to-device copy per element and device, not per call.
    slot_of_w, columns = _tables(structuring_element(radius, spacing))
    n_slots = int((slot_of_w >= 0).sum())
    return (
        torch.from_numpy(slot_of_w).to(device),
        torch.from_numpy(columns).to(device),
        n_slots,
        len(slot_of_w) - 1,
    )


def _dilate_triton(
    mask: torch.Tensor,
    radius: int,
    spacing: tuple,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the two kernels; inputs are validated by :func:`dilate`.

    ``out`` (bool or uint8 ``(x, y, z)``) and ``workspace`` (int32, at least
    ``n_slots·x·y·ceil(z/32)`` elements) let tests hand in poisoned buffers.
    """
    m = mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    X, Y, Z = m.shape
    if out is None:
        out = torch.empty((X, Y, Z), dtype=torch.bool, device=m.device)
    if m.numel() == 0:
        return out
    slot_of_w, columns, n_slots, wmax = _device_tables(radius, spacing, m.device)
    if wmax > TRITON_MAX_Z_HALF_WIDTH:
        raise ValueError(
            f"dilate: the Triton kernels handle z half-widths up to "
            f"{TRITON_MAX_Z_HALF_WIDTH} voxels, this element needs {wmax}; use backend='torch'"
        )
    nw = -(-Z // _WORD)
    plane_words = Y * nw
    n_words = X * plane_words
    if workspace is None:
        workspace = torch.empty(n_slots * n_words, dtype=torch.int32, device=m.device)
    assert workspace.dtype == torch.int32 and workspace.numel() >= n_slots * n_words
    out_bytes = out.view(torch.uint8) if out.dtype == torch.bool else out
    assert out_bytes.dtype == torch.uint8 and out_bytes.shape == m.shape
    assert out_bytes.is_contiguous()
    with _backend.on_device(m):
        _launch(m, workspace, out_bytes, slot_of_w, columns, wmax, (X, Y, Z, nw))
    return out


def _launch(m, workspace, out_bytes, slot_of_w, columns, wmax, sizes) -> None:
    X, Y, Z, nw = sizes
    plane_words = Y * nw
    n_words = X * plane_words
    # Triton specialises on 16-byte divisibility: rows start aligned iff both hold.
    aligned = Z % 16 == 0 and m.data_ptr() % 16 == 0 and out_bytes.data_ptr() % 16 == 0
    bx, bp, warps = _blocks("pack", aligned)
    grid = (triton.cdiv(plane_words, bp), triton.cdiv(X, bx))
    _pack_z_kernel[grid](
        m, workspace, slot_of_w, X, Y, Z, nw, plane_words, n_words, wmax,
        HALO=_halo_voxels(wmax), BX=bx, BP=bp, num_warps=warps,
    )  # fmt: skip
    bx, bp, warps = _blocks("columns", aligned)
    grid = (triton.cdiv(plane_words, bp), triton.cdiv(X, bx))
    _or_columns_kernel[grid](
        workspace, columns, out_bytes, X, Y, Z, nw, plane_words, n_words, len(columns),
        BX=bx, BP=bp, num_warps=warps,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# The element, the torch path and the SciPy reference
# ----------------------------------------------------------------------------------------


def _check_radius(radius: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise TypeError(f"radius must be an int (voxels), got {type(radius).__name__}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0 voxels, got {radius}")
    return int(radius)


def _check_input(mask: torch.Tensor, op: str) -> None:
    """A bool mask or integer labels ``(x, y, z)``, or a TypeError/ValueError naming ``op``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"{op}: mask must be a bool tensor or integer labels (foreground = label > 0; "
            f"uint8, int8, int16, int32, int64), got dtype {mask.dtype}"
        )
    if mask.dim() != 3:
        raise ValueError(f"{op}: mask must be 3D (x, y, z), got shape {tuple(mask.shape)}")


def _foreground(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


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
    :func:`structuring_element`, on the host (one round trip for a device tensor).

    ``mask``: bool or integer labels ``(x, y, z)`` (foreground = ``label > 0``); returns
    bool ``(x, y, z)`` on ``mask``'s device.
    """
    _check_input(mask, "dilate_ref")
    element = structuring_element(radius, spacing)
    host = _foreground(mask).detach().cpu().numpy()
    out = ndimage.binary_dilation(host, structure=element)
    return torch.from_numpy(out).to(mask.device)


def _choose(backend: str, mask: torch.Tensor, wmax: int) -> str:
    if backend == "scipy":
        return "scipy"
    chosen = _backend.resolve(backend, mask, candidates=("triton", "torch"))
    if chosen == "triton" and backend == "auto" and wmax > TRITON_MAX_Z_HALF_WIDTH:
        return "torch"  # an element longer than the kernels' words along z
    return chosen


def dilate(
    mask: torch.Tensor,
    radius: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
) -> torch.Tensor:
    """Dilate the foreground of a volume by the ball of radius ``radius`` voxels (see the
    module).

    ``mask``: bool ``(x, y, z)``, or integer labels ``(x, y, z)`` (uint8, int8, int16,
    int32, int64) whose foreground is ``label > 0`` (all classes at once, no separate
    ``labels > 0`` pass), on any device; ``radius``: r >= 0 in voxels of the finest axis;
    ``spacing``: voxel size in mm ``(sx, sy, sz)``, which only shapes the element (an
    ellipsoid in voxels when anisotropic). Returns a new bool ``(x, y, z)`` tensor on the
    same device; voxels outside the volume count as background; r = 0 returns the
    foreground (a copy for a bool mask).

    ``backend``: ``"auto"`` takes ``"triton"`` for a CUDA tensor where Triton is
    installed (and the element's z half-width is at most
    :data:`TRITON_MAX_Z_HALF_WIDTH`), else ``"torch"``; ``"triton"`` runs the two
    kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; otherwise
    :class:`~fastcascade.ops._backend.BackendUnavailableError`); ``"torch"`` runs the
    row decomposition on the tensor's device (faster than SciPy on the CPU too);
    ``"scipy"`` runs :func:`dilate_ref`. All four give the same voxels.

    >>> m = torch.zeros(5, 5, 5, dtype=torch.bool)
    >>> m[2, 2, 2] = True
    >>> int(dilate(m, 1).sum())  # the 6 face neighbours and the centre
    7
    >>> labels = torch.zeros(5, 5, 5, dtype=torch.uint8)
    >>> labels[2, 2, 2] = 3
    >>> bool(torch.equal(dilate(labels, 1), dilate(labels > 0, 1)))
    True
    """
    if backend not in _BACKENDS:
        raise ValueError(f"dilate: backend must be one of {_BACKENDS}, got {backend!r}")
    _check_input(mask, "dilate")
    r = _check_radius(radius)
    spacing = three_positive(spacing, "spacing", integer=False)
    element = structuring_element(r, spacing)
    chosen = _choose(backend, mask, element.shape[2] // 2)
    if chosen == "scipy":
        return dilate_ref(mask, r, spacing)
    if chosen == "triton":
        return _dilate_triton(mask, r, spacing)
    return _dilate_torch(_foreground(mask), element)
