"""Scans in: any CT volume → float32 HU in canonical RAS (x, y, z), and back again.

``load_scan`` accepts a path (NIfTI; NRRD or MetaImage, ``io/sitk.py``; a folder or ``.zip``
of one DICOM CT series, ``io/dicom.py``), a nibabel image, a numpy array or a torch
tensor, checks it
(3D, finite, numeric, a CT and not a label map, a sane voxel size) and brings it to the
canonical orientation used throughout fastcascade: axis 0 towards the patient's right,
axis 1 anterior, axis 2 superior (RAS), spacing in mm in that order. Only flips and an
axis permutation are applied, the closest ones to the input's affine (nibabel's
``io_orientation``), so no voxel is interpolated and ``Scan.to_input_grid`` inverts the
change exactly. Both directions use ``torch.flip``/``permute`` only: a CUDA tensor stays
on its device.

A scan owns both of its grids. ``Scan.working_grid(spacing)`` gives the
:class:`WorkingGrid` a model works on (same field of view, the model's voxel size) and
the way there and back: the image by linear interpolation, reference labels by nearest
neighbour, and results back onto the input's own grid (labels nearest, probabilities
linear, then the input's orientation). Inference, training data and evaluation all go
through it, so the round trip is written once.

Label-map rule: a volume is refused as a label map when all its values are whole numbers,
the smallest is ≥ 0 and it holds between 2 and ``LABEL_MAP_MAX_VALUES`` (128) distinct
values. A CT in HU always has voxels below 0 (air about -1000 HU around the body, fat,
lungs), so a genuine CT never matches; a CT stored as raw unsigned values has hundreds
of distinct values; a uniform volume (e.g. all air) is not refused.

Checks that read values (finite, label map, HU plausibility) cost one scalar read from
the device, plus at most three more when the smallest value is ≥ 0.

HU plausibility (``check_hu``): a scan with no voxel below -500 HU (no air: an 8-bit
image, a CT stored without its rescale intercept), with under 1% of its voxels in the
soft-tissue range -200..300 HU, or with values beyond -33000..40000 HU is warned about
(``hu_check="warn"``, the default), refused (``"error"``) or let through (``"off"``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations

from ..ops.resample import resample, working_shape
from .dicom import DicomSeries, is_dicom_input, read_series
from .nifti import load_nifti, read_voxels, spatial_shape
from .sitk import is_sitk_path, read_image

#: Orientation of every ``Scan.data``.
CANONICAL_AXCODES = ("R", "A", "S")

#: At most this many distinct whole non-negative values make a volume a label map.
LABEL_MAP_MAX_VALUES = 128


@dataclass
class Scan:
    """A CT scan in canonical RAS orientation, with what is needed to go back.

    ``data``: (x, y, z) float32 HU, RAS; on the input tensor's device, else the CPU (it
    shares memory with a float32 input whenever no flip is needed). ``spacing``: voxel
    size in mm along (x, y, z). ``affine``: 4x4 voxel → mm affine of ``data``.
    ``input_affine`` / ``input_shape``: the input's own affine and 3D shape. ``header``:
    the input's NIfTI header if it came from a file or image (label files reuse its
    geometry codes), else ``None``. ``path``: the source file, folder or zip, if any
    (writers refuse to overwrite it or write into it). ``dicom``: the DICOM series it was
    read from, if any (a SEG of the labels references it).

    >>> scan = load_scan(np.full((4, 5, 6), -1000.0, np.float32), spacing=(1.0, 1.0, 2.5))
    >>> scan.data.shape, scan.spacing
    (torch.Size([4, 5, 6]), (1.0, 1.0, 2.5))
    """

    data: torch.Tensor
    spacing: tuple[float, float, float]
    affine: np.ndarray
    input_affine: np.ndarray
    input_shape: tuple[int, int, int]
    header: nib.Nifti1Header | None = None
    path: Path | None = None
    dicom: DicomSeries | None = None

    def _orientation(self) -> np.ndarray:
        return _orientation(self.input_affine)

    def to_input_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(..., x, y, z) on the canonical grid → (..., i, j, k) on the input's grid.

        Exact inverse of what ``load_scan`` did (flips and a permutation; leading dims
        kept); any dtype, any device. The result may be a view of ``t``.

        >>> scan.to_input_grid(labels).shape == scan.input_shape  # doctest: +SKIP
        True
        """
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor (..., x, y, z), got {type(t).__name__}")
        if t.ndim < 3 or tuple(t.shape[-3:]) != tuple(self.data.shape):
            raise ValueError(
                f"tensor has shape {tuple(t.shape)}; expected (..., "
                f"{', '.join(map(str, self.data.shape))}) on the scan's canonical grid"
            )
        ornt = self._orientation()
        lead = t.ndim - 3
        perm = [int(a) for a in ornt[:, 0]]  # input axis i is canonical axis perm[i]
        if perm != [0, 1, 2]:
            t = t.permute(*range(lead), *(lead + a for a in perm))
        flips = [lead + i for i in range(3) if ornt[i, 1] < 0]
        return torch.flip(t, flips) if flips else t

    def from_input_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(..., i, j, k) on the input's grid → (..., x, y, z) canonical (e.g. reference labels).

        >>> torch.equal(scan.from_input_grid(scan.to_input_grid(scan.data)), scan.data)
        ... # doctest: +SKIP
        True
        """
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor (..., i, j, k), got {type(t).__name__}")
        if t.ndim < 3 or tuple(t.shape[-3:]) != tuple(self.input_shape):
            raise ValueError(
                f"tensor has shape {tuple(t.shape)}; expected (..., "
                f"{', '.join(map(str, self.input_shape))}) on the input's grid"
            )
        return _to_canonical(t, self._orientation())

    def working_grid(self, spacing: tuple[float, float, float]) -> WorkingGrid:
        """The grid of ``spacing`` mm voxels over this scan's field of view.

        >>> scan = load_scan(np.full((8, 8, 4), -1000.0, np.float32), spacing=(1.5, 1.5, 3.0))
        >>> scan.working_grid((3.0, 3.0, 3.0)).shape
        (4, 4, 4)
        """
        return WorkingGrid(self, *_working_geometry(tuple(self.data.shape), self.spacing, spacing))


@dataclass(frozen=True)
class WorkingGrid:
    """A scan's working grid: ``shape`` voxels of ``spacing`` mm over the scan's field of
    view, in canonical RAS.

    ``spacing`` is what the rounding of voxel counts achieves (extent / count per axis;
    the scan's own spacing where the count is unchanged), which is the requested spacing
    up to that rounding. Moves between the grids (any device; leading dims kept):

    - :meth:`image`: the scan's HU on this grid (linear), on ``device``: the one upload;
    - :meth:`labels_from_input`: labels on the input's grid → this grid (nearest);
    - :meth:`labels_to_input` / :meth:`probabilities_to_input`: results on this grid →
      the input's own grid and orientation (nearest / linear).
    """

    scan: Scan
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def image(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 ``(x, y, z)`` HU on this grid, on ``device`` (default: the scan's)."""
        data = self.scan.data if device is None else self.scan.data.to(device, non_blocking=True)
        return resample(data, self.shape, mode="linear")

    def labels_from_input(self, labels: torch.Tensor) -> torch.Tensor:
        """``(..., i, j, k)`` labels on the input's grid → ``(..., x, y, z)`` here, same
        dtype (e.g. a reference segmentation for training)."""
        return resample(self.scan.from_input_grid(labels), self.shape, mode="nearest")

    def labels_to_input(self, labels: torch.Tensor) -> torch.Tensor:
        """``(..., x, y, z)`` labels here → the input's grid and orientation, same dtype."""
        canonical = resample(labels, tuple(self.scan.data.shape), mode="nearest")
        return self.scan.to_input_grid(canonical)

    def probabilities_to_input(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``(C, x, y, z)`` probabilities here → float32 on the input's grid."""
        canonical = resample(probabilities, tuple(self.scan.data.shape), mode="linear")
        return self.scan.to_input_grid(canonical)


def _working_geometry(
    shape: tuple[int, int, int], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    out = working_shape(shape, spacing, target)
    achieved = tuple(
        float(s) if m == n else n * s / m for n, s, m in zip(shape, spacing, out, strict=True)
    )
    return out, achieved


def load_scan(
    volume: str | os.PathLike | nib.spatialimages.SpatialImage | np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float] | None = None,
    affine: np.ndarray | None = None,
    hu_check: str = "warn",
    series: str | None = None,
) -> Scan:
    """Load and check a CT volume and bring it to canonical RAS orientation.

    ``volume``: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr`` or ``.mha``/``.mhd`` path, a
    folder or ``.zip`` holding one DICOM CT series (``series``: its SeriesInstanceUID,
    needed where there are several; these need the ``[dicom]`` extra), a nibabel image, or
    an (x, y, z) numpy array / torch tensor of HU values (integer or floating; a trailing
    axis of length 1 is dropped). Arrays and tensors need either ``spacing`` (3 positive
    finite mm along their axes; the array is then taken as already RAS) or ``affine`` (4x4
    voxel → mm world RAS+; the array is reoriented through it), not both. Files and images
    carry their own geometry, so neither may be given with them. ``hu_check``: ``"warn"``,
    ``"error"`` or ``"off"`` for intensities that do not look like HU (``check_hu``).

    Raises ``TypeError`` for an unsupported input type or non-numeric data, and
    ``ValueError`` for anything else wrong (dims, NaN/Inf, spacing, a label map, an
    unreadable file, a DICOM folder that is not one evenly spaced CT series), naming the
    problem and what was expected; ``FileNotFoundError`` for a missing file;
    ``io.sitk.MissingDependencyError`` (an ``ImportError``) for NRRD, MetaImage or DICOM
    without the ``[dicom]`` extra.

    >>> ct = torch.full((8, 8, 4), -1000.0)
    >>> scan = load_scan(ct, affine=np.diag([-0.8, -0.8, 2.0, 1.0]))  # LPS
    >>> scan.spacing, scan.data.shape
    ((0.8, 0.8, 2.0), torch.Size([8, 8, 4]))
    """
    if isinstance(volume, str | os.PathLike):
        _refuse_geometry(spacing, affine, "a file")
        path = Path(volume)
        if is_dicom_input(path):
            voxels, dicom = read_series(path, series)
            data = torch.from_numpy(voxels)
            what = f"DICOM series in {path}"
            return _make_scan(data, dicom.affine, None, path, what, hu_check, dicom=dicom)
        _refuse_series(series, "a file that is not a DICOM series")
        if path.name.lower().endswith(".dcm"):
            raise ValueError(
                f"{path} is one DICOM file; give the folder (or .zip) holding its whole series"
            )
        if is_sitk_path(path):
            voxels, file_affine = read_image(path)
            data = torch.from_numpy(voxels.reshape(spatial_shape(voxels.shape, f"scan {path}")))
            return _make_scan(data, file_affine, None, path, f"scan {path}", hu_check)
        img = load_nifti(path)
        shape = spatial_shape(img.shape, f"scan {path}")
        _check_dtype(np.dtype(img.get_data_dtype()), f"scan {path}")
        data = torch.from_numpy(read_voxels(img, path).reshape(shape))
        return _make_scan(data, img.affine, img.header, path, f"scan {path}", hu_check)
    _refuse_series(series, f"a {type(volume).__name__}")
    if isinstance(volume, nib.spatialimages.SpatialImage):
        _refuse_geometry(spacing, affine, "a nibabel image")
        shape = spatial_shape(volume.shape, "image")
        _check_dtype(np.dtype(volume.get_data_dtype()), "image")
        data = torch.from_numpy(read_voxels(volume, "image").reshape(shape))
        header = volume.header if isinstance(volume.header, nib.Nifti1Header) else None
        return _make_scan(data, volume.affine, header, None, "image", hu_check)
    if isinstance(volume, np.ndarray):
        shape = spatial_shape(volume.shape, "volume")
        _check_dtype(volume.dtype, "volume")
        arr = volume.reshape(shape)
        if arr.dtype != np.float32 or not arr.dtype.isnative or not arr.flags.writeable:
            arr = arr.astype(np.float32)  # a copy: torch needs native, writable memory
        if any(s < 0 for s in arr.strides):
            arr = np.ascontiguousarray(arr)
        data = torch.from_numpy(arr)
    elif isinstance(volume, torch.Tensor):
        shape = spatial_shape(volume.shape, "volume")
        if volume.dtype in (torch.bool,) or volume.dtype.is_complex:
            raise TypeError(
                f"volume has dtype {volume.dtype}; expected integer or floating HU values"
            )
        data = volume.detach().reshape(shape).to(torch.float32)
    else:
        raise TypeError(
            f"volume is a {type(volume).__name__}; expected a path to a .nii/.nii.gz file, a "
            "nibabel image, a numpy array or a torch tensor"
        )
    input_affine = _array_affine(spacing, affine)
    return _make_scan(data, input_affine, None, None, "volume", hu_check)


def _make_scan(
    data: torch.Tensor,
    input_affine: Any,
    header: Any,
    path: Path | None,
    what: str,
    hu_check: str = "warn",
    dicom: DicomSeries | None = None,
) -> Scan:
    input_affine = _check_affine(input_affine, what)
    _check_values(data, what, hu_check)
    ornt = _orientation(input_affine)
    canonical = _to_canonical(data, ornt)
    affine = input_affine @ orientations.inv_ornt_aff(ornt, tuple(data.shape))
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return Scan(
        data=canonical,
        spacing=spacing,
        affine=affine,
        input_affine=input_affine,
        input_shape=tuple(int(s) for s in data.shape),
        header=header,
        path=path,
        dicom=dicom,
    )


def _orientation(affine: np.ndarray) -> np.ndarray:
    """(3, 2) nibabel orientation: input axis i → canonical axis ``[i, 0]``, flip ``[i, 1]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a valid affine" cases are checked before
        current = orientations.io_orientation(affine)
    return orientations.ornt_transform(current, orientations.axcodes2ornt(CANONICAL_AXCODES))


def _to_canonical(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Apply ``ornt`` to the last three dims as nibabel's ``apply_orientation`` does."""
    lead = t.ndim - 3
    flips = [lead + i for i in range(3) if ornt[i, 1] < 0]
    if flips:
        t = torch.flip(t, flips)
    order = [int(a) for a in np.argsort(ornt[:, 0])]  # canonical axis k is input axis order[k]
    if order != [0, 1, 2]:
        t = t.permute(*range(lead), *(lead + a for a in order))
    return t


def _refuse_geometry(spacing: Any, affine: Any, what: str) -> None:
    if spacing is not None or affine is not None:
        raise ValueError(
            f"spacing/affine were given with {what}, which carries its own geometry; "
            "pass them only with a numpy array or torch tensor"
        )


def _refuse_series(series: Any, what: str) -> None:
    if series is not None:
        raise ValueError(
            f"series={series!r} was given with {what}; it chooses a series of a DICOM "
            "folder or .zip"
        )


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind not in "iuf":
        raise TypeError(f"{what} has dtype {dtype}; expected integer or floating HU values")


def _array_affine(spacing: Any, affine: Any) -> np.ndarray:
    if spacing is not None and affine is not None:
        raise ValueError("give either spacing or affine for an array, not both")
    if affine is not None:
        if isinstance(affine, torch.Tensor):
            affine = affine.detach().cpu().numpy()
        try:
            return np.array(affine, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"affine must be a 4x4 matrix of numbers, got {affine!r}") from e
    if spacing is None:
        raise ValueError(
            "an array or tensor needs its geometry: spacing=(sx, sy, sz) in mm (array "
            "already RAS) or affine=<4x4 voxel-to-mm matrix>"
        )
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError) as e:
        raise TypeError(f"spacing must be 3 numbers in mm, got {spacing!r}") from e
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing is {tuple(values)}; expected 3 positive finite values in mm")
    return np.diag([*values, 1.0])


def _check_affine(affine: Any, what: str) -> np.ndarray:
    affine = np.array(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine of {what} has shape {affine.shape}; expected (4, 4)")
    if not np.isfinite(affine).all():
        raise ValueError(f"affine of {what} has NaN or infinite entries")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"affine of {what} has last row {affine[3]}; expected [0, 0, 0, 1]")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not (zooms > 0).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * np.prod(zooms):
        raise ValueError(
            f"affine of {what} is singular (voxel sizes {zooms.tolist()} mm); expected "
            "3 independent axes with positive voxel sizes"
        )
    return affine


#: What a CT in HU holds (``check_hu``): air (and the scanner's padding) below
#: ``AIR_BELOW``, soft tissue in ``SOFT_TISSUE``, nothing beyond ``HU_RANGE``.
AIR_BELOW = -500.0
SOFT_TISSUE = (-200.0, 300.0)
HU_RANGE = (-33000.0, 40000.0)  # int16 padding (-32768) ... dense metal (extended scale)
MIN_SOFT_TISSUE = 0.01  # of the voxels
#: The soft-tissue share is estimated on every k-th voxel, at most this many of them: a
#: warning threshold of 1% needs no exact count, and the check stays cheap on large scans.
SOFT_TISSUE_SAMPLES = 2**20


def check_hu(lo: float, hi: float, soft: float, what: str) -> str | None:
    """Why intensities with minimum ``lo``, maximum ``hi`` and a fraction ``soft`` of
    voxels in ``SOFT_TISSUE`` do not look like a CT in HU, or ``None`` when they do. (No
    voxel below ``AIR_BELOW`` is ``lo > AIR_BELOW``.)

    >>> check_hu(0.0, 255.0, 0.4, "scan") is not None  # an 8-bit image
    True
    >>> check_hu(-1024.0, 1800.0, 0.5, "scan") is None
    True
    """
    seen = f"{what}: intensities range over [{lo:.4g}, {hi:.4g}]"
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        return (
            f"{seen}, beyond any CT's Hounsfield units ({HU_RANGE[0]:g} to {HU_RANGE[1]:g}); "
            "is the file's scaling (scl_slope, scl_inter) right?"
        )
    if lo > AIR_BELOW:
        return (
            f"{seen} with no voxel below {AIR_BELOW:g} HU; a CT has air at about -1000 HU "
            "(is this an 8-bit image, or a CT without its rescale intercept?)"
        )
    if soft < MIN_SOFT_TISSUE:
        return (
            f"{seen} with {100 * soft:.2g}% of voxels in the soft-tissue range "
            f"{SOFT_TISSUE[0]:g} to {SOFT_TISSUE[1]:g} HU; expected a CT of the body in HU"
        )
    return None


def _check_values(data: torch.Tensor, what: str, hu_check: str = "warn") -> None:
    # Files arrive Fortran-ordered (nibabel, SimpleITK's transposed view): read them in
    # memory order through the reversed-axes view, which is contiguous, instead of
    # copying the volume (min, max and the sampled share do not depend on the order).
    reverse = data.permute(*reversed(range(data.ndim)))
    if reverse.is_contiguous() and not data.is_contiguous():
        data = reverse
    stats = list(torch.aminmax(data))  # NaN propagates
    if hu_check != "off":
        flat = data.reshape(-1)
        sample = flat[:: max(1, flat.numel() // SOFT_TISSUE_SAMPLES)]
        inside = (sample >= SOFT_TISSUE[0]) & (sample <= SOFT_TISSUE[1])
        stats.append(torch.count_nonzero(inside).to(data.dtype) / max(1, sample.numel()))
    lo, hi, *soft = torch.stack(stats).tolist()  # one read
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n_nan = int(torch.isnan(data).sum())
        n_inf = int(torch.isinf(data).sum())
        why = "expected finite HU values"
        if n_inf and data.dtype == torch.float32:
            why += " (values beyond ±3.4e38 overflow float32, in which scans are read)"
        raise ValueError(f"{what} has {n_nan} NaN and {n_inf} infinite voxels; {why}")
    _refuse_label_map(data, lo, hi, what)
    if hu_check != "off":
        problem = check_hu(lo, hi, soft[0], what)
        if problem is not None and hu_check == "error":
            raise ValueError(problem)
        if problem is not None:
            warnings.warn(problem + " (hu_check='error' refuses such scans)", stacklevel=4)


def _refuse_label_map(data: torch.Tensor, lo: float, hi: float, what: str) -> None:
    if lo < 0 or lo == hi:
        return
    if not torch.equal(data, torch.round(data)):
        return
    flat = data.reshape(-1)
    step = max(1, flat.numel() // 65536)
    if torch.unique(flat[::step]).numel() > LABEL_MAP_MAX_VALUES:
        return
    n = torch.unique(flat).numel()
    if n <= LABEL_MAP_MAX_VALUES:
        raise ValueError(
            f"{what} looks like a label map, not a CT: {n} distinct whole values in "
            f"[{lo:g}, {hi:g}]; expected HU intensities (a CT has voxels below 0 HU)"
        )
