"""Label maps after the cascade: keep a subset of organs, keep each organ's largest part.

Both work on a label map on any grid (the input's, for results) and leave every other
voxel alone: a label that is not kept becomes background (0), and ids keep their meaning
(the class list does not change), so a file written after a selection still names every
class. Both run on the host: a tensor is brought to the CPU and back.

>>> import numpy as np
>>> names = ("background", "liver", "spleen")
>>> organ_ids(names, ["spleen"])
(2,)
>>> keep_organs(np.array([0, 1, 2, 2]), (2,)).tolist()
[0, 0, 2, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .ops.morphology import largest_component

__all__ = ["keep_largest_components", "keep_organs", "organ_ids"]


def organ_ids(class_names: Sequence[str], organs: Iterable[str] | str) -> tuple[int, ...]:
    """The class ids of ``organs`` (names of ``class_names``, or one comma-separated
    string), sorted and without repeats.

    An unknown name, ``"background"`` or an empty list is a ``ValueError`` that lists
    the names to choose from.

    >>> organ_ids(("background", "liver", "spleen"), "spleen,liver")
    (1, 2)
    """
    if isinstance(organs, str):
        organs = organs.split(",")
    wanted = [str(name).strip() for name in organs]
    choices = ", ".join(class_names[1:])
    if not wanted or any(not name for name in wanted):
        raise ValueError(f"organs: expected one or more of {choices}, got {list(organs)!r}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in wanted if index.get(name, 0) == 0]
    if unknown:
        raise ValueError(
            f"unknown organ(s) {', '.join(map(repr, unknown))}; the model's organs are {choices}"
        )
    return tuple(sorted({index[name] for name in wanted}))


def keep_organs(labels: np.ndarray | torch.Tensor, ids: Iterable[int]) -> np.ndarray | torch.Tensor:
    """``labels`` with every id not in ``ids`` set to 0 (background): a new array or
    tensor of the same dtype, shape and device.

    >>> keep_organs(torch.tensor([1, 2, 3]), [3]).tolist()
    [0, 0, 3]
    """
    ids = sorted({int(i) for i in ids})
    if isinstance(labels, torch.Tensor):
        keep = torch.isin(labels, torch.tensor(ids, dtype=labels.dtype, device=labels.device))
        return torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    labels = np.asarray(labels)
    return np.where(np.isin(labels, ids), labels, 0).astype(labels.dtype, copy=False)


def keep_largest_components(
    labels: np.ndarray | torch.Tensor, ids: Iterable[int] | None = None
) -> np.ndarray | torch.Tensor:
    """Each label of ``ids`` (default: every id > 0 present) reduced to its largest
    6-connected component; the other components become background. A new array or tensor
    of the same dtype, shape and device.

    Each label is cut to its bounding box and labelled there by SciPy on the CPU
    (``ops.morphology.largest_component`` with ``backend="scipy"``): ties between
    components of equal size go to the one whose first voxel comes first in C order.

    >>> keep_largest_components(np.array([[[1, 0, 1, 1, 2]]])).tolist()
    [[[0, 0, 1, 1, 2]]]
    """
    if isinstance(labels, torch.Tensor):
        out = keep_largest_components(labels.detach().cpu().numpy(), ids)
        return torch.from_numpy(out).to(labels.device)
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be an integer (x, y, z) volume, got {labels.dtype} {labels.shape}"
        )
    out = labels.copy()
    if not labels.size:
        return out
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError(f"labels must be ids >= 0, got {labels.min()}")
    boxes = ndimage.find_objects(labels)
    chosen = range(1, len(boxes) + 1) if ids is None else sorted({int(i) for i in ids})
    for k in chosen:
        box = boxes[k - 1] if 0 < k <= len(boxes) else None
        if box is None:
            continue
        mask = labels[box] == k
        largest = largest_component(torch.from_numpy(mask), backend="scipy").numpy()
        out[box][mask & ~largest] = 0
    return out
