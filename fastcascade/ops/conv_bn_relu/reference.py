"""The plain PyTorch meaning of the fused block, which is also its CPU path.

:func:`conv_bn_relu_ref` is ``F.conv3d`` → ``F.batch_norm`` (running statistics) →
``F.relu``: what every fast path of :func:`~fastcascade.ops.conv_bn_relu.conv_bn_relu`
is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``"valid"``: each side loses a voxel; ``"same"``: zero padding of one voxel.
PADDINGS = ("valid", "same")


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
