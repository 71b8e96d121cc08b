"""Folding eval-mode BatchNorm into the convolution, and packing weights for the kernel.

BatchNorm with running statistics is an affine map per output channel, so it folds into
the convolution before it: ``w' = w·γ/√(σ²+ε)``, ``b' = (b-μ)·γ/√(σ²+ε) + β``. Batch
statistics cannot be folded (they depend on the batch being convolved), so training-mode
BatchNorm never reaches the fast paths.

:func:`prepared` checks a module once and caches on it what every eval-mode call reuses
(its padding and shape, its folded, packed parameters per compute dtype, the provider
chosen per call signature), rebuilt when the module changes: see :class:`Prepared`.
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


class Prepared:
    """What the eval-mode calls of one ConvBNReLU-like module reuse, cached on the module.

    Built by :func:`prepared` after :func:`_check_module`: ``padding``, ``cin``, ``cout``,
    ``tensors`` (the convolution's and BatchNorm's parameters and running statistics that
    exist), the folded, packed parameters per compute dtype (:meth:`folded`) and
    ``providers``, a dict the dispatcher keeps its provider choices in.

    ``stamp`` says what the cache was built from: the two submodules, BatchNorm's mode,
    ``eps`` and step counter, the convolution's padding and, for each tensor, its identity,
    data pointer and version counter. An in-place update (an optimizer step,
    ``load_state_dict``, ``torch.no_grad(): w.mul_(2)``) bumps the version, ``.to()`` /
    ``.data =`` / a ``swap_tensors`` conversion moves the data, assigning a new parameter or
    submodule changes an identity, ``train()`` flips the mode: each of these rebuilds the
    cache at the next call. A training-mode forward updates the running statistics without
    bumping their version counters (PyTorch's batch-norm kernels write them in place
    unannounced), but it counts the step in ``num_batches_tracked``, whose version is in
    the stamp. Reading the stamp goes through the modules' own parameter dicts where the
    attributes are plain ones (checked here), which keeps a cached call cheap.
    """

    __slots__ = ("padding", "cin", "cout", "tensors", "providers", "fast", "stamp", "_folded")

    def __init__(self, module: nn.Module):
        conv, bn, self.padding = _check_module(module)
        self.cout, self.cin = conv.weight.shape[:2]
        public = _public_tensors(conv, bn)
        self.tensors = tuple(t for t in public if t is not None)
        self.fast = (
            _plain(module, "_modules", "conv", conv)
            and _plain(module, "_modules", "bn", bn)
            and all(t is not None for t in public)
            # `is`, not `==`: comparing tensors would compare their elements
            and all(a is b for a, b in zip(_fast_tensors(conv, bn), public, strict=True))
        )
        self.providers: dict = {}
        self._folded: dict[torch.dtype, FoldedConv] = {}
        # Inference tensors have no version counter: such a module refolds at every call.
        versioned = not any(t.is_inference() for t in self.tensors)
        self.stamp = _stamp(module, self.fast) if versioned else None

    def folded(self, module: nn.Module, dtype: torch.dtype) -> FoldedConv:
        """The folded, packed parameters in ``dtype`` (folded at the first call)."""
        hit = self._folded.get(dtype)
        if hit is None:
            conv, bn = module.conv, module.bn
            with torch.no_grad():
                w, b = fold_bn(*_public_tensors(conv, bn), bn.eps)
                hit = FoldedConv.from_params(w, b, self.padding, dtype)
            if self.stamp is not None:
                self._folded[dtype] = hit
        return hit


def _plain(owner, dict_name: str, name: str, value) -> bool:
    return getattr(owner, dict_name, {}).get(name, _MISSING) is value


_MISSING = object()


def _public_tensors(conv, bn) -> tuple:
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _fast_tensors(conv, bn) -> tuple:
    """:func:`_public_tensors` without ``nn.Module.__getattr__`` (a missing entry: None)."""
    p, q, r = conv._parameters, bn._parameters, bn._buffers
    return (
        p.get("weight"),
        p.get("bias"),
        q.get("weight"),
        q.get("bias"),
        r.get("running_mean"),
        r.get("running_var"),
    )


def _stamp(module: nn.Module, fast: bool) -> tuple | None:
    """See :class:`Prepared`; ``None`` where the module no longer has ``.conv`` / ``.bn``."""
    if fast:  # all six tensors are plain dict entries: read without nn.Module.__getattr__
        modules = module._modules
        conv, bn = modules.get("conv"), modules.get("bn")
        if conv is None or bn is None:
            return None
        p, q, r = conv._parameters, bn._parameters, bn._buffers  # _fast_tensors, inline
        w, b, g, beta = p.get("weight"), p.get("bias"), q.get("weight"), q.get("bias")
        mean, var, steps = r.get("running_mean"), r.get("running_var"), r.get("num_batches_tracked")
        if w is None or b is None or g is None or beta is None or mean is None or var is None:
            return None
        return (
            id(conv), id(bn), bn.training, bn.eps, conv.padding,
            None if steps is None else steps._version,
            id(w), w.data_ptr(), w._version,
            id(b), b.data_ptr(), b._version,
            id(g), g.data_ptr(), g._version,
            id(beta), beta.data_ptr(), beta._version,
            id(mean), mean.data_ptr(), mean._version,
            id(var), var.data_ptr(), var._version,
        )  # fmt: skip
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    if conv is None or bn is None:
        return None
    sigs = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in
                 _public_tensors(conv, bn))  # fmt: skip
    steps = getattr(bn, "num_batches_tracked", None)
    steps = None if steps is None else steps._version
    return (id(conv), id(bn), bn.training, bn.eps, conv.padding, steps, *sigs)


_CACHE = "_fastcascade_prepared"


def prepared(module: nn.Module) -> Prepared:
    """The module's :class:`Prepared` cache: reused while its stamp holds, else rebuilt
    (which checks the module again and raises as :func:`_check_module` does)."""
    plan = module.__dict__.get(_CACHE)
    if plan is not None and plan.stamp is not None and plan.stamp == _stamp(module, plan.fast):
        return plan
    plan = Prepared(module)
    # Straight into __dict__: not a parameter, buffer or submodule (and no __setattr__).
    module.__dict__[_CACHE] = plan
    return plan


def forget(module: nn.Module) -> None:
    """Drop the module's cache (the next call rebuilds it); for overrides of ``_apply``
    and the like, where the module knows its tensors are replaced."""
    module.__dict__.pop(_CACHE, None)


def folded(module: nn.Module, dtype: torch.dtype) -> FoldedConv:
    """The module's folded, packed parameters in ``dtype``, cached on the module.

    Through :func:`prepared`: an in-place update of a parameter (an optimizer step,
    ``load_state_dict``), ``.to()`` or a new parameter refolds. While ``torch.compile``
    traces, the fold is traced into the graph instead.
    """
    if torch.compiler.is_compiling():
        conv, bn, padding = _check_module(module)
        w, b = fold_bn(*_public_tensors(conv, bn), bn.eps)
        return FoldedConv.from_params(w, b, padding, dtype)
    return prepared(module).folded(module, dtype)
