"""The Triton kernel of the fused block (an implicit GEMM), its launcher, and its
registration as the custom op ``fastcascade::conv3x3x3_bias_relu``.

Tensors are ``(N, C, X, Y, Z)`` in voxels of the working grid; the kernel reads and
writes them channels-last (``torch.channels_last_3d``, i.e. memory order N, X, Y, Z, C).

The GEMM: ``M = N·X'·Y'·Z'`` output voxels, ``N_gemm = C_out``, ``K = 27·C_in``. The
weights are packed once to a ``(27·C_in, C_out)`` matrix (row ``tap·C_in + c_in`` with
``tap = 9·dx + 3·dy + dz``; columns zero-padded to a multiple of 16 so that every weight
row is 16-byte aligned); each program owns ``BLOCK_M`` voxels × ``BLOCK_N`` output
channels, walks K in ``BLOCK_K`` slices with fp32 accumulation, then adds the folded bias,
applies the ReLU and stores in the input's dtype. Layers with few input channels (the
first layer has one) walk the flattened ``(tap, c_in)`` axis instead of one tap at a
time, so a 1-channel input does not pad each tap to 16 channels.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import configs
from .configs import K_FLAT_BELOW, autotuned_config, kernel_config
from .fallback import TRITON
from .folding import unpack_weight
from .reference import PADDINGS

triton, tl = _backend.import_triton()


# -- the kernel ---------------------------------------------------------------------------
@triton.jit
def _conv3x3x3_bias_relu_kernel(
    x_ptr,  # (N, C_in, XI, YI, ZI), channel stride 1
    w_ptr,  # (27·C_in, WN) packed, folded weights, contiguous; WN = C_out padded to 16
    b_ptr,  # (C_out,) folded bias, fp32
    y_ptr,  # (N, C_out, XO, YO, ZO), contiguous channels-last
    M,  # N·XO·YO·ZO output voxels
    CIN,
    COUT,
    WN,
    XI,
    YI,
    ZI,
    XO,
    YO,
    ZO,
    sxn,  # input strides in elements (batch, x, y, z)
    sxx,
    sxy,
    sxz,
    PAD: tl.constexpr,  # 0: valid, 1: same
    K_FLAT: tl.constexpr,  # walk the flattened (tap, c_in) axis (small C_in)
    EVEN_K: tl.constexpr,  # C_in % BLOCK_K == 0: no channel mask needed
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # tl.dot needs K >= 16 on sm_80/sm_90 (the interpreter would not notice).
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_N >= 16)
    # Output-channel tiles of one voxel block are neighbours in launch order, so the
    # activations they share are read from L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    # Element offsets in int64 (CT-sized activations pass 2^31 elements); voxel
    # coordinates fit int32, which keeps registers free for the pipeline.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    mask_wn = offs_n < WN  # the padded weight columns hold zeros: aligned, vector loads

    zo = (offs_m % ZO).to(tl.int32)
    t = offs_m // ZO
    yo = (t % YO).to(tl.int32)
    t = t // YO
    xo = (t % XO).to(tl.int32)
    n = t // XO
    # Input voxel under tap (0, 0, 0); negative where same padding reads the border.
    xi0 = xo - PAD
    yi0 = yo - PAD
    zi0 = zo - PAD
    row = n * sxn + xi0.to(tl.int64) * sxx + yi0.to(tl.int64) * sxy + zi0.to(tl.int64) * sxz

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if K_FLAT:
        k_total = 27 * CIN
        for k0 in range(0, k_total, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < k_total
            tap = k // CIN
            ci = k - tap * CIN
            dx = tap // 9
            dy = (tap // 3) % 3
            dz = tap % 3
            col = dx * sxx + dy * sxy + dz * sxz + ci
            a_mask = mask_m[:, None] & mask_k[None, :]
            if PAD:
                xi = xi0[:, None] + dx[None, :]
                yi = yi0[:, None] + dy[None, :]
                zi = zi0[:, None] + dz[None, :]
                a_mask &= (xi >= 0) & (xi < XI) & (yi >= 0) & (yi < YI) & (zi >= 0) & (zi < ZI)
            a = tl.load(x_ptr + row[:, None] + col[None, :], mask=a_mask, other=0.0)
            b = tl.load(
                w_ptr + k[:, None] * WN + offs_n[None, :],
                mask=mask_k[:, None] & mask_wn[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        num_kc = tl.cdiv(CIN, BLOCK_K)
        # One flat loop over (tap, channel slice) so that the compiler pipelines it.
        for it in range(0, 27 * num_kc):
            tap = it // num_kc
            ci = (it - tap * num_kc) * BLOCK_K + offs_k
            dx = tap // 9
            dy = (tap // 3) % 3
            dz = tap % 3
            a_rows = row + (dx * sxx + dy * sxy + dz * sxz)
            m_ok = mask_m
            if PAD:
                xi = xi0 + dx
                yi = yi0 + dy
                zi = zi0 + dz
                m_ok &= (xi >= 0) & (xi < XI) & (yi >= 0) & (yi < YI) & (zi >= 0) & (zi < ZI)
            w_rows = tap * CIN + ci
            if EVEN_K:
                a_mask = m_ok[:, None]
                b_mask = mask_wn[None, :]
            else:
                mask_k = ci < CIN
                a_mask = m_ok[:, None] & mask_k[None, :]
                b_mask = mask_k[:, None] & mask_wn[None, :]
            a = tl.load(x_ptr + a_rows[:, None] + ci[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + w_rows[:, None] * WN + offs_n[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue: folded BatchNorm shift, ReLU, cast, channels-last store.
    bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
    out = tl.maximum(acc + bias[None, :], 0.0)
    tl.store(
        y_ptr + offs_m[:, None] * COUT + offs_n[None, :],
        out.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _constexprs(cin: int, padding: str, dtype: torch.dtype, input_precision: str, cfg: dict):
    return {
        "PAD": 1 if padding == "same" else 0,
        "K_FLAT": cin < K_FLAT_BELOW,
        "EVEN_K": cin % cfg["BLOCK_K"] == 0,
        # The precision only matters for fp32 operands; 16-bit ones always multiply exactly.
        "INPUT_PRECISION": input_precision if dtype == torch.float32 else "ieee",
        "BLOCK_M": cfg["BLOCK_M"],
        "BLOCK_N": cfg["BLOCK_N"],
        "BLOCK_K": cfg["BLOCK_K"],
    }


# -- launcher ---------------------------------------------------------------------------
def _output_shape(x: torch.Tensor, cout: int, padding: str) -> tuple[int, ...]:
    n, _, sx, sy, sz = x.shape
    if padding == "same":
        return (n, cout, sx, sy, sz)
    return (n, cout, sx - 2, sy - 2, sz - 2)


def _empty_channels_last(shape, like: torch.Tensor) -> torch.Tensor:
    # The strides of torch.channels_last_3d, spelled out: empty_strided is the cheaper call.
    n, c, x, y, z = shape
    strides = (x * y * z * c, 1, y * z * c, z * c, c)
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)


#: (C_in, C_out, dtype, padding, precision) → (the table it was read from, the block
#: configuration, the kernel's constexprs): read once per layer shape, not per call.
_TABLE_CONFIGS: dict[tuple, tuple] = {}


def _table_config(cin: int, cout: int, dtype, padding: str, input_precision: str):
    """:func:`~.configs.kernel_config` and :func:`_constexprs` of a layer shape, cached
    while ``configs.CONFIGS`` is the same object (replacing it re-reads)."""
    key = (cin, cout, dtype, padding, input_precision)
    hit = _TABLE_CONFIGS.get(key)
    if hit is None or hit[0] is not configs.CONFIGS:
        cfg = kernel_config(cin, cout, dtype)
        constexprs = _constexprs(cin, padding, dtype, input_precision, cfg)
        hit = _TABLE_CONFIGS[key] = (configs.CONFIGS, cfg, constexprs)
    return hit[1], hit[2]


def _launch(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    padding: str,
    input_precision: str,
    cfg: dict | None = None,
) -> torch.Tensor:
    """Run the kernel: ``x`` (N, C_in, X, Y, Z) with channel stride 1, ``packed``
    (27·C_in, C_out padded to 16) in ``x``'s dtype, ``bias`` (C_out,) fp32 → channels-last
    output."""
    cin, cout = x.shape[1], bias.shape[0]
    assert packed.shape[0] == 27 * cin and packed.shape[1] % 16 == 0 and packed.is_contiguous()
    assert packed.dtype == x.dtype and bias.dtype == torch.float32
    assert cin == 1 or x.stride(1) == 1, "the kernel reads channels with stride 1"
    if cfg is not None:
        constexprs = _constexprs(cin, padding, x.dtype, input_precision, cfg)
    elif _backend.autotune_enabled() and not _backend.interpreter_on():
        cfg = autotuned_config(x, packed, bias, padding, input_precision, _launch)
        constexprs = _constexprs(cin, padding, x.dtype, input_precision, cfg)
    else:
        cfg, constexprs = _table_config(cin, cout, x.dtype, padding, input_precision)
    y = _empty_channels_last(_output_shape(x, cout, padding), x)
    n, _, ox, oy, oz = y.shape
    m = n * ox * oy * oz
    if m == 0:
        return y
    # Plain integer ceil-divisions: triton.cdiv called from Python costs ~10 µs each.
    grid = ((-(-m // cfg["BLOCK_M"])) * (-(-cout // cfg["BLOCK_N"])),)
    with _backend.on_device(x):
        _conv3x3x3_bias_relu_kernel[grid](
            x,
            packed,
            bias,
            y,
            m,
            cin,
            cout,
            packed.shape[1],
            *x.shape[2:],
            *y.shape[2:],
            x.stride(0),
            *x.stride()[2:],
            **constexprs,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return y


def _triton(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, pad: int, input_precision: str
) -> torch.Tensor:
    """The body of :func:`_triton_op` (also called directly by eager calls, which skips
    the custom op's dispatch): the kernel, or conv3d + ReLU with the same folded
    parameters where it cannot launch this shape (see ``fallback``)."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    cout = bias.shape[0]
    return TRITON.run(
        x,
        cout,
        pad,
        lambda: _launch(x, packed, bias, PADDINGS[pad], input_precision),
        lambda: (unpack_weight(packed, x.shape[1], cout), bias.to(x.dtype)),
    )


@torch.library.custom_op("fastcascade::conv3x3x3_bias_relu", mutates_args=())
def _triton_op(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, pad: int, input_precision: str
) -> torch.Tensor:
    """relu(conv3d(x, W) + b) through the Triton kernel; W packed by
    :func:`~fastcascade.ops.conv_bn_relu.folding.pack_weight`."""
    return _triton(x, packed, bias, pad, input_precision)


@_triton_op.register_fake
def _(x, packed, bias, pad, input_precision):
    return _empty_channels_last(_output_shape(x, bias.shape[0], PADDINGS[pad]), x)
