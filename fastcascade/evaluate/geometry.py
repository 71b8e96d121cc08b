"""Label maps compared in physical space: one grid, one grid up to orientation, or resampled.

A grid is a shape and a voxel → mm affine (a NIfTI file's ``img.affine``: the sform, else
the qform). A prediction and its reference are compared voxel by voxel only once they
lie on one grid:

- **The same grid**: equal shapes, and affines that agree within
  ``TRANSLATION_ATOL_MM`` (1e-3 mm) in the translation column and within
  ``LINEAR_RTOL`` (1e-4) × the largest voxel size on each entry of the 3×3 part. Over
  500 voxels the second allows at most 0.05 mm of drift, a thousandth of a typical
  voxel; NIfTI stores affines in float32 (about 1e-7 relative, 5e-5 mm at 500 mm from
  the origin), well inside both.
- **The same grid up to orientation**: flipping and permuting the axes of one makes it
  the same grid as the other (nibabel's ``io_orientation``, ``ornt_transform``,
  ``apply_orientation`` and ``inv_ornt_aff``, checked afterwards with the tolerances
  above). The labels are then reoriented exactly; no voxel is interpolated, so a label
  map stored flipped or with its axes in another order scores as the original does.
- **Anything else** (shifted, other voxel sizes, other shapes, oblique) is refused with
  a ``ValueError`` naming both grids (shape, voxel size, origin, orientation codes),
  unless resampling is asked for: then every target voxel centre takes the label of the
  source voxel whose centre is nearest (ties to the upper index), background where that
  lies outside the source's field of view.

>>> ref = Grid((4, 5, 6), np.diag([2.0, 2.0, 3.0, 1.0]))
>>> ref.describe()
'shape (4, 5, 6), voxel size 2 x 2 x 3 mm, origin (0, 0, 0) mm, orientation RAS'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations

from ..io.nifti import load_nifti, spatial_shape

__all__ = [
    "LINEAR_RTOL",
    "TRANSLATION_ATOL_MM",
    "Grid",
    "align_labels",
    "check_grids",
    "same_grid",
]

#: Largest difference of the affines' translation columns (mm) on one grid.
TRANSLATION_ATOL_MM = 1e-3
#: Largest difference of the affines' 3x3 entries on one grid, relative to the largest
#: voxel size.
LINEAR_RTOL = 1e-4

#: How a source was brought onto a target grid.
ALIGNMENTS = ("same", "reoriented", "resampled")


def _num(v: float) -> str:
    return f"{v:.6g}" if abs(v) >= 1e-9 else "0"


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in physical space: ``shape`` (i, j, k) voxels and ``affine``, the 4x4
    voxel index → mm (RAS+ world) matrix."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.array(self.affine, dtype=np.float64))
        if len(self.shape) != 3 or self.affine.shape != (4, 4):
            raise ValueError(
                f"a grid is a 3D shape and a 4x4 affine, got {self.shape} and {self.affine.shape}"
            )

    @classmethod
    def of_file(cls, path: str | Path) -> Grid:
        """The grid of a NIfTI file, from its header (no voxel data are read)."""
        img = load_nifti(path)
        return cls(spatial_shape(img.shape, str(path)), img.affine)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """mm along the grid's own axes i, j, k."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Where each axis points, e.g. ``("L", "P", "S")`` (nibabel's ``aff2axcodes``)."""
        codes = orientations.ornt2axcodes(_orientation(self.affine))
        return tuple("?" if c is None else c for c in codes)

    def describe(self) -> str:
        """Shape, voxel size, origin (the first voxel's centre, mm) and orientation codes."""
        size = " x ".join(_num(v) for v in self.voxel_size)
        origin = ", ".join(_num(v) for v in self.affine[:3, 3])
        return (
            f"shape {self.shape}, voxel size {size} mm, origin ({origin}) mm, "
            f"orientation {''.join(self.axcodes)}"
        )


def _orientation(affine: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate affine gives NaN rows, handled below
        return orientations.io_orientation(affine)


def same_grid(a: Grid, b: Grid) -> bool:
    """Equal shapes and affines within ``TRANSLATION_ATOL_MM`` / ``LINEAR_RTOL``."""
    if a.shape != b.shape:
        return False
    scale = max(max(a.voxel_size), max(b.voxel_size))
    linear = np.abs(a.affine[:3, :3] - b.affine[:3, :3]).max() <= LINEAR_RTOL * scale
    shift = np.abs(a.affine[:3, 3] - b.affine[:3, 3]).max() <= TRANSLATION_ATOL_MM
    return bool(linear and shift)


def _reorientation(source: Grid, target: Grid) -> np.ndarray | None:
    """The nibabel orientation taking ``source``'s voxel axes onto ``target``'s when that
    makes the two the same grid, else ``None``."""
    a, b = _orientation(source.affine), _orientation(target.affine)
    if np.isnan(a).any() or np.isnan(b).any():
        return None
    ornt = orientations.ornt_transform(a, b)
    shape = tuple(source.shape[int(i)] for i in np.argsort(ornt[:, 0]))
    affine = source.affine @ orientations.inv_ornt_aff(ornt, source.shape)
    return ornt if same_grid(Grid(shape, affine), target) else None


def check_grids(a_name: str, a: Grid, b_name: str, b: Grid, *, resample: bool = False) -> str:
    """How labels on ``a`` and ``b`` can be compared: ``"same"``, ``"reoriented"`` (one
    grid up to flips and axis order) or ``"resampled"`` (only when ``resample``).

    Raises ``ValueError`` naming both grids otherwise (one line; ``a_name`` and
    ``b_name`` are what to call them, e.g. their files).
    """
    if same_grid(a, b):
        return "same"
    if _reorientation(a, b) is not None:
        return "reoriented"
    if resample:
        return "resampled"
    if a.shape != b.shape:
        what = f"{b_name} has shape {b.shape} but {a_name} has {a.shape}"
    else:
        what = f"{b_name} and {a_name} have one shape {a.shape} but lie elsewhere in space"
    raise ValueError(
        f"{what}; they are not one grid, even up to flips and axis order "
        f"({b_name}: {b.describe()}; {a_name}: {a.describe()}; tolerances "
        f"{TRANSLATION_ATOL_MM} mm on the origin, {LINEAR_RTOL} x voxel size on the axes). "
        "Resample by nearest neighbour with --resample (resample=True) to compare them "
        "in physical space"
    )


def align_labels(
    labels: np.ndarray,
    source: Grid,
    target: Grid,
    *,
    resample: bool = False,
    names: tuple[str, str] = ("source", "target"),
) -> tuple[np.ndarray, str]:
    """``labels`` on ``source`` brought onto ``target``: ``(labels on target, how)``.

    ``labels``: integer array of ``source.shape``; the result has ``target.shape`` and
    the same dtype (a view where nothing moves). ``how`` is one of ``"same"``,
    ``"reoriented"`` (exact flips and permutation) or ``"resampled"`` (nearest neighbour,
    only with ``resample``; background outside ``source``'s field of view). ``names``
    (source, target) go into the ``ValueError`` raised when the grids cannot be
    compared (see :func:`check_grids`).

    >>> flip_x = [[-1, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # voxel 0 at x = 2
    >>> src, tgt = Grid((3, 1, 1), flip_x), Grid((3, 1, 1), np.eye(4))
    >>> align_labels(np.array([1, 2, 3]).reshape(3, 1, 1), src, tgt)[0].ravel().tolist()
    [3, 2, 1]
    """
    labels = np.asarray(labels)
    if labels.shape != source.shape:
        raise ValueError(
            f"{names[0]} labels have shape {labels.shape}; expected its grid's {source.shape}"
        )
    how = check_grids(names[0], source, names[1], target, resample=resample)
    if how == "same":
        return labels, how
    if how == "reoriented":
        ornt = _reorientation(source, target)
        return np.ascontiguousarray(orientations.apply_orientation(labels, ornt)), how
    return _resample_nearest(labels, source, target), how


def _resample_nearest(labels: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Nearest source voxel centre for every target voxel centre, slice by slice."""
    m = np.linalg.inv(source.affine) @ target.affine  # target index -> source index
    out = np.zeros(target.shape, labels.dtype)
    ii, jj = np.meshgrid(
        np.arange(target.shape[0]), np.arange(target.shape[1]), indexing="ij", sparse=False
    )
    plane = m[:3, 0, None, None] * ii + m[:3, 1, None, None] * jj + m[:3, 3, None, None]
    limits = np.array(source.shape)[:, None, None]
    for k in range(target.shape[2]):
        # floor(x + 0.5): ties to the upper voxel, as ops/resample.py's nearest mode
        idx = np.floor(plane + m[:3, 2, None, None] * k + 0.5).astype(np.int64)
        inside = ((idx >= 0) & (idx < limits)).all(axis=0)
        out[:, :, k][inside] = labels[idx[0][inside], idx[1][inside], idx[2][inside]]
    return out
