"""The paper's measures: Dice per class, summary statistics, the Wilcoxon test of one
stage against another, and the candidate region's recall and false-positive rate
against the dilation radius r.

Label maps are integer arrays ``(x, y, z)`` (numpy or torch, any device) with class ids
``0 .. num_classes - 1`` (0 = background, see ``fastcascade.config.CLASS_NAMES``) on one
grid (``geometry.py`` puts them there). Dice values are fractions in [0, 1]; a Dice
matrix is ``(cases, classes)`` with NaN where a class is not scored in a case.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "candidate_recall_fpr",
    "compare_stages",
    "confusion_matrix",
    "dice",
    "dice_from_confusion",
    "reference_coverage",
    "scored_dice",
    "summarize",
]

STATS = ("n", "mean", "std", "median", "min", "max")


def _as_label_tensor(labels, name: str) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(labels)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels


def confusion_matrix(pred, ref, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 voxel counts: ``[i, j]`` = predicted ``i``,
    reference ``j``.

    ``pred`` and ``ref`` are integer label maps of one shape (numpy or torch; torch stays
    on its device until the small matrix is copied back) with ids in
    ``0 .. num_classes - 1``; a ``bool`` map counts as classes 0/1.

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = _as_label_tensor(pred, "pred")
    r = _as_label_tensor(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(
            f"pred and ref must have one shape, got {tuple(p.shape)} and {tuple(r.shape)}"
        )
    if p.device != r.device:
        r = r.to(p.device)
    p = p.reshape(-1).long()
    r = r.reshape(-1).long()
    if p.numel():
        lo = min(int(p.min()), int(r.min()))
        hi = max(int(p.max()), int(r.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"class ids must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
                f"found values in {lo}..{hi}"
            )
    counts = torch.bincount(p * num_classes + r, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def dice(pred, ref, num_classes: int) -> np.ndarray:
    """Dice coefficient per class, ``2 |P ∩ R| / (|P| + |R|)``.

    ``pred``, ``ref``: integer label maps of one shape (numpy arrays or torch tensors,
    ids ``0 .. num_classes - 1``). Returns float64 ``(num_classes,)`` with background at
    index 0; NaN for a class absent from both maps, 0 for one present in only one.

    >>> dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4).round(3).tolist()
    [1.0, 0.667, 0.667, nan]
    """
    return dice_from_confusion(confusion_matrix(pred, ref, num_classes))


def dice_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Dice per class from a confusion matrix ``cm[pred, ref]`` (see :func:`dice`), e.g.
    one summed over slabs of a volume too large for one pass."""
    inter = np.diag(cm).astype(np.float64)
    total = cm.sum(axis=1) + cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / total, np.nan)


def scored_dice(pred, ref, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Dice per class as the evaluation tables score it, and the predicted voxel counts.

    Like :func:`dice`, except that a class the reference does not hold is NaN (not
    scored) whatever the prediction: an organ absent from a case's reference has no
    Dice in that case, and its false positives are reported as voxel counts instead.
    Returns float64 ``(num_classes,)`` Dice and int64 ``(num_classes,)`` predicted voxels.

    >>> d, n = scored_dice(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 0]), 3)
    >>> d.round(3).tolist(), n.tolist()
    ([0.667, 0.667, nan], [1, 1, 2])
    """
    cm = confusion_matrix(pred, ref, num_classes)
    d = dice_from_confusion(cm)
    d[cm.sum(axis=0) == 0] = np.nan
    return d, cm.sum(axis=1)


def reference_coverage(ref, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Which classes a reference holds, and which of them its field of view cuts.

    ``ref``: integer label map ``(x, y, z)`` (numpy or torch). Returns two bool
    ``(num_classes,)`` arrays: ``present`` (at least one voxel) and ``cut`` (at least one
    voxel on a face of the volume: first or last index along any axis, so the scan may
    show only part of the organ and a Dice covers that part).

    >>> ref = np.zeros((4, 4, 4), int); ref[1:3, 1:3, 1:3] = 1; ref[0, 1, 1] = 2
    >>> [a.tolist() for a in reference_coverage(ref, 4)]
    [[True, True, True, False], [True, False, True, False]]
    """
    r = _as_label_tensor(ref, "ref")
    if r.dim() != 3:
        raise ValueError(f"ref must be (x, y, z), got shape {tuple(r.shape)}")
    if r.numel() == 0:
        return np.zeros(num_classes, bool), np.zeros(num_classes, bool)
    r = r.long()
    faces = torch.cat([f.reshape(-1) for a in range(3) for f in (r.select(a, 0), r.select(a, -1))])
    lo, hi = int(r.min()), int(r.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"class ids must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
            f"found values in {lo}..{hi}"
        )
    present = torch.bincount(r.reshape(-1), minlength=num_classes) > 0
    cut = torch.bincount(faces, minlength=num_classes) > 0
    return present.cpu().numpy(), cut.cpu().numpy()


