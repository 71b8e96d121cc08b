"""The class-weighted cross-entropy of Roth et al. (2018), Eq. 3-4.

Only the voxels ``i`` of the candidate region ``C`` (C1 for stage 1, C2 for stage 2) of the
training sub-volumes count::

    L = -(1 / N_C) * sum_k sum_{i in C, y_i = k} lambda_k * log p_k(i)
    lambda_k = (1 - N_k / N_C) / (K - 1)

with ``N_C = |C|`` and ``N_k`` the voxels of class ``k`` in ``C``. Both counts are taken
over the whole batch (all sub-volumes of one optimisation step together), so a class that
is rare in the batch weighs more; the weights always sum to one over the K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(target: torch.Tensor, region: torch.Tensor, num_classes: int) -> None:
    if target.dtype != torch.long:
        raise TypeError(f"target must be an int64 (long) tensor of class ids, got {target.dtype}")
    if region.dtype != torch.bool:
        raise TypeError(f"region must be a bool tensor, got {region.dtype}")
    if target.shape != region.shape:
        raise ValueError(
            f"target and region must have one shape (N, x, y, z), got {tuple(target.shape)} "
            f"and {tuple(region.shape)}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")


def class_weights(target: torch.Tensor, region: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The paper's ``lambda_k = (1 - N_k / N_C) / (K - 1)`` from the voxels of ``region``.

    ``target``: ``(N, x, y, z)`` int64 class ids in ``[0, K)`` (inside ``region``; values
    outside it are not read). ``region``: bool, same shape. Counts run over the whole
    batch. Returns float32 ``(K,)`` on ``target``'s device; all zeros for an empty region.

    >>> t = torch.tensor([[[[0, 0, 0, 1]]]])
    >>> class_weights(t, torch.ones_like(t, dtype=torch.bool), 2)
    tensor([0.2500, 0.7500])
    """
    _check(target, region, num_classes)
    return _weights_of(target[region], num_classes, target.device)


def _weights_of(labels: torch.Tensor, num_classes: int, device) -> torch.Tensor:
    """:func:`class_weights` from the ids inside the region (``target[region]``)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"target holds class ids outside [0, {num_classes}) inside the region: "
            f"min {int(labels.min())}, max {int(labels.max())}"
        )
    n_c = labels.numel()
    if n_c == 0:
        return torch.zeros(num_classes, dtype=torch.float32, device=device)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    return (1.0 - counts / n_c) / (num_classes - 1)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """The paper's loss (Eq. 3-4) over the voxels of ``region``; a scalar float32 tensor.

    ``logits``: ``(N, K, x, y, z)`` (any float dtype; computed in float32 through
    ``log_softmax``). ``target``: ``(N, x, y, z)`` int64 class ids. ``region``: bool
    ``(N, x, y, z)``, the candidate region C; voxels outside it affect neither the loss
    nor the gradient, whatever their logits or labels.

    An empty region (no voxel of C in the batch) returns ``0`` -- still connected to
    ``logits`` so that ``backward()`` works and gives zero gradients -- rather than
    raising, since a batch can legitimately miss C near a scan's border.

    >>> logits = torch.zeros(1, 2, 1, 1, 4)
    >>> t = torch.tensor([[[[0, 0, 0, 1]]]])
    >>> weighted_cross_entropy(logits, t, torch.ones_like(t, dtype=torch.bool))
    tensor(0.2599)
    """
    if logits.dim() != 5:
        raise ValueError(f"logits must be (N, K, x, y, z), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    _check(target, region, num_classes)
    if logits.shape[:1] + logits.shape[2:] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
            "expected logits (N, K, x, y, z) and target (N, x, y, z)"
        )
    inside = target[region]  # one host sync: the region's size
    weights = _weights_of(inside, num_classes, target.device)
    n_c = inside.numel()
    if n_c == 0:
        return logits.float().sum() * 0.0
    log_p = F.log_softmax(logits.float(), dim=1)
    # Outside C the label may be anything (padding, ignored voxels): clamp so the gather
    # stays in range; those voxels get weight zero below.
    safe_target = torch.where(region, target, torch.zeros_like(target))
    picked = log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    # torch.where (not a multiplication) keeps a -inf log-probability outside C from
    # turning into NaN.
    contrib = torch.where(region, weights[safe_target] * picked, 0.0)
    return -contrib.sum() / n_c
