"""Fused 3x3x3 convolution + BatchNorm (inference) + ReLU: the U-Net's one block.

``relu(batch_norm(conv3d(x)))`` with eval-mode BatchNorm folded into the convolution
(``w' = w·γ/√(σ²+ε)``, ``b' = (b-μ)·γ/√(σ²+ε) + β``). Tensors are ``(N, C, X, Y, Z)`` in
voxels of the working grid; the fast paths read and write them channels-last.

The package, one responsibility per module:

- ``kernel``: the Triton kernel (an implicit GEMM), its launcher and the custom op
  ``fastcascade::conv3x3x3_bias_relu``.
- ``configs``: the kernel's block configurations: the committed per-shape table, the
  defaults, the tuning candidates and opt-in run-time autotuning.
- ``folding``: BatchNorm folding, weight packing, :class:`FoldedConv` and the per-module
  cache of what eval-mode calls reuse (checks, folded parameters, provider choices).
- ``fallback``: conv3d + ReLU with the folded weights for the layer shapes a fused path
  cannot run (no cuDNN engine, a Triton launch out of resources), decided once per shape.
- ``reference``: :func:`conv_bn_relu_ref`, the plain PyTorch path (also the CPU path).
- ``dispatch``: the public :func:`conv_bn_relu`, which chooses between our kernel, cuDNN's
  fused convolution and PyTorch.

>>> import torch
>>> from fastcascade.model import ConvBNReLU
>>> block = ConvBNReLU(1, 8).eval()
>>> tuple(conv_bn_relu(torch.randn(1, 1, 6, 6, 6), block).shape)
(1, 8, 4, 4, 4)
"""

from .configs import (
    CONFIGS,
    INTERPRETER_CONFIG,
    K_FLAT_BELOW,
    TUNED_ON,
    candidate_configs,
    default_config,
    kernel_config,
    table_entry,
)
from .dispatch import KERNEL_DTYPES, PRECISIONS, conv_bn_relu
from .fallback import FALLBACKS, fallbacks
from .folding import FoldedConv, fold_bn, folded, pack_weight, prepared, unpack_weight
from .reference import PADDINGS, conv_bn_relu_ref

__all__ = [
    "CONFIGS",
    "FALLBACKS",
    "INTERPRETER_CONFIG",
    "KERNEL_DTYPES",
    "K_FLAT_BELOW",
    "PADDINGS",
    "PRECISIONS",
    "TUNED_ON",
    "FoldedConv",
    "candidate_configs",
    "conv_bn_relu",
    "conv_bn_relu_ref",
    "default_config",
    "fallbacks",
    "fold_bn",
    "folded",
    "kernel_config",
    "pack_weight",
    "prepared",
    "table_entry",
    "unpack_weight",
]
