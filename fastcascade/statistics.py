"""Per-organ statistics of a label map and its CT, on the scan's own grid.

For each organ: the voxel count, the volume in millilitres (count × the voxel's volume,
``|det|`` of the affine's 3x3 part, in mm³, / 1000), the mean and the standard deviation
(population, ``ddof=0``) of its HU values, and its bounding box: in voxel indices of the
grid (inclusive) and in millimetres of the world (scanner) RAS coordinates the affine
maps to, the box around the organ's voxel *centres* (exact for oblique grids too). An
organ without voxels has count 0, volume 0 and ``None`` for the rest.

Nothing is resampled: the numbers are those of the grid the labels and the CT share
(for a result, the input's), accumulated in float64.

>>> import numpy as np
>>> labels = np.zeros((4, 4, 4), np.uint8); labels[1:3, 1:3, 1] = 1
>>> ct = np.full((4, 4, 4), 40.0, np.float32)
>>> stats = organ_statistics(labels, ct, np.diag([2.0, 2.0, 2.0, 1.0]), ("background", "liver"))
>>> stats["organs"]["liver"]["voxels"], stats["organs"]["liver"]["volume_ml"]
(4, 0.032)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "CSV_COLUMNS",
    "organ_statistics",
    "statistics_csv",
    "statistics_json",
    "statistics_paths",
]

FORMAT = "fastcascade-statistics"

#: The CSV's columns, one row per organ; empty cells where an organ has no voxels.
CSV_COLUMNS = (
    "id",
    "name",
    "voxels",
    "volume_ml",
    "hu_mean",
    "hu_std",
    "bbox_min_x_mm",
    "bbox_min_y_mm",
    "bbox_min_z_mm",
    "bbox_max_x_mm",
    "bbox_max_y_mm",
    "bbox_max_z_mm",
    "bbox_min_i",
    "bbox_min_j",
    "bbox_min_k",
    "bbox_max_i",
    "bbox_max_j",
    "bbox_max_k",
)


def _host(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}")


def organ_statistics(
    labels: np.ndarray | torch.Tensor,
    image_hu: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    class_names: Sequence[str],
    ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Statistics of each organ of ``ids`` (default: every class but background).

    ``labels``: integer class ids ``(i, j, k)`` of ``class_names``; ``image_hu``: the CT
    in HU on the same grid (any real dtype); ``affine``: that grid's 4x4 voxel → mm
    matrix. Arrays or tensors (brought to the host).

    Returns ``{"format", "shape", "affine", "voxel_volume_ml", "organs"}``, ``organs``
    mapping each name (in id order) to ``{"id", "voxels", "volume_ml", "hu_mean",
    "hu_std", "bbox_mm": {"min": [x, y, z], "max": [x, y, z]}, "bbox_voxels": {"min":
    [i, j, k], "max": [i, j, k]}}`` (see the module for the definitions).
    """
    labels = _host(labels, "labels")
    image = _host(image_hu, "image_hu")
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be integer class ids (i, j, k), got {labels.dtype} {labels.shape}"
        )
    if image.shape != labels.shape:
        raise ValueError(
            f"the CT has shape {image.shape} but the labels {labels.shape}; both must be "
            "on the same grid (the input's)"
        )
    if image.dtype.kind not in "iuf":
        raise TypeError(f"the CT must hold real HU values, got dtype {image.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    n = len(class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        raise ValueError(
            f"labels range over [{labels.min()}, {labels.max()}]; expected ids of the "
            f"{n} class names"
        )
    ids = range(1, n) if ids is None else sorted({int(i) for i in ids})
    if any(not 0 < k < n for k in ids):
        raise ValueError(f"ids must be class ids in 1..{n - 1}, got {list(ids)}")

    a = affine[:3, :3]  # |det| as the triple product: exact for a diagonal matrix
    voxel_ml = abs(float(np.dot(a[:, 0], np.cross(a[:, 1], a[:, 2])))) / 1000.0
    foreground = labels > 0  # only organ voxels are gathered (a fraction of the scan)
    lab = labels[foreground].astype(np.intp)
    hu = image[foreground].astype(np.float64)
    counts = np.bincount(lab, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(lab, weights=hu, minlength=n) / counts
        var = np.bincount(lab, weights=(hu - mean[lab]) ** 2, minlength=n) / counts
    boxes = ndimage.find_objects(labels, max_label=n - 1)

    organs = {}
    for k in ids:
        count = int(counts[k])
        entry: dict[str, Any] = {
            "id": k,
            "voxels": count,
            "volume_ml": count * voxel_ml,
            "hu_mean": None,
            "hu_std": None,
            "bbox_mm": None,
            "bbox_voxels": None,
        }
        if count:
            box = boxes[k - 1]
            offset = np.array([s.start for s in box])
            voxels = np.argwhere(labels[box] == k) + offset
            world = voxels @ affine[:3, :3].T + affine[:3, 3]
            entry.update(
                hu_mean=float(mean[k]),
                hu_std=float(np.sqrt(var[k])),
                bbox_mm={"min": world.min(0).tolist(), "max": world.max(0).tolist()},
                bbox_voxels={
                    "min": offset.tolist(),
                    "max": [s.stop - 1 for s in box],
                },
            )
        organs[str(class_names[k])] = entry
    return {
        "format": FORMAT,
        "shape": [int(s) for s in labels.shape],
        "affine": affine.tolist(),
        "voxel_volume_ml": voxel_ml,
        "organs": organs,
    }


def statistics_json(stats: dict[str, Any]) -> str:
    """The statistics as JSON text (what ``--statistics stats.json`` writes)."""
    return json.dumps(stats, indent=1) + "\n"


def statistics_csv(stats: dict[str, Any]) -> str:
    """The statistics as CSV text, one row per organ, columns :data:`CSV_COLUMNS`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, s in stats["organs"].items():
        box = s["bbox_mm"] or {"min": [None] * 3, "max": [None] * 3}
        index = s["bbox_voxels"] or {"min": [None] * 3, "max": [None] * 3}
        row = [s["id"], name, s["voxels"], s["volume_ml"], s["hu_mean"], s["hu_std"]]
        row += [*box["min"], *box["max"], *index["min"], *index["max"]]
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return out.getvalue()


def statistics_paths(path: str | Path) -> tuple[Path, Path]:
    """``stats.json`` → ``(stats.json, stats.csv)``: the statistics' two files.

    >>> statistics_paths("out/stats.json")
    (PosixPath('out/stats.json'), PosixPath('out/stats.csv'))
    """
    path = Path(path)
    if path.suffix.lower() != ".json" or path.name.lower() == ".json":
        raise ValueError(f"statistics file {path}: expected a name ending in .json")
    return path, path.with_suffix(".csv")
