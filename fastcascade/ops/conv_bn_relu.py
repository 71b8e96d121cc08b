"""Fused 3x3x3 convolution + BatchNorm (inference) + ReLU: the U-Net's one block.

Reads top to bottom: the Triton kernel (an implicit GEMM), its launcher, BatchNorm
folding and weight packing, the cuDNN path, the reference :func:`conv_bn_relu_ref`
(which is also the CPU path) and the public :func:`conv_bn_relu`.

Tensors are ``(N, C, X, Y, Z)`` in voxels of the working grid; the kernel reads and
writes them channels-last (``torch.channels_last_3d``, i.e. memory order N, X, Y, Z, C).
BatchNorm is folded into the convolution (``w' = w·γ/√(σ²+ε)``,
``b' = (b-μ)·γ/√(σ²+ε) + β``), so only eval-mode BatchNorm (running statistics) can be
fused; batch statistics never go through this file's fast paths.

The GEMM: ``M = N·X'·Y'·Z'`` output voxels, ``N_gemm = C_out``, ``K = 27·C_in``. The
weights are packed once to a ``(27·C_in, C_out)`` matrix (row ``tap·C_in + c_in`` with
``tap = 9·dx + 3·dy + dz``; columns zero-padded to a multiple of 16 so that every weight
row is 16-byte aligned); each program owns ``BLOCK_M`` voxels × ``BLOCK_N`` output
channels, walks K in ``BLOCK_K`` slices with fp32 accumulation, then adds the folded bias,
applies the ReLU and stores in the input's dtype. Layers with ``C_in < 16`` (the first
layer has one channel) walk the flattened ``(tap, c_in)`` axis instead of one tap at a
time, so a 1-channel input does not pad each tap to 16 channels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .conv_configs import CONFIGS

triton, tl = _backend.import_triton()

PADDINGS = ("valid", "same")
PRECISIONS = ("tf32", "ieee")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Under TRITON_INTERPRET=1 programs run one after another in Python: few, large ones.
INTERPRETER_CONFIG = {"BLOCK_M": 512, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}

#: Input channels below which the kernel walks the flattened (tap, channel) K axis.
K_FLAT_BELOW = 16


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


# -- block configurations ------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_config(cin: int, cout: int) -> dict:
    """An untuned block configuration for 16-bit inputs of a layer shape."""
    entry = {"provider": "cudnn", "num_stages": 3, "tuned": False}
    if cin < K_FLAT_BELOW:
        # Gathered element by element: small tiles keep registers from spilling
        # (tests/test_compile_sm90.py prints the resource report).
        return {**entry, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4}
    block_n = min(128, max(16, _next_pow2(cout)))
    block_k = next(bk for bk in (64, 32, 16) if cin % bk == 0 or bk == 16)
    warps = 8 if block_n >= 128 else 4
    return {**entry, "BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}


def kernel_config(cin: int, cout: int, dtype: torch.dtype) -> dict:
    """Block sizes the kernel runs a layer with: the interpreter's fixed configuration, or
    the committed table's entry (``default_config`` for shapes not in it); fp32 inputs
    halve ``BLOCK_K`` (twice the bytes per element in shared memory)."""
    if _backend.interpreter_on():
        return dict(INTERPRETER_CONFIG)
    return _for_dtype(table_entry(cin, cout), dtype)


def table_entry(cin: int, cout: int) -> dict:
    """The committed table's entry for a layer shape, else :func:`default_config`."""
    return dict(CONFIGS.get((cin, cout)) or default_config(cin, cout))