def summarize(dice_matrix, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-class statistics of a Dice matrix ``(cases, classes)``, ignoring NaN.

    Returns ``{class_name: {"n", "mean", "std", "median", "min", "max"}}`` in class order:
    ``n`` counts the cases where the class is defined (not NaN), ``std`` is the sample
    standard deviation (``ddof=1``; NaN below two cases); a class that is NaN in every case
    gets NaN statistics and ``n = 0``.

    >>> s = summarize(np.array([[1.0, 0.5], [1.0, 0.7], [1.0, np.nan]]), ["bg", "liver"])
    >>> s["liver"]["n"], round(s["liver"]["mean"], 3), round(s["liver"]["std"], 3)
    (2, 0.6, 0.141)
    """
    m = np.asarray(dice_matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"dice_matrix must be (cases, classes), got shape {m.shape}")
    names = list(class_names)
    if len(names) != m.shape[1]:
        raise ValueError(f"got {len(names)} class names for {m.shape[1]} classes (columns)")
    out: dict[str, dict[str, float]] = {}
    for name, column in zip(names, m.T, strict=True):
        values = column[~np.isnan(column)]
        n = int(values.size)
        if n == 0:
            stats = dict.fromkeys(STATS[1:], math.nan)
        else:
            stats = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if n > 1 else math.nan,
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
            }
        out[name] = {"n": n, **stats}
    return out


def compare_stages(dice_stage1, dice_stage2) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-value per class, stage 2 against stage 1.

    ``dice_stage1``, ``dice_stage2``: Dice matrices ``(cases, classes)`` of the same cases.
    Per class, the cases where either value is NaN are dropped, and so are tied pairs
    (zero differences, SciPy's ``zero_method="wilcox"``); with fewer than two differing
    pairs left the test is meaningless and the p-value is NaN. Otherwise it is
    ``scipy.stats.wilcoxon``'s (exact distribution for small samples without tied
    magnitudes, normal approximation otherwise). Returns float64 ``(classes,)``.

    >>> s1 = np.array([[0.80], [0.70], [0.60], [0.90], [0.50]])
    >>> compare_stages(s1, s1 + 0.01 * np.arange(1, 6)[:, None]).tolist()  # 2 / 2**5
    [0.0625]
    """
    from scipy.stats import wilcoxon

    a = np.asarray(dice_stage1, dtype=np.float64)
    b = np.asarray(dice_stage2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"dice_stage1 and dice_stage2 must be (cases, classes) of one shape, "
            f"got {a.shape} and {b.shape}"
        )
    p_values = np.full(a.shape[1], np.nan)
    for k in range(a.shape[1]):
        keep = ~(np.isnan(a[:, k]) | np.isnan(b[:, k]))
        diff = b[keep, k] - a[keep, k]
        diff = diff[diff != 0]
        if diff.size < 2:
            continue
        with warnings.catch_warnings():
            # scipy warns that small samples are approximate when magnitudes tie
            warnings.simplefilter("ignore", UserWarning)
            p_values[k] = wilcoxon(diff).pvalue
    return p_values


def candidate_recall_fpr(
    ref_labels,
    stage1_labels,
    radii: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[dict[str, float]]:
    """How well the candidate region C2 covers the organs, for each dilation radius r.

    ``C2 = dilate(stage1_labels > 0, r, spacing)`` (``fastcascade.ops.dilate``: a ball of
    r voxels of the finest axis; ``spacing`` in mm only shapes the ball on anisotropic
    grids). ``ref_labels``, ``stage1_labels``: integer label maps ``(x, y, z)`` on one grid
    (numpy or torch). For each r in ``radii`` (voxels) returns a dict with

    - ``radius``: r;
    - ``recall``: fraction of reference foreground voxels inside C2 (NaN without any);
    - ``fpr``: fraction of reference background voxels inside C2 (NaN without any);
    - ``candidate_fraction``: fraction of the volume inside C2 (what stage 2 must process).

    >>> ref = np.zeros((7, 1, 1), int); ref[2:5] = 1
    >>> s1 = np.zeros((7, 1, 1), int); s1[3] = 1
    >>> [(d["radius"], d["recall"], d["fpr"]) for d in candidate_recall_fpr(ref, s1, [0, 2])]
    [(0, 0.3333333333333333, 0.0), (2, 1.0, 0.5)]
    """
    from ..ops.dilate import dilate  # lazily: evaluation needs no kernels at import

    ref = _as_label_tensor(ref_labels, "ref_labels")
    s1 = _as_label_tensor(stage1_labels, "stage1_labels")
    if ref.dim() != 3 or ref.shape != s1.shape:
        raise ValueError(
            f"ref_labels and stage1_labels must be (x, y, z) of one shape, "
            f"got {tuple(ref.shape)} and {tuple(s1.shape)}"
        )
    ref_fg = (ref != 0).to(s1.device)
    seed = s1 != 0
    n_fg = int(ref_fg.sum())
    n_bg = ref_fg.numel() - n_fg
    results = []
    for r in radii:
        c2 = dilate(seed, r, spacing)
        hit_fg = int((c2 & ref_fg).sum())
        hit_bg = int(c2.sum()) - hit_fg
        results.append(
            {
                "radius": r,
                "recall": hit_fg / n_fg if n_fg else math.nan,
                "fpr": hit_bg / n_bg if n_bg else math.nan,
                "candidate_fraction": (hit_fg + hit_bg) / c2.numel(),
            }
        )
    return results
