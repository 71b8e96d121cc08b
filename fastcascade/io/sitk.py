"""Files that SimpleITK reads: NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``,
``.mhd``) scans, and the optional-dependency probe shared with ``io/dicom.py``.

SimpleITK, pydicom and highdicom are the ``[dicom]`` extra
(``pip install 'fastcascade[dicom]'``); they are imported only when such a file is read
(:func:`require`), so the package works without them.

Geometry. ITK's physical space is LPS (x towards the patient's left, y posterior, z
superior); fastcascade's affines map voxels to RAS+ millimetres (nibabel's convention).
An image of ITK origin ``o``, spacing ``s`` and direction ``D`` (3x3, columns the axes'
unit vectors) has the voxel → RAS affine ``diag(-1, -1, 1) @ [D · diag(s) | o]``
(:func:`lps_to_ras`). Arrays come out indexed ``(i, j, k)`` like the file's own voxel
axes (SimpleITK's NumPy view is ``(k, j, i)``, transposed here), so that affine applies
to them as it is.

>>> affine = lps_to_ras((-10.0, 20.0, 30.0), (0.5, 0.5, 2.0), np.eye(3))
>>> affine[:3, 3].tolist(), np.diag(affine)[:3].tolist()
([10.0, -20.0, 30.0], [-0.5, -0.5, 2.0])
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from types import ModuleType

import numpy as np

from .limits import check_claim

PathLike = str | os.PathLike

#: File name endings read through SimpleITK (lower case).
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")

#: What to install for DICOM, NRRD and MetaImage support.
INSTALL_DICOM = "pip install 'fastcascade[dicom]'"

#: LPS ↔ RAS: the first two world axes change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the install command."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"SimpleITK"``) or raise :class:`MissingDependencyError`
    saying that ``what`` needs it and how to install it.

    >>> require("numpy", "reading NRRD").__name__
    'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{what} needs {module}, which is not installed: {INSTALL_DICOM}"
        ) from e


def is_sitk_path(path: PathLike) -> bool:
    """Whether ``path`` names a file this module reads (by its ending)."""
    return Path(path).name.lower().endswith(SITK_SUFFIXES)


def lps_to_ras(origin, spacing, direction) -> np.ndarray:
    """The 4x4 voxel → RAS+ mm affine of an ITK image (origin, spacing in mm, 3x3
    direction whose columns are the voxel axes' unit vectors, all in LPS)."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def image_geometry(image) -> np.ndarray:
    """The voxel → RAS affine of a 3D (or 4D with one volume) ``SimpleITK.Image``."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    return lps_to_ras(image.GetOrigin()[:3], image.GetSpacing()[:3], direction[:3, :3])


def image_array(image) -> np.ndarray:
    """The voxels of a ``SimpleITK.Image`` as a new float32 array indexed ``(i, j, k)``.

    It is Fortran-ordered (``i`` varies fastest), as nibabel's NIfTI arrays are: a copy of
    SimpleITK's ``(k, j, i)`` buffer, transposed as a view (reordering the bytes into C
    order would take seconds for a clinical scan)."""
    sitk = require("SimpleITK", "reading this image")
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False).T


def read_image(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NRRD or MetaImage scan: ``(voxels, affine)``.

    ``voxels``: float32, indexed like the file's voxel axes ``(i, j, k)`` (a trailing axis
    of length 1 kept: ``io.nifti.spatial_shape`` drops it); ``affine``: 4x4 voxel → RAS+
    mm. The size the header claims is checked (``io/limits.py``) before any voxel is
    read; a multi-component (vector, RGB) image, a missing, empty, unreadable or
    truncated file raise ``ValueError`` (``FileNotFoundError`` for a missing one) naming
    the file.

    >>> voxels, affine = read_image("ct.nrrd")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a {'/'.join(SITK_SUFFIXES)} file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    sitk = require("SimpleITK", f"reading {path.name}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"{path}: cannot read its header ({_first_line(e)})") from e
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        raise ValueError(
            f"{path}: holds {components} values per voxel (a vector or colour image); "
            "expected one intensity per voxel"
        )
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    itemsize = _ITEMSIZE.get(pixel)
    if itemsize is None:
        raise TypeError(f"{path}: voxel type {pixel}; expected integer or floating HU values")
    check_claim(str(path), size, itemsize, per_voxel=itemsize + 8)  # stored, float32, copy
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(
            f"{path}: cannot read the voxel data ({_first_line(e)}); the file is truncated "
            "or corrupt"
        ) from e
    return image_array(image), image_geometry(image)


#: Bytes a voxel of each scalar SimpleITK type occupies in the file.
_ITEMSIZE = {
    "8-bit signed integer": 1,
    "8-bit unsigned integer": 1,
    "16-bit signed integer": 2,
    "16-bit unsigned integer": 2,
    "32-bit signed integer": 4,
    "32-bit unsigned integer": 4,
    "64-bit signed integer": 8,
    "64-bit unsigned integer": 8,
    "32-bit float": 4,
    "64-bit float": 8,
}


def _first_line(e: BaseException) -> str:
    """ITK's messages span several lines with source paths and object addresses; keep
    the last meaningful line (its "Reason:" lines are often wrong, e.g. a truncated file
    is reported as missing)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Exception thrown", "Reason:"))]
    if not lines:
        return type(e).__name__
    return re.sub(r"^(ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\): ", "", lines[-1])
