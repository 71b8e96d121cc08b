"""Elastic and rigid warping of a CT volume and its labels (training augmentation).

Roth et al. (2018) train on the fly with random 3D elastic deformations (a cubic B-spline
control grid every 32 voxels, displacements up to ±4 voxels), rotations of ±5° and
translations of ±20 voxels; the image is resampled trilinearly, the labels by nearest
neighbour. This file holds that op:

- ``_warp_kernel`` / ``_warp_triton``: one Triton pass over the output, in tiles of up
  to 512 voxels, that computes each voxel's sample position (given coordinates, or
  rotation + translation + B-spline field evaluated in the kernel, with the per-axis
  B-spline weights and rotation terms computed once per row of the tile), samples every
  image channel trilinearly and the labels by nearest neighbour. Offsets are int32, or
  int64 for volumes of 2^31 voxels or more.
- ``control_grid_shape``, ``displacement_field``, ``affine_coordinates``: the sample
  positions in plain PyTorch.
- ``warp_ref``: the plain PyTorch resampling (``grid_sample`` for the image, a gather for
  the labels), which is also the CPU path.
- ``warp`` and ``elastic_affine_warp``: the public functions with ``backend="auto"``.

Conventions shared by every function here: volumes are ``(x, y, z)`` (channels first for
images, ``(C, x, y, z)``), positions and displacements are in voxels of the volume's own
grid (not millimetres), and a coordinate tensor ``coords`` of shape ``(3, X, Y, Z)`` holds,
for every output voxel, the absolute position in the input at which it is sampled
(``coords[0]`` along x, ``coords[1]`` along y, ``coords[2]`` along z). Positions are
computed in float32 at least: bf16/fp16 positions are off by whole voxels at CT sizes.

Outside the input the volume is taken to be surrounded by ``fill_value`` (air, -1024 HU,
by default): a trilinear sample near the border blends in the fill for its corners that
fall outside (SciPy's ``mode="grid-constant"``), and a nearest-neighbour label whose
rounded position falls outside is ``label_fill``. Nearest rounds half up
(``floor(q + 0.5)``), as SciPy's ``map_coordinates(order=0)`` does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import three_positive

triton, tl = _backend.import_triton()

__all__ = [
    "affine_coordinates",
    "control_grid_shape",
    "displacement_field",
    "elastic_affine_warp",
    "warp",
    "warp_ref",
]

_TILE_VOXELS = 512  # output voxels per program (a BX x BY x BZ tile)
_TILE_Z = 64  # at most this many along z: 256-byte rows of fp32, coalesced
_INT32_LIMIT = 2**31 - 1
_NUM_WARPS = 8  # 2 voxels per thread: 80 registers or fewer on sm_90 (Triton 3.6) where 4
# warps need up to 136; benchmarks/bench_warp.py times 4 against it


def _tile(out_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(BX, BY, BZ)``: a tile of at most ``_TILE_VOXELS`` output voxels, z first (the
    contiguous axis), then y, then x; no wider than the volume along any axis, so that a
    small volume (the interpreter's tests) is one program."""
    ox, oy, oz = out_shape
    bz = min(_TILE_Z, _backend.next_pow2(oz))
    by = min(_backend.next_pow2(oy), _TILE_VOXELS // bz)
    bx = min(_backend.next_pow2(ox), _TILE_VOXELS // (bz * by))
    return bx, by, bz


def _padded(out_shape, tile) -> list[int]:
    return [-(-n // b) * b for n, b in zip(out_shape, tile, strict=True)]


def _needs_int64(in_shape, out_shape, tile) -> bool:
    """Whether a voxel offset the kernel forms can pass 2^31 - 1 (then they are int64).

    Offsets are formed per channel (channels advance a pointer), from positions clamped
    to two voxels beyond the input, and for every voxel of the tiles, which may overhang
    the output: the two bounds below.
    """
    largest_in = math.prod(n + 4 for n in in_shape)
    largest_out = math.prod(_padded(out_shape, tile)) - 1
    return max(largest_in, largest_out) > _INT32_LIMIT


def _check_control_indices(out_shape, tile, grid_shape, grid_spacing: float) -> None:
    """Control-point indices are int32: a grid whose indices (around the tiles' voxels,
    four points beyond) could pass 2^31 - 1 is refused; it would hold over 24 GB."""
    bound = math.prod(
        max(g, math.ceil(n / grid_spacing)) + 8
        for g, n in zip(grid_shape, _padded(out_shape, tile), strict=True)
    )
    if bound > _INT32_LIMIT:
        raise ValueError(
            f"a control grid of {tuple(grid_shape)} points (grid_spacing {grid_spacing} voxels "
            f"over {tuple(out_shape)}) is too fine for the Triton kernel; use a larger spacing"
        )


# ----------------------------------------------------------------------------------------
# Triton kernel and launcher
# ----------------------------------------------------------------------------------------


@triton.jit
def _bspline_weight(t):
    # Centred uniform cubic B-spline beta3(t), the same formula as _bspline_matrix.
    d = tl.abs(t)
    inner = 2.0 / 3.0 - d * d + 0.5 * d * d * d
    r = tl.maximum(2.0 - d, 0.0)
    return tl.where(d < 1.0, inner, r * r * r / 6.0)


@triton.jit
def _warp_kernel(
    img_ptr,  # (C, X, Y, Z) input image, any float dtype
    lab_ptr,  # (X, Y, Z) input labels, any integer dtype (unused without labels)
    out_img_ptr,  # (C, OX, OY, OZ) output image, the input's dtype
    out_lab_ptr,  # (OX, OY, OZ) output labels, the input's dtype
    coords_ptr,  # (3, OX, OY, OZ) float32 sample positions (HAS_COORDS only)
    affine_ptr,  # 15 float32: rotation (row-major 3x3), centre (3), centre + shift (3)
    ctrl_ptr,  # (3, GX, GY, GZ) float32 control displacements (HAS_ELASTIC only)
    C,
    X,
    Y,
    Z,
    OX,
    OY,
    OZ,
    GY,
    GZ,
    n_in,  # X * Y * Z
    n_out,  # OX * OY * OZ
    n_ctrl,  # GX * GY * GZ
    tiles_y,  # cdiv(OY, BY)
    tiles_z,  # cdiv(OZ, BZ)
    inv_spacing,
    fill_value,
    label_fill,
    HAS_LABELS: tl.constexpr,
    HAS_COORDS: tl.constexpr,
    HAS_ELASTIC: tl.constexpr,
    INT64: tl.constexpr,  # offsets in int64 (a volume past 2^31 voxels), else int32
    BX: tl.constexpr,
    BY: tl.constexpr,
    BZ: tl.constexpr,
):
    # One BX x BY x BZ tile of output voxels per program. Along each axis the tile's
    # positions are vectors of shape (BX,1,1), (1,BY,1), (1,1,BZ): whatever depends on
    # one axis only (B-spline weights, control-cell indices, the rotation's terms) is
    # computed once per row of the tile and broadcast, never per voxel, and the tile's
    # voxel indices need no division.
    pid = tl.program_id(0)
    pz = pid % tiles_z
    rest = pid // tiles_z
    py = rest % tiles_y
    px = rest // tiles_y
    i = px * BX + tl.arange(0, BX)[:, None, None]
    j = py * BY + tl.arange(0, BY)[None, :, None]
    k = pz * BZ + tl.arange(0, BZ)[None, None, :]
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
        k = k.to(tl.int64)
    mask = (i < OX) & (j < OY) & (k < OZ)
    offs = (i * OY + j) * OZ + k

    # -- sample position of each output voxel ----------------------------------------
    if HAS_COORDS:
        qx = tl.load(coords_ptr + offs, mask=mask, other=0.0)
        qy = tl.load(coords_ptr + n_out + offs, mask=mask, other=0.0)
        qz = tl.load(coords_ptr + n_out + n_out + offs, mask=mask, other=0.0)
    else:
        fi = i.to(tl.float32)
        fj = j.to(tl.float32)
        fk = k.to(tl.float32)
        dx = fi - tl.load(affine_ptr + 9)
        dy = fj - tl.load(affine_ptr + 10)
        dz = fk - tl.load(affine_ptr + 11)
        # Products per row, sums per voxel, in affine_coordinates' order.
        qx = (
            tl.load(affine_ptr + 0) * dx
            + tl.load(affine_ptr + 1) * dy
            + tl.load(affine_ptr + 2) * dz
            + tl.load(affine_ptr + 12)
        )
        qy = (
            tl.load(affine_ptr + 3) * dx
            + tl.load(affine_ptr + 4) * dy
            + tl.load(affine_ptr + 5) * dz
            + tl.load(affine_ptr + 13)
        )
        qz = (
            tl.load(affine_ptr + 6) * dx
            + tl.load(affine_ptr + 7) * dy
            + tl.load(affine_ptr + 8) * dz
            + tl.load(affine_ptr + 14)
        )
        if HAS_ELASTIC:
            # Control point g sits at voxel (g - 1) * spacing: voxel p lies between
            # control points floor(t) and floor(t) + 1 with t = p / spacing + 1.
            tx = fi * inv_spacing + 1.0
            ty = fj * inv_spacing + 1.0
            tz = fk * inv_spacing + 1.0
            bx = tl.floor(tx)
            by = tl.floor(ty)
            bz = tl.floor(tz)
            ux = tx - bx
            uy = ty - by
            uz = tz - bz
            # Control-point indices stay int32 (the launcher checks the grid's size).
            gx0 = bx.to(tl.int32) - 1
            gy0 = by.to(tl.int32) - 1
            gz0 = bz.to(tl.int32) - 1
            # The z weights once per column of the tile; x and y weights once per row.
            wz0 = _bspline_weight(uz + 1.0)
            wz1 = _bspline_weight(uz)
            wz2 = _bspline_weight(uz - 1.0)
            wz3 = _bspline_weight(uz - 2.0)
            ex = tl.zeros([BX, BY, BZ], dtype=tl.float32)
            ey = tl.zeros([BX, BY, BZ], dtype=tl.float32)
            ez = tl.zeros([BX, BY, BZ], dtype=tl.float32)
            # Runtime loops over x and y taps, the four z taps unrolled: unrolling all 64
            # makes a much larger kernel that is slow to build.
            for ta in range(4):
                wa = _bspline_weight(ux + 1.0 - ta)
                plane = (gx0 + ta) * GY
                for tb in range(4):
                    wab = wa * _bspline_weight(uy + 1.0 - tb)
                    row = (plane + gy0 + tb) * GZ + gz0
                    for tc in tl.static_range(4):
                        if tc == 0:
                            w = wab * wz0
                        elif tc == 1:
                            w = wab * wz1
                        elif tc == 2:
                            w = wab * wz2
                        else:
                            w = wab * wz3
                        idx = row + tc
                        ex += w * tl.load(ctrl_ptr + idx, mask=mask, other=0.0)
                        ey += w * tl.load(ctrl_ptr + n_ctrl + idx, mask=mask, other=0.0)
                        ez += w * tl.load(ctrl_ptr + n_ctrl + n_ctrl + idx, mask=mask, other=0.0)
            qx += ex
            qy += ey
            qz += ez

    # Far-outside (and NaN) positions only ever see the fill: clamp them to a range
    # whose float -> int conversion is defined.
    qx = tl.where(qx == qx, tl.minimum(tl.maximum(qx, -2.0), X + 1.0), -2.0)
    qy = tl.where(qy == qy, tl.minimum(tl.maximum(qy, -2.0), Y + 1.0), -2.0)
    qz = tl.where(qz == qz, tl.minimum(tl.maximum(qz, -2.0), Z + 1.0), -2.0)
    x0f = tl.floor(qx)
    y0f = tl.floor(qy)
    z0f = tl.floor(qz)
    fx = qx - x0f  # exact in fp32
    fy = qy - y0f
    fz = qz - z0f
    x0 = x0f.to(offs.dtype)
    y0 = y0f.to(offs.dtype)
    z0 = z0f.to(offs.dtype)

    # -- image: trilinear, corners outside read the fill -----------------------------
    src_ch = img_ptr
    dst_ch = out_img_ptr + offs
    for _ in range(C):
        acc = tl.zeros([BX, BY, BZ], dtype=tl.float32)
        for a in tl.static_range(2):
            xa = x0 + a
            if a == 0:
                wa = 1.0 - fx
            else:
                wa = fx
            ok_a = mask & (xa >= 0) & (xa < X)
            for b in tl.static_range(2):
                yb = y0 + b
                if b == 0:
                    wab = wa * (1.0 - fy)
                else:
                    wab = wa * fy
                ok_ab = ok_a & (yb >= 0) & (yb < Y)
                for c in tl.static_range(2):
                    zc = z0 + c
                    if c == 0:
                        w = wab * (1.0 - fz)
                    else:
                        w = wab * fz
                    ok = ok_ab & (zc >= 0) & (zc < Z)
                    src = src_ch + (xa * Y + yb) * Z + zc
                    v = tl.load(src, mask=ok, other=fill_value).to(tl.float32)
                    acc += w * v
        tl.store(dst_ch, acc.to(out_img_ptr.dtype.element_ty), mask=mask)
        src_ch += n_in
        dst_ch += n_out

    # -- labels: nearest, rounding half up -------------------------------------------
    if HAS_LABELS:
        lx = x0 + (fx >= 0.5).to(offs.dtype)
        ly = y0 + (fy >= 0.5).to(offs.dtype)
        lz = z0 + (fz >= 0.5).to(offs.dtype)
        ok = mask & (lx >= 0) & (lx < X) & (ly >= 0) & (ly < Y) & (lz >= 0) & (lz < Z)
        lab = tl.load(lab_ptr + (lx * Y + ly) * Z + lz, mask=ok, other=label_fill)
        tl.store(out_lab_ptr + offs, lab, mask=mask)


def _warp_triton(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    coords: torch.Tensor | None = None,
    affine: torch.Tensor | None = None,
    control_displacements: torch.Tensor | None = None,
    grid_spacing: float = 32.0,
    fill_value: float = -1024.0,
    label_fill: int = 0,
    out_image: torch.Tensor | None = None,
    out_labels: torch.Tensor | None = None,
    force_int64: bool = False,
    num_warps: int = _NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_warp_kernel``; inputs are validated by the public functions.

    Either ``coords`` ``(3, OX, OY, OZ)`` or ``affine`` (15 float32, see
    ``_affine_params``) with an optional control grid. ``out_image`` / ``out_labels``
    let tests hand in poisoned buffers; ``force_int64`` lets them run the int64-offset
    variant on a small volume; ``num_warps`` lets the benchmark compare launch shapes.
    """
    image = image.contiguous()
    device = image.device
    if coords is not None:
        coords = coords.to(torch.float32).contiguous()
        out_shape = tuple(coords.shape[1:])
    else:
        out_shape = tuple(image.shape[1:])
    if out_image is None:
        out_image = torch.empty((image.shape[0], *out_shape), dtype=image.dtype, device=device)
    has_labels = labels is not None
    if has_labels:
        labels = labels.contiguous()
        if out_labels is None:
            out_labels = torch.empty(out_shape, dtype=labels.dtype, device=device)
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    has_elastic = control_displacements is not None
    ctrl = control_displacements.to(torch.float32).contiguous() if has_elastic else dummy
    gshape = tuple(ctrl.shape[1:]) if has_elastic else (1, 1, 1)
    bx, by, bz = tile = _tile(out_shape)
    tiles = [-(-n // b) for n, b in zip(out_shape, tile, strict=True)]
    if has_elastic:
        _check_control_indices(out_shape, tile, gshape, grid_spacing)
    int64 = force_int64 or _needs_int64(image.shape[1:], out_shape, tile)
    with _backend.on_device(image):
        _warp_kernel[(math.prod(tiles),)](
            image,
            labels if has_labels else dummy,
            out_image,
            out_labels if has_labels else dummy,
            coords if coords is not None else dummy,
            affine if affine is not None else dummy,
            ctrl,
            image.shape[0],
            *image.shape[1:],
            *out_shape,
            *gshape[1:],
            math.prod(image.shape[1:]),
            math.prod(out_shape),
            math.prod(gshape),
            tiles[1],
            tiles[2],
            1.0 / float(grid_spacing),
            float(fill_value),
            int(label_fill),
            HAS_LABELS=has_labels,
            HAS_COORDS=coords is not None,
            HAS_ELASTIC=has_elastic,
            INT64=int64,
            BX=bx,
            BY=by,
            BZ=bz,
            num_warps=num_warps,
        )
    return out_image, (out_labels if has_labels else None)


# ----------------------------------------------------------------------------------------
# Sample positions: B-spline displacement field and rotation + translation
# ----------------------------------------------------------------------------------------


def _check_spacing(grid_spacing: float) -> float:
    if isinstance(grid_spacing, bool) or not isinstance(grid_spacing, (int, float)):
        raise TypeError(f"grid_spacing must be a number of voxels, got {grid_spacing!r}")
    if not grid_spacing > 0:
        raise ValueError(f"grid_spacing must be > 0 voxels, got {grid_spacing!r}")
    return float(grid_spacing)


def control_grid_shape(shape: Sequence[int], grid_spacing: float = 32) -> tuple[int, int, int]:
    """Number of B-spline control points ``(gx, gy, gz)`` covering a volume of ``shape``.

    Along an axis of ``n`` voxels, control point ``g`` sits at voxel ``(g - 1) * spacing``
    for ``g = 0 .. floor((n - 1) / spacing) + 3``: one point before the first voxel and
    two after the last interval, as a cubic B-spline needs four points around every
    position.

    >>> control_grid_shape((132, 132, 116), 32)
    (8, 8, 7)
    """
    shape = three_positive(shape, "shape", integer=True)
    s = _check_spacing(grid_spacing)
    return tuple(int(math.floor((n - 1) / s)) + 4 for n in shape)


def _bspline_matrix(n: int, g: int, spacing: float, device: torch.device) -> torch.Tensor:
    # (n, g) float32: weight of control point k at voxel p, the centred cubic B-spline
    # beta3(p / spacing + 1 - k). Rows sum to 1 (partition of unity), entries are >= 0.
    t = torch.arange(n, dtype=torch.float32, device=device) / spacing + 1.0
    d = (t[:, None] - torch.arange(g, dtype=torch.float32, device=device)[None, :]).abs()
    inner = 2.0 / 3.0 - d * d + 0.5 * d * d * d
    outer = (2.0 - d).clamp(min=0.0) ** 3 / 6.0
    return torch.where(d < 1.0, inner, outer)


def displacement_field(
    shape: Sequence[int], control_displacements: torch.Tensor, grid_spacing: float = 32
) -> torch.Tensor:
    """Dense displacement field of a cubic B-spline control grid.

    ``shape`` is the volume ``(x, y, z)`` in voxels; ``control_displacements`` is
    ``(3, gx, gy, gz)`` with ``(gx, gy, gz) == control_grid_shape(shape, grid_spacing)``:
    component ``c`` (0 = x, 1 = y, 2 = z) of the displacement, in voxels, of control point
    ``(a, b, d)``, which sits at voxel ``((a - 1) s, (b - 1) s, (d - 1) s)`` with
    ``s = grid_spacing`` (voxels). Returns ``(3, x, y, z)`` float32 on the control grid's
    device: ``field[:, p] = sum_k beta3(p / s + 1 - k) * control_displacements[:, k]``
    (a tensor product over the three axes). The weights are non-negative and sum to 1, so
    equal control displacements give that constant field and every component is bounded by
    the largest control displacement's magnitude.

    Always float32, whatever the control grid's dtype: half-precision positions are off by
    whole voxels.

    >>> g = control_grid_shape((40, 40, 40), 32)
    >>> field = displacement_field((40, 40, 40), torch.full((3, *g), 2.0), 32)
    >>> field.shape, round(float(field.min()), 4), round(float(field.max()), 4)
    (torch.Size([3, 40, 40, 40]), 2.0, 2.0)
    """
    shape = three_positive(shape, "shape", integer=True)
    s = _check_spacing(grid_spacing)
    grid = _check_control(control_displacements, shape, s)
    ctrl = control_displacements.to(torch.float32)
    dev = ctrl.device
    wx, wy, wz = (_bspline_matrix(n, g, s, dev) for n, g in zip(shape, grid, strict=True))
    return torch.einsum("cabd,xa,yb,zd->cxyz", ctrl, wx, wy, wz).contiguous()


def _check_control(control_displacements, shape: tuple, grid_spacing: float) -> tuple:
    """Check a control grid for a volume of ``shape``; returns its spatial shape."""
    if not isinstance(control_displacements, torch.Tensor):
        raise TypeError(
            "control_displacements must be a torch.Tensor (3, gx, gy, gz), "
            f"got {type(control_displacements)}"
        )
    grid = control_grid_shape(shape, grid_spacing)
    if tuple(control_displacements.shape) != (3, *grid):
        raise ValueError(
            f"control_displacements must have shape {(3, *grid)} (3, gx, gy, gz) for a volume "
            f"of {shape} with grid_spacing {grid_spacing}, "
            f"got {tuple(control_displacements.shape)}"
        )
    if not control_displacements.is_floating_point():
        raise TypeError(
            f"control_displacements must be floating point, got {control_displacements.dtype}"
        )
    return grid


def _as_vector3(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 3:
            raise ValueError(f"{name} must have 3 values (x, y, z), got shape {value.shape}")
        return tuple(float(v) for v in value.detach().reshape(3).cpu().tolist())
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (x, y, z), got {value!r}")
    return out


def _rotation(rotation_deg: tuple[float, float, float]) -> list[list[float]]:
    # R = Rz @ Ry @ Rx (rotate about x first), angles in degrees, in float64 on the host.
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    cx, sx, cy, sy, cz, sz = (
        math.cos(ax),
        math.sin(ax),
        math.cos(ay),
        math.sin(ay),
        math.cos(az),
        math.sin(az),
    )
    rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]
    ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]]
    rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]]

    def mm(a, b):
        return [[sum(a[r][k] * b[k][c] for k in range(3)) for c in range(3)] for r in range(3)]

    return mm(rz, mm(ry, rx))


def _affine_params(shape, rotation_deg, translation_vox, device) -> torch.Tensor:
    # 15 float32: rotation (row-major), centre, centre + translation; the kernel's layout.
    rot = _rotation(_as_vector3(rotation_deg, "rotation_deg"))
    shift = _as_vector3(translation_vox, "translation_vox")
    centre = [(n - 1) / 2.0 for n in shape]
    values = (
        [v for row in rot for v in row]
        + centre
        + [c + t for c, t in zip(centre, shift, strict=True)]
    )
    return torch.tensor(values, dtype=torch.float32, device=device)


def affine_coordinates(
    shape: Sequence[int],
    rotation_deg=(0.0, 0.0, 0.0),
    translation_vox=(0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample positions of a rotation about the volume's centre plus a translation.

    ``shape`` is ``(x, y, z)`` in voxels; ``rotation_deg`` three angles in degrees about the
    x, y and z axes, composed as ``R = Rz @ Ry @ Rx``; ``translation_vox`` a shift in
    voxels (three numbers or a tensor of 3). Returns ``(3, x, y, z)`` float32 on ``device``
    (``None``: torch's current default device) with, for every output voxel ``p``, the input
    position ``q = R (p - c) + c + t`` where ``c = (shape - 1) / 2`` is the centre. The
    content therefore moves by ``-t`` and turns by ``R^T``. Rotations act on voxel indices:
    on an anisotropic grid they are not rigid in millimetres.

    >>> q = affine_coordinates((4, 5, 6), (0.0, 0.0, 0.0), (1.0, 0.0, -2.0))
    >>> q.shape, q[:, 0, 0, 0].tolist()
    (torch.Size([3, 4, 5, 6]), [1.0, 0.0, -2.0])
    """
    shape = three_positive(shape, "shape", integer=True)
    params = _affine_params(shape, rotation_deg, translation_vox, device)
    rot, centre, origin = params[:9].reshape(3, 3), params[9:12], params[12:]
    axes = [torch.arange(n, dtype=torch.float32, device=params.device) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, x, y, z)
    rel = grid - centre[:, None, None, None]
    # Written out (not a matmul) so that a zero angle is the identity to the last bit.
    q = [rot[r, 0] * rel[0] + rot[r, 1] * rel[1] + rot[r, 2] * rel[2] + origin[r] for r in range(3)]
    return torch.stack(q)


# ----------------------------------------------------------------------------------------
# Reference resampling (the CPU path)
# ----------------------------------------------------------------------------------------


def _check_warp_inputs(image, labels, coords=None) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor (C, x, y, z), got {type(image)}")
    if image.dim() != 4:
        raise ValueError(f"image must be (C, x, y, z), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point (HU), got {image.dtype}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor (x, y, z) or None, got {type(labels)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise ValueError(
                f"labels must be (x, y, z) = {tuple(image.shape[1:])} like the image, "
                f"got {tuple(labels.shape)}"
            )
        if labels.device != image.device:
            raise ValueError(f"labels are on {labels.device}, the image on {image.device}")
    if coords is not None:
        if not isinstance(coords, torch.Tensor):
            raise TypeError(f"coords must be a torch.Tensor (3, X, Y, Z), got {type(coords)}")
        if coords.dim() != 4 or coords.shape[0] != 3 or coords.numel() == 0:
            raise ValueError(f"coords must be (3, X, Y, Z), got shape {tuple(coords.shape)}")
        if coords.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"coords must be float32 or float64 voxel positions, got {coords.dtype} "
                "(half-precision positions are off by whole voxels)"
            )
        if coords.device != image.device:
            raise ValueError(f"coords are on {coords.device}, the image on {image.device}")


def _check_label_fill(labels: torch.Tensor | None, label_fill: int) -> int:
    try:
        if isinstance(label_fill, bool):
            raise TypeError
        label_fill = operator.index(label_fill)
    except TypeError:
        raise TypeError(f"label_fill must be an int class id, got {label_fill!r}") from None
    if labels is not None:
        info = torch.iinfo(labels.dtype)
        if not info.min <= label_fill <= info.max:
            raise ValueError(
                f"label_fill {label_fill} does not fit the labels' dtype {labels.dtype} "
                f"({info.min}..{info.max})"
            )
    return label_fill


def warp_ref(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    coords: torch.Tensor,
    fill_value: float = -1024.0,
    label_fill: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image`` trilinearly and ``labels`` by nearest neighbour at ``coords``.

    Plain PyTorch: ``F.grid_sample`` for the image, an index gather for the labels; the
    CPU path of ``warp``. ``image`` is ``(C, x, y, z)`` floating point (HU), ``labels``
    ``(x, y, z)`` of an integer dtype or ``None``, ``coords`` ``(3, X, Y, Z)`` float32/64
    absolute positions in voxels of the input (see the module docstring). Returns the image
    ``(C, X, Y, Z)`` in its own dtype and the labels ``(X, Y, Z)`` in theirs (or ``None``).
    Outside the input: ``fill_value`` (HU) blended trilinearly, ``label_fill`` for labels.

    The image is interpolated in float64 so that integer positions return the input
    exactly (``grid_sample``'s normalise/unnormalise round trip is not exact in float32).

    >>> img = torch.arange(8.0).reshape(1, 2, 2, 2)
    >>> out, _ = warp_ref(img, None, torch.full((3, 1, 1, 1), 0.5))
    >>> out.flatten().tolist()
    [3.5]
    """
    _check_warp_inputs(image, labels, coords)
    _check_label_fill(labels, label_fill)
    sizes = image.shape[1:]
    q = coords.to(torch.float64)
    # grid_sample wants (z, y, x) in the last dimension, normalised to [-1, 1]. With
    # align_corners=False voxel i spans [i - 0.5, i + 0.5], so position q maps to
    # (2q + 1) / n - 1; unlike align_corners=True this also works for a single-voxel axis.
    grid = torch.stack([(2.0 * q[a] + 1.0) / sizes[a] - 1.0 for a in (2, 1, 0)], dim=-1)
    # Zero padding + shifting by the fill = corners outside the volume read fill_value.
    shifted = image.to(torch.float64) - fill_value
    out = F.grid_sample(  # "bilinear" on a 5-D input is trilinear
        shifted[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    out_image = (out + fill_value).to(image.dtype)
    if labels is None:
        return out_image, None

    # Round half up: floor(q) + (frac >= 0.5); q - floor(q) is exact in binary floating point.
    base = torch.floor(coords)
    idx = (base + (coords - base >= 0.5).to(coords.dtype)).to(torch.int64)
    limits = torch.tensor(sizes, device=idx.device).view(3, 1, 1, 1)
    inside = ((idx >= 0) & (idx < limits)).all(dim=0)
    idx = torch.minimum(idx.clamp(min=0), limits - 1)
    picked = labels[idx[0], idx[1], idx[2]]
    fill = torch.tensor(label_fill, dtype=labels.dtype, device=labels.device)
    return out_image, torch.where(inside, picked, fill)


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------


def warp(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    coords: torch.Tensor,
    fill_value: float = -1024.0,
    label_fill: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image`` trilinearly and ``labels`` by nearest neighbour at ``coords``.

    Shapes, dtypes and units as ``warp_ref``: ``image`` ``(C, x, y, z)`` float (HU),
    ``labels`` ``(x, y, z)`` integer or ``None``, ``coords`` ``(3, X, Y, Z)`` float32/64
    absolute input positions in voxels; returns ``((C, X, Y, Z), (X, Y, Z) | None)`` in the
    inputs' dtypes on their device. ``backend``: ``"torch"`` (``warp_ref``), ``"triton"``
    (one kernel; positions in float32; ``BackendUnavailableError`` where it cannot run) or
    ``"auto"`` (Triton for CUDA tensors when it is installed, else torch). The two agree to
    float32 rounding; labels may differ only where a position lies within rounding of a
    .5 tie.

    >>> img = torch.zeros(1, 4, 4, 4)
    >>> lab = torch.zeros(4, 4, 4, dtype=torch.uint8)
    >>> out, out_lab = warp(img, lab, affine_coordinates((4, 4, 4), translation_vox=(9, 0, 0)))
    >>> float(out.max()), int(out_lab.max())
    (-1024.0, 0)
    """
    _check_warp_inputs(image, labels, coords)
    _check_label_fill(labels, label_fill)
    if _backend.resolve(backend, image) == "triton":
        return _warp_triton(
            image, labels, coords=coords, fill_value=fill_value, label_fill=label_fill
        )
    return warp_ref(image, labels, coords, fill_value, label_fill)


def elastic_affine_warp(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    rotation_deg=(0.0, 0.0, 0.0),
    translation_vox=(0.0, 0.0, 0.0),
    control_displacements: torch.Tensor | None = None,
    grid_spacing: float = 32,
    fill_value: float = -1024.0,
    label_fill: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp by a rotation + translation plus a B-spline elastic field, in one pass.

    The output has the input's shape; output voxel ``p`` samples the input at
    ``affine_coordinates(shape, rotation_deg, translation_vox)[:, p] +
    displacement_field(shape, control_displacements, grid_spacing)[:, p]`` (no elastic
    part when ``control_displacements`` is ``None``). Angles in degrees, translation and
    displacements in voxels, ``control_displacements`` ``(3, gx, gy, gz)`` as
    ``control_grid_shape``. Image ``(C, x, y, z)`` float (HU), labels ``(x, y, z)`` integer
    or ``None``. With Triton the positions are computed inside the kernel and never stored;
    the torch path builds them and calls ``warp_ref``.

    >>> img = torch.randn(1, 8, 8, 8)
    >>> out, _ = elastic_affine_warp(img, None, (0, 0, 0), (0, 0, 0))
    >>> torch.equal(out, img)
    True
    """
    _check_warp_inputs(image, labels)
    _check_label_fill(labels, label_fill)
    shape = tuple(image.shape[1:])
    s = _check_spacing(grid_spacing)
    if control_displacements is not None:
        _check_control(control_displacements, shape, s)
        if control_displacements.device != image.device:
            raise ValueError(
                f"control_displacements are on {control_displacements.device}, "
                f"the image on {image.device}"
            )
    if _backend.resolve(backend, image) == "triton":
        affine = _affine_params(shape, rotation_deg, translation_vox, image.device)
        return _warp_triton(
            image,
            labels,
            affine=affine,
            control_displacements=control_displacements,
            grid_spacing=s,
            fill_value=fill_value,
            label_fill=label_fill,
        )
    coords = affine_coordinates(shape, rotation_deg, translation_vox, device=image.device)
    if control_displacements is not None:
        coords = coords + displacement_field(shape, control_displacements, s)
    return warp_ref(image, labels, coords, fill_value, label_fill)
