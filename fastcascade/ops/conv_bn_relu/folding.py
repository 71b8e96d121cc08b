"""Folding eval-mode BatchNorm into the convolution, and packing weights for the kernel.

BatchNorm with running statistics is an affine map per output channel, so it folds into
the convolution before it: ``w' = w·γ/√(σ²+ε)``, ``b' = (b-μ)·γ/√(σ²+ε) + β``. Batch
statistics cannot be folded (they depend on the batch being convolved), so training-mode
BatchNorm never reaches the fast paths. :func:`folded` caches a module's folded, packed
parameters on the module and refolds when a parameter changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def unpack_weight(packed: torch.Tensor, cin: int, cout: int) -> torch.Tensor:
    """The inverse of :func:`pack_weight`: a (C_out, C_in, 3, 3, 3) view of ``packed``."""
    return packed[:, :cout].unflatten(0, (3, 3, 3, cin)).permute(4, 3, 0, 1, 2)


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
