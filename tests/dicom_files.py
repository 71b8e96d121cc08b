"""DICOM files for the tests, written here with pydicom: CT series of known geometry and
rescale, other modalities, non-image objects and damaged files; case D's real series.

Nothing here imports pydicom at import time, so test modules that use it are collected
(and deselected, e.g. by ``-m compile``) in an environment without the ``[dicom]`` extra.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR

CASE_D = DATA_DIR / "ct" / "case_d"
CASE_D_SERIES = CASE_D / "ct-3slice"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

#: An oblique orientation: rows along ``ROW``, columns along ``COL`` (LPS, orthonormal).
_a, _b = 0.3, 0.2
ROW = np.array([np.cos(_a), np.sin(_a), 0.0])
COL = np.array([-np.sin(_a) * np.cos(_b), np.cos(_a) * np.cos(_b), np.sin(_b)])


def require_dicom_extra() -> None:
    """Skip without SimpleITK, pydicom and highdicom, except in CI (``CI=true``), where
    a skip would hide an install step that is missing."""
    for module in ("SimpleITK", "pydicom", "highdicom"):
        if os.environ.get("CI", "").lower() in ("1", "true"):
            __import__(module)  # fails the test
        else:
            pytest.importorskip(module, reason="the [dicom] extra is not installed")


def case_d() -> Path:
    """Case D's three-slice CT series (skip when the data folder lacks it)."""
    if not (CASE_D_SERIES / "01.dcm").exists():
        pytest.skip(f"case D not found at {CASE_D_SERIES} (set FASTCASCADE_DATA)")
    return CASE_D_SERIES


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    row=(1.0, 0.0, 0.0),
    col=(0.0, 1.0, 0.0),
    pixel_spacing=(0.9, 0.7),
    origin=(10.0, -20.0, 30.0),
    step: float = 2.5,
    slopes=None,
    intercepts=None,
    positions=None,
    names=None,
    modality: str = "CT",
    sop_class: str = CT_IMAGE_STORAGE,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "synthetic",
    patient_name: str = "Test^Synthetic",
) -> list[Path]:
    """Write ``stored`` (slices, rows, columns; int16 stored values) as a series of
    single-frame images, slice ``k`` at ``origin + k * step * (row × col)`` unless
    ``positions`` gives them, with ``slopes[k]`` / ``intercepts[k]`` (default 1 / -1024).
    ``pixel_spacing`` is DICOM's (between rows, between columns). ``names[k]``: file
    name of slice ``k`` (default ``k``'s number). Returns the paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = stored.shape
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    slopes = [1.0] * n if slopes is None else slopes
    intercepts = [-1024.0] * n if intercepts is None else intercepts
    if positions is None:
        positions = [np.asarray(origin) + k * step * normal for k in range(n)]
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID, ds.PatientSex = patient_name, "FC0001", "O"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20260101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.SeriesDescription = description
        ds.Manufacturer = "fastcascade tests"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slopes[k]:g}", f"{intercepts[k]:g}"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<i2").tobytes()
        path = folder / (names[k] if names is not None else f"{k + 1:03d}.dcm")
        _write(ds, path)
        paths.append(path)
    return paths


def ct_stored(shape=(5, 6, 7), seed=0) -> np.ndarray:
    """(slices, rows, columns) int16 stored values: air, soft tissue and bone once
    rescaled by slope 1, intercept -1024."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2400, size=shape).astype(np.int16)
    stored[:, :2] = 24  # air rows: -1000 HU
    stored[:, -2:, :] = 1064  # soft tissue: 40 HU
    return stored


def write_rtstruct(path: Path, study_uid: str | None = None) -> Path:
    """A minimal RT Structure Set object (no pixel data) of a series of its own."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RT_STRUCT_STORAGE, uid, "RTSTRUCT"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "contours"
    ds.StructureSetLabel = "organs"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(ds, path)
    return path


def _write(ds, path: Path) -> None:
    """Save ``ds`` as a DICOM file (preamble, file meta) with pydicom 2 or 3."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def copy_renamed(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """Copy the files of folder ``src`` into ``dst`` under new names (old → new)."""
    dst.mkdir(parents=True, exist_ok=True)
    for old, new in names.items():
        shutil.copyfile(src / old, dst / new)
    return dst


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative name → its bytes (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
