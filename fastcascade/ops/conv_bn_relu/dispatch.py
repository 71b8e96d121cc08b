"""The public :func:`conv_bn_relu`: input checks, the provider choice (our Triton kernel,
cuDNN's fused convolution or PyTorch), and the cuDNN path as a custom op.

A module's eval-mode call reuses what :func:`~.folding.prepared` cached on it (its checks,
its folded weights, the provider chosen for this backend, device type, dtype and
precision), and outside ``torch.compile`` calls the fused path's body directly rather
than through its custom op, whose dispatch alone costs tens of microseconds of Python per
layer. Either fused path falls back per layer shape to conv3d + ReLU where it has no
kernel for the shape (``fallback``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from . import configs
from .configs import table_entry
from .fallback import CUDNN
from .folding import FoldedConv, Prepared, _check_module, folded, prepared
from .kernel import _empty_channels_last, _output_shape, _triton, _triton_op
from .reference import PADDINGS, conv_bn_relu_ref

PRECISIONS = ("tf32", "ieee")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- the cuDNN path ------------------------------------------------------------------------
def _cudnn_fused(x, weight, bias, pad):
    y = torch.cudnn_convolution_relu(x, weight, bias, [1, 1, 1], [pad] * 3, [1, 1, 1], 1)
    return y.contiguous(memory_format=torch.channels_last_3d)


def _cudnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
    """The body of :func:`_cudnn_op` (also called directly by eager calls): cuDNN's fused
    kernel, or conv3d + ReLU where cuDNN has no fused engine for the shape."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    return CUDNN.run(
        x, weight.shape[0], pad, lambda: _cudnn_fused(x, weight, bias, pad), lambda: (weight, bias)
    )


@torch.library.custom_op("fastcascade::cudnn_conv_bias_relu", mutates_args=())
def _cudnn_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
    """relu(conv3d(x, weight) + bias) through cuDNN's fused kernel (CUDA tensors)."""
    return _cudnn(x, weight, bias, pad)


@_cudnn_op.register_fake
def _(x, weight, bias, pad):
    return _empty_channels_last(_output_shape(x, weight.shape[0], PADDINGS[pad]), x)


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
    layer shape from the committed table, ``configs.CONFIGS``; elsewhere PyTorch),
    ``"triton"``, ``"cudnn"`` or ``"torch"``. ``input_precision`` for fp32 inputs:
    ``"tf32"`` (as PyTorch's convolutions on GPUs by default) or ``"ieee"`` (exact fp32
    products on every path: cuDNN's TF32 flag is off for the call).
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
    plan = None
    if module is not None:
        if torch.compiler.is_compiling():  # traced: no cache, the checks and the fold inline
            _, _, module_padding = _check_module(module)
            cout, cin = module.conv.weight.shape[:2]
        else:
            plan = prepared(module)
            module_padding, cin, cout = plan.padding, plan.cin, plan.cout
        if padding is not None and padding != module_padding:
            raise ValueError(f"padding {padding!r} differs from the module's {module_padding!r}")
        padding = module_padding
    else:
        if isinstance(module_or_params, FoldedConv):
            if padding is not None and padding != module_or_params.padding:
                raise ValueError(
                    f"padding {padding!r} differs from the FoldedConv's "
                    f"{module_or_params.padding!r}"
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
        if len(weight_shape) != 5 or weight_shape[2:] != (3, 3, 3):
            raise ValueError(f"weight must be (C_out, C_in, 3, 3, 3), got {weight_shape}")
        cout, cin = weight_shape[:2]
    shape = x.shape  # a new torch.Size at every read
    if shape[1] != cin:
        raise ValueError(f"x has {shape[1]} channels, the convolution expects {cin}")
    if padding == "valid" and min(shape[2], shape[3], shape[4]) < 3:
        raise ValueError(
            f"valid padding needs at least 3 voxels per axis, got {tuple(x.shape[2:])}"
        )

    dtype = _compute_dtype(x)
    args = (x, module_or_params, module, plan, padding, cin, cout, dtype, backend, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        with _cudnn_tf32_off():
            return _dispatch(*args)
    return _dispatch(*args)


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


def _cached_provider(plan: Prepared, backend, x, dtype, input_precision) -> str:
    """:func:`_provider` for a call that needs no gradient, remembered on the module per
    (backend, CUDA or not, dtype, precision) while the committed table is the same object."""
    key = (backend, x.is_cuda, dtype, input_precision)  # the choice reads no more of x
    hit = plan.providers.get(key)
    if hit is not None and hit[0] is configs.CONFIGS:
        return hit[1]
    name = _provider(backend, x, plan.cin, plan.cout, dtype, input_precision, False)
    plan.providers[key] = (configs.CONFIGS, name)
    return name


def _direct(x: torch.Tensor) -> bool:
    """Whether a fused path may be called without its custom op: eager PyTorch on a plain
    tensor, nothing tracing (``torch.compile``, ``torch.jit.trace``) or intercepting
    (a dispatch mode: fake tensors, ``make_fx``, FLOP counters) the call."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._get_tracing_state()
        and not torch._C._len_torch_dispatch_stack()
    )


def _dispatch(x, module_or_params, module, plan, padding, cin, cout, dtype, backend, precision):
    """The checked call of :func:`conv_bn_relu`: choose the provider and run it."""
    if plan is not None:
        tensors = plan.tensors
    elif module is not None:
        tensors = list(module.parameters())
    elif isinstance(module_or_params, FoldedConv):
        tensors = [module_or_params.weight, module_or_params.bias]
    else:
        tensors = list(module_or_params)
    needs_grad = torch.is_grad_enabled() and _needs_grad(x, tensors)
    if plan is not None and not needs_grad:
        provider = _cached_provider(plan, backend, x, dtype, precision)
    else:
        provider = _provider(backend, x, cin, cout, dtype, precision, needs_grad)
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
    if plan is not None:
        params = plan.folded(module, dtype)
    elif module is not None:
        params = folded(module, dtype)
    elif isinstance(module_or_params, FoldedConv):
        params = module_or_params
    else:
        params = FoldedConv.from_params(*module_or_params, padding, dtype)
    if x.dtype != dtype:
        x = x.to(dtype)
    pad = PADDINGS.index(padding)
    direct = _direct(x)
    if provider == "cudnn":
        weight, bias = params.weight, params.bias
        if weight.dtype != dtype:  # a FoldedConv made for another dtype
            weight, bias = weight.to(dtype), bias.to(dtype)
        return (_cudnn if direct else _cudnn_op)(x, weight, bias, pad)
    packed = params.packed if params.packed.dtype == dtype else params.packed.to(dtype)
    return (_triton if direct else _triton_op)(x, packed, params.bias32, pad, precision)