def _for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """``cfg`` for ``dtype``: fp32 halves ``BLOCK_K`` (twice the bytes per element)."""
    if dtype == torch.float32:
        cfg = {**cfg, "BLOCK_K": max(16, cfg["BLOCK_K"] // 2)}
    return cfg


def candidate_configs(cin: int, cout: int, limit: int = 8) -> list[dict]:
    """At most ``limit`` block configurations worth timing for a layer shape (bf16)."""
    default = default_config(cin, cout)
    cap_n = max(16, min(128, _next_pow2(cout)))
    flat = cin < K_FLAT_BELOW
    grid = [
        (default["BLOCK_M"], default["BLOCK_N"], default["BLOCK_K"], default["num_warps"], 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 64, 4, 3),
        (256, 64, 32, 8, 3),
        (64, 64, 64, 4, 4),
        (256, 128, 64, 8, 3),
    ]
    out, seen = [], set()
    for bm, bn, bk, warps, stages in grid:
        bn = min(bn, cap_n)
        bk = 16 if flat else (bk if cin >= bk else max(16, _next_pow2(cin)))
        key = (bm, bn, bk, warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return out[:limit]


_AUTOTUNED: dict[tuple, dict] = {}


def _autotuned_config(x, packed, bias, padding: str, input_precision: str) -> dict:
    """Opt-in run-time autotuning (``FASTCASCADE_AUTOTUNE=1``): the fastest candidate for
    this exact call shape, timed once per process with ``triton.testing.do_bench``."""
    cin, cout = x.shape[1], bias.shape[0]
    key = (tuple(x.shape), cout, x.dtype, x.device, padding, input_precision)
    if key not in _AUTOTUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        best = (float("inf"), kernel_config(cin, cout, x.dtype))
        for cfg in candidate_configs(cin, cout):
            cfg = _for_dtype(cfg, x.dtype)
            try:
                t = do_bench(
                    lambda cfg=cfg: _launch(x, packed, bias, padding, input_precision, cfg)
                )
            except OutOfResources:  # too much shared memory for this GPU
                continue
            best = min(best, (t, cfg), key=lambda b: b[0])
        _AUTOTUNED[key] = best[1]
    return _AUTOTUNED[key]


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
    shrink = 0 if padding == "same" else 2
    return (x.shape[0], cout, *(s - shrink for s in x.shape[2:]))


def _empty_channels_last(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d
    )


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
    if cfg is None:
        if _backend.autotune_enabled() and not _backend.interpreter_on():
            cfg = _autotuned_config(x, packed, bias, padding, input_precision)
        else:
            cfg = kernel_config(cin, cout, x.dtype)
    y = _empty_channels_last(_output_shape(x, cout, padding), x)
    m = y.shape[0] * y.shape[2] * y.shape[3] * y.shape[4]
    if m == 0:
        return y
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cout, cfg["BLOCK_N"]),)
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
        **_constexprs(cin, padding, x.dtype, input_precision, cfg),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y


@torch.library.custom_op("fastcascade::conv3x3x3_bias_relu", mutates_args=())
def _triton_op(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, pad: int, input_precision: str
) -> torch.Tensor:
    """relu(conv3d(x, W) + b) through the Triton kernel; W packed by :func:`pack_weight`."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return _launch(x, packed, bias, PADDINGS[pad], input_precision)


@_triton_op.register_fake
def _(x, packed, bias, pad, input_precision):
    return _empty_channels_last(_output_shape(x, bias.shape[0], PADDINGS[pad]), x)


# -- folding BatchNorm and packing weights -------------------------------------------------
def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm into the preceding convolution.

    ``conv_weight`` (C_out, C_in, kx, ky, kz); ``conv_bias``, ``bn_weight`` (γ),
    ``bn_bias`` (β), ``running_mean`` (μ), ``running_var`` (σ²): (C_out,), ``None`` for an
    absent bias or affine. Returns ``(w', b')`` in ``conv_weight``'s dtype with
    ``conv(x, w') + b' == batch_norm(conv(x, w) + b)`` up to rounding: computed in float64
    and rounded once.

    >>> w, b = fold_bn(torch.ones(2, 1, 3, 3, 3), None, None, None,
    ...                torch.zeros(2), torch.ones(2), 0.0)
    >>> bool((w == 1).all()), b.tolist()
    (True, [0.0, 0.0])
    """
    if conv_weight.dim() < 3:
        raise ValueError(
            f"conv_weight must be (C_out, C_in, *kernel), got {tuple(conv_weight.shape)}"
        )
    cout = conv_weight.shape[0]
    for name, t in (
        ("conv_bias", conv_bias),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and tuple(t.shape) != (cout,):
            raise ValueError(
                f"{name} must have shape ({cout},) to match conv_weight, got {tuple(t.shape)}"
            )
    f64 = dict(dtype=torch.float64, device=conv_weight.device)
    gamma = bn_weight.to(**f64) if bn_weight is not None else torch.ones(cout, **f64)
    beta = bn_bias.to(**f64) if bn_bias is not None else torch.zeros(cout, **f64)
    b = conv_bias.to(**f64) if conv_bias is not None else torch.zeros(cout, **f64)
    scale = gamma / torch.sqrt(running_var.to(**f64) + eps)
    w = conv_weight.to(torch.float64) * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
    shift = (b - running_mean.to(**f64)) * scale + beta
    return w.to(conv_weight.dtype), shift.to(conv_weight.dtype)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) → the kernel's (27·C_in, C_out padded to a multiple of 16)
    matrix, contiguous; row ``(9·dx + 3·dy + dz)·C_in + c_in``, padding columns zero."""
    cout, cin = weight.shape[:2]
    packed = weight.new_zeros(27 * cin, -(-cout // 16) * 16)
    packed[:, :cout] = weight.permute(2, 3, 4, 1, 0).reshape(27 * cin, cout)
    return packed


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with BatchNorm folded in, ready for the fast paths.

    ``weight`` (C_out, C_in, 3, 3, 3) channels-last and ``bias`` (C_out,) in the compute
    dtype (cuDNN); ``packed`` (27·C_in, C_out padded to 16) in the compute dtype and
    ``bias32`` (C_out,) fp32 (the Triton kernel); ``padding`` ``"valid"`` or ``"same"``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    packed: torch.Tensor
    bias32: torch.Tensor
    padding: str

    @classmethod
    def from_params(
        cls, weight, bias, padding: str, dtype: torch.dtype | None = None
    ) -> FoldedConv:
        """From already folded ``weight`` (C_out, C_in, 3, 3, 3) and ``bias`` (C_out,)."""
        dtype = dtype or weight.dtype
        return cls(
            weight=weight.to(dtype).contiguous(memory_format=torch.channels_last_3d),
            bias=bias.to(dtype),
            packed=pack_weight(weight.to(dtype)),
            bias32=bias.to(torch.float32),
            padding=padding,
        )


def _check_module(module: nn.Module) -> tuple[nn.Conv3d, nn.modules.batchnorm._BatchNorm, str]:
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    if not isinstance(conv, nn.Conv3d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(
            "expected a module with .conv (nn.Conv3d) and .bn (nn.BatchNorm3d), e.g. "
            f"fastcascade.model.ConvBNReLU, got {type(module).__name__}"
        )
    if (
        tuple(conv.kernel_size) != (3, 3, 3)
        or tuple(conv.stride) != (1, 1, 1)
        or tuple(conv.dilation) != (1, 1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
    ):
        raise ValueError(
            "only 3x3x3 convolutions with stride 1, dilation 1, one group and zero padding fuse"
        )
    pads = {(0, 0, 0): "valid", (1, 1, 1): "same", "valid": "valid", "same": "same"}
    key = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    if key not in pads:
        raise ValueError(f"conv padding must be 0 (valid) or 1 (same), got {conv.padding!r}")
    if bn.training or bn.running_mean is None:
        # Batch statistics cannot be folded: they depend on the batch being convolved.
        raise ValueError(
            "BatchNorm uses batch statistics (training mode or track_running_stats=False); "
            "only eval-mode BatchNorm with running statistics fuses: call module.eval()"
        )
    return conv, bn, pads[key]


def folded(module: nn.Module, dtype: torch.dtype) -> FoldedConv:
    """The module's folded, packed parameters in ``dtype``, cached on the module.

    The cache key holds each parameter's identity, storage and version counter, so an
    in-place update (an optimizer step, ``load_state_dict``, ``.to()``) refolds.
    """
    conv, bn, padding = _check_module(module)
    params = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def fold() -> FoldedConv:
        w, b = fold_bn(*params, bn.eps)
        return FoldedConv.from_params(w, b, padding, dtype)

    if torch.compiler.is_compiling() or any(p is not None and p.is_inference() for p in params):
        return fold()  # traced into the graph / inference tensors have no version counter
    key = (dtype, bn.eps, tuple((id(p), p.data_ptr(), p._version) for p in params if p is not None))
    cache = module.__dict__.setdefault("_fastcascade_folded", {})
    hit = cache.get(dtype)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[dtype] = (key, fold())
    return hit[1]


# -- the cuDNN path ------------------------------------------------------------------------
@torch.library.custom_op("fastcascade::cudnn_conv_bias_relu", mutates_args=())
def _cudnn_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
    """relu(conv3d(x, weight) + bias) through cuDNN's fused kernel (CUDA tensors)."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.cudnn_convolution_relu(x, weight, bias, [1, 1, 1], [pad] * 3, [1, 1, 1], 1)
    return y.contiguous(memory_format=torch.channels_last_3d)


@_cudnn_op.register_fake
def _(x, weight, bias, pad):
    return _empty_channels_last(_output_shape(x, weight.shape[0], PADDINGS[pad]), x)


# -- reference -----------------------------------------------------------------------------
def conv_bn_relu_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-5,
    padding: str = "valid",
) -> torch.Tensor:
    """``relu(batch_norm(conv3d(x, weight, bias), running stats))`` in plain PyTorch.

    ``x`` (N, C_in, X, Y, Z) float; ``weight`` (C_out, C_in, 3, 3, 3); the rest (C_out,).
    Output (N, C_out, X', Y', Z') with ``X' = X - 2`` for ``"valid"`` padding and
    ``X' = X`` for ``"same"``; the dtype of ``x``.

    >>> x = torch.randn(1, 2, 5, 5, 5)
    >>> y = conv_bn_relu_ref(x, torch.randn(4, 2, 3, 3, 3), None, None, None,
    ...                      torch.zeros(4), torch.ones(4))
    >>> tuple(y.shape)
    (1, 4, 3, 3, 3)
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    y = F.conv3d(x, weight, bias, padding=1 if padding == "same" else 0)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training=False, eps=eps)
    return F.relu(y)


# -- public --------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _needs_grad(x: torch.Tensor, tensors) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))


def _provider(
    backend: str, x: torch.Tensor, cin: int, cout: int, dtype, input_precision, needs_grad
) -> str:
    name = _backend.resolve(backend, x, candidates=("triton", "cudnn", "torch"))
    if name == "torch":
        return name
    if backend != "auto":
        if needs_grad:
            raise ValueError(
                f"backend {backend!r} does not propagate gradients (BatchNorm is folded without "
                "autograd): call it under torch.no_grad() / torch.inference_mode(), or use "
                "backend='torch'"
            )
        return name
    if needs_grad or dtype not in KERNEL_DTYPES:
        return "torch"  # e.g. fine-tuning with frozen BatchNorm: gradients must reach the conv
    if name == "cudnn":
        return name  # CUDA without Triton
    if dtype == torch.float32 and input_precision == "ieee":
        return "triton"  # cuDNN's fp32 precision is a global flag; ours is exact on request
    entry = table_entry(cin, cout)
    if entry["provider"] == "cudnn" and _backend.available("cudnn", x):
        return "cudnn"
    return "triton"


def conv_bn_relu(
    x: torch.Tensor,
    module_or_params: nn.Module | FoldedConv | tuple[torch.Tensor, torch.Tensor],
    padding: str | None = None,
    backend: str = "auto",
    *,
    input_precision: str = "tf32",
) -> torch.Tensor:
    """``relu(batch_norm(conv3d(x)))`` for a 3x3x3 convolution and eval-mode BatchNorm.

    ``x``: (N, C_in, X, Y, Z) float16, bfloat16 or float32 (channels-last avoids a copy).
    ``module_or_params``: a module with ``.conv`` (3x3x3 ``nn.Conv3d``) and ``.bn``
    (``nn.BatchNorm3d`` in eval mode), e.g. ``fastcascade.model.ConvBNReLU``, whose folded
    weights are cached on it; or a :class:`FoldedConv`; or a pair ``(weight, bias)`` of
    already folded parameters (C_out, C_in, 3, 3, 3) and (C_out,).
    ``padding``: ``"valid"`` (each side loses a voxel) or ``"same"``; taken from the module
    when omitted. ``backend``: ``"auto"`` (on a CUDA tensor, our Triton kernel or cuDNN per
    layer shape from ``conv_configs.CONFIGS``; elsewhere PyTorch), ``"triton"``,
    ``"cudnn"`` or ``"torch"``. ``input_precision`` for fp32 inputs: ``"tf32"`` (as
    PyTorch's convolutions on GPUs by default) or ``"ieee"`` (exact fp32 products on every
    path: cuDNN's TF32 flag is off for the call).
    Under autocast the fast paths compute in the autocast dtype. The fast paths carry no
    gradients: where one is needed (grad mode on and ``x`` or a parameter requiring it,
    e.g. fine-tuning with frozen BatchNorm) ``"auto"`` takes PyTorch's path and a named
    fast backend raises; inference runs under ``torch.no_grad()``/``inference_mode()``.

    Returns (N, C_out, X', Y', Z') (``X' = X - 2`` for valid padding), channels-last on
    the fast paths, in the compute dtype; accumulation is fp32.

    >>> from fastcascade.model import ConvBNReLU
    >>> block = ConvBNReLU(1, 8).eval()
    >>> tuple(conv_bn_relu(torch.randn(1, 1, 6, 6, 6), block).shape)
    (1, 8, 4, 4, 4)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(
            f"x must be a float (N, C, X, Y, Z) tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    module = module_or_params if isinstance(module_or_params, nn.Module) else None
    if module is not None:
        _, _, module_padding = _check_module(module)
        if padding is not None and padding != module_padding:
            raise ValueError(f"padding {padding!r} differs from the module's {module_padding!r}")
        padding = module_padding
        weight_shape = tuple(module.conv.weight.shape)
    elif isinstance(module_or_params, FoldedConv):
        if padding is not None and padding != module_or_params.padding:
            raise ValueError(
                f"padding {padding!r} differs from the FoldedConv's {module_or_params.padding!r}"
            )
        padding = module_or_params.padding
        weight_shape = tuple(module_or_params.weight.shape)
    elif isinstance(module_or_params, (tuple, list)) and len(module_or_params) == 2:
        weight_shape = tuple(module_or_params[0].shape)
    else:
        raise TypeError(
            "module_or_params must be a ConvBNReLU-like module, a FoldedConv or a "
            f"(weight, bias) pair, got {type(module_or_params).__name__}"
        )
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    cout, cin = weight_shape[:2]
    if len(weight_shape) != 5 or weight_shape[2:] != (3, 3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3, 3), got {weight_shape}")
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels, the convolution expects {cin}")
    if padding == "valid" and min(x.shape[2:]) < 3:
        raise ValueError(
            f"valid padding needs at least 3 voxels per axis, got {tuple(x.shape[2:])}"
        )

    dtype = _compute_dtype(x)
    exact = dtype == torch.float32 and input_precision == "ieee"
    with _cudnn_tf32_off() if exact else contextlib.nullcontext():
        return _dispatch(
            x, module_or_params, module, padding, cin, cout, dtype, backend, input_precision
        )


@contextlib.contextmanager
def _cudnn_tf32_off():
    """cuDNN (the ``cudnn`` path, and PyTorch's own convolutions on a GPU) reads its fp32
    precision from a global flag: off for the duration of an exact fp32 call."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def _dispatch(x, module_or_params, module, padding, cin, cout, dtype, backend, input_precision):
    """The checked call of :func:`conv_bn_relu`: choose the provider and run it."""
    if module is not None:
        tensors = list(module.parameters())
    elif isinstance(module_or_params, FoldedConv):
        tensors = [module_or_params.weight, module_or_params.bias]
    else:
        tensors = list(module_or_params)
    provider = _provider(backend, x, cin, cout, dtype, input_precision, _needs_grad(x, tensors))
    if provider == "torch":
        if module is not None:
            conv, bn = module.conv, module.bn
            bn_params = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
            return conv_bn_relu_ref(x, conv.weight, conv.bias, *bn_params, padding)
        if isinstance(module_or_params, FoldedConv):
            w, b = module_or_params.weight, module_or_params.bias
        else:
            w, b = module_or_params
        return F.relu(F.conv3d(x, w.to(x.dtype), b.to(x.dtype), padding=PADDINGS.index(padding)))

    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the {provider} path takes float16, bfloat16 or float32, got {dtype}")
    if module is not None:
        params = folded(module, dtype)
    elif isinstance(module_or_params, FoldedConv):
        params = module_or_params
    else:
        params = FoldedConv.from_params(*module_or_params, padding, dtype)
    x = x.to(dtype)
    pad = PADDINGS.index(padding)
    if provider == "cudnn":
        return _cudnn_op(x, params.weight.to(dtype), params.bias.to(dtype), pad)
    return _triton_op(x, params.packed.to(dtype), params.bias32, pad, input_precision)
