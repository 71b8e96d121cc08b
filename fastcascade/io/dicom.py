"""DICOM CT series in: a folder (or a ``.zip``) holding one series → HU voxels and the
voxel → RAS affine, with the slices' headers kept for writing a SEG that references them.

Headers are read first, without pixel data (pydicom), and everything is checked before a
voxel is read:

- **Which series.** Files are grouped by SeriesInstanceUID. Files that are not DICOM (no
  ``DICM`` preamble: a README) and a ``DICOMDIR`` index are skipped; a DICOM file that
  cannot be parsed, or has no SeriesInstanceUID, is an error (dropping it could
  silently shorten a series by its first or last slice). A
  folder of several series (a SEG or RT-STRUCT object is a series of its own) is refused
  with each series listed (UID, modality, object type, file count, description) unless
  ``series=`` names one.
- **A CT.** The series must be CT Image Storage with Modality CT, one frame and one
  grey value per file (an MR series, a SEG, an enhanced multi-frame CT are refused).
- **Geometry.** Every slice has the same size, pixel spacing and orientation (rows and
  columns orthonormal within 1e-3). Slices are ordered by their position along the
  slice normal (``row × column``), never by file name or instance number. Consecutive
  positions must be evenly spaced (each gap within 1% of the median gap, which names a
  missing slice), and on a line along the normal (a tilted-gantry series, whose slices
  shift in-plane, is refused). The affine is then ``[row·Δc, column·Δr, normal·Δz |
  first position]`` in LPS, brought to RAS by negating the first two rows: voxel
  ``(i, j, k)`` is column ``i``, row ``j`` of the ``k``-th slice along the normal.
- **Size.** The series' claim (columns × rows × slices) is checked against
  ``io/limits.py`` before pixels are read, and an uncompressed file must hold its pixel
  data in full.

Voxels are then read by SimpleITK's series reader (GDCM, which also decodes compressed
transfer syntaxes) in that order, as float32 with each file's own RescaleSlope and
RescaleIntercept applied, and the geometry SimpleITK derives is checked against the
headers'. A ``.zip`` is unpacked into a temporary folder first (``io/archive.py``); the
input is only ever read.

>>> voxels, series = read_series("ct_dicom/")  # doctest: +SKIP
>>> voxels.shape, series.affine  # (columns, rows, slices), 4x4 voxel → RAS mm
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .archive import unpacked_zip
from .limits import check_claim
from .sitk import LPS_TO_RAS, image_array, image_geometry, require

PathLike = str | os.PathLike

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR
ENHANCED_CT = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
#: Transfer syntaxes whose pixel data are stored as they are (sizes can be checked).
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")

#: Orientation vectors: unit length and orthogonal within this.
ORIENTATION_TOL = 1e-3
#: Slice gaps and in-plane drift: within this fraction of the slice spacing.
SPACING_TOL = 0.01


@dataclass(frozen=True)
class DicomSeries:
    """The DICOM series a scan was read from.

    ``uid``: SeriesInstanceUID; ``description``: SeriesDescription (may be empty);
    ``source``: the folder or zip given; ``names``: the slices' files relative to it, in
    slice order; ``headers``: their pydicom datasets without pixel data, same order
    (what a SEG referencing the series needs); ``affine``: 4x4 voxel → RAS+ mm;
    ``shape``: ``(columns, rows, slices)``.
    """

    uid: str
    description: str
    source: Path
    names: tuple[str, ...]
    headers: tuple[Any, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]


@dataclass
class _Object:
    """One DICOM file's header and what the checks need of it."""

    path: Path
    name: str
    header: Any
    pixel_offset: int  # where pixel data start (pydicom stopped there)
    size: int

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.header.get(keyword, default)


def is_dicom_input(path: PathLike) -> bool:
    """Whether ``path`` is read as a DICOM series: a folder, or a ``.zip`` file."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(".zip")


def read_series(path: PathLike, series: str | None = None) -> tuple[np.ndarray, DicomSeries]:
    """Read the CT series in folder or zip ``path``: ``(voxels, DicomSeries)``.

    ``voxels``: float32 HU ``(columns, rows, slices)``, slices in order along the slice
    normal; ``DicomSeries.affine`` maps them to RAS+ mm. ``series``: the
    SeriesInstanceUID to read where ``path`` holds several. Raises ``ValueError`` naming
    the file, series or rule for anything refused (see the module's docstring),
    ``FileNotFoundError`` for a missing path and ``MissingDependencyError`` without the
    ``[dicom]`` extra.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or file")
    require("pydicom", "reading DICOM")
    require("SimpleITK", "reading DICOM")
    if path.is_dir():
        return _read_folder(path, path, series)
    with unpacked_zip(path) as folder:
        return _read_folder(folder, path, series)


# --------------------------------------------------------------------------- finding


def _read_folder(folder: Path, source: Path, series: str | None) -> tuple[np.ndarray, DicomSeries]:
    groups, looked_at = _scan_folder(folder, source)
    uid = _choose(groups, source, series, looked_at)
    objects = groups[uid]
    _check_ct(objects, uid, source)
    objects, affine_lps, shape = _geometry(objects, uid, source)
    bits = _int(objects[0], "BitsAllocated", source)
    itemsize = max(1, bits // 8)
    check_claim(f"DICOM series {uid} in {source}", shape, itemsize, per_voxel=itemsize + 8)
    _check_pixel_data(objects, shape, bits, source)
    image = _read_voxels(objects, source)
    affine = LPS_TO_RAS @ affine_lps
    _check_reader_geometry(image_geometry(image), affine, shape, image.GetSize(), source)
    return image_array(image), DicomSeries(
        uid=uid,
        description=str(objects[0].get("SeriesDescription", "") or ""),
        source=source,
        names=tuple(o.name for o in objects),
        headers=tuple(o.header for o in objects),
        affine=affine,
        shape=shape,
    )


#: What pydicom raises on a damaged file (besides InvalidDicomError: not DICOM at all):
#: a short read (EOFError, struct.error), an unknown value representation
#: (NotImplementedError), values that do not parse (ValueError, TypeError, ...).
_PARSE_ERRORS = (
    EOFError,
    OSError,
    struct.error,
    NotImplementedError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    OverflowError,
)

#: The attributes the checks read, parsed while the file is read (pydicom parses values
#: on first access, so a damaged value fails here, with the file named).
_USED = (
    "SOPClassUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "SpacingBetweenSlices",
    "SliceThickness",
)


def _scan_folder(folder: Path, source: Path) -> tuple[dict[str, list[_Object]], int]:
    """Every DICOM object with a SeriesInstanceUID under ``folder``, grouped by it, and
    the number of files looked at."""
    pydicom = require("pydicom", "reading DICOM")
    from pydicom.errors import BytesLengthException, InvalidDicomError

    errors = (*_PARSE_ERRORS, BytesLengthException)

    groups: dict[str, list[_Object]] = {}
    looked_at = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for fname in sorted(files):
            path = Path(root) / fname
            if not path.is_file():
                continue
            looked_at += 1
            name = str(path.relative_to(folder))
            try:
                with open(path, "rb") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom's notes on odd values
                    header = pydicom.dcmread(f, stop_before_pixels=True)
                    offset = f.tell()
                    uid = header.get("SeriesInstanceUID")
                    for keyword in _USED:
                        header.get(keyword)
                    meta = getattr(header, "file_meta", None) or {}
                    str(meta.get("TransferSyntaxUID", ""))
                    directory = str(meta.get("MediaStorageSOPClassUID", ""))
            except InvalidDicomError:
                continue  # not DICOM: a DICOMDIR's companions, a README, ...
            except errors as e:
                raise ValueError(f"{source}: {name} is not a readable DICOM file ({e})") from e
            if uid is None:
                if directory == MEDIA_STORAGE_DIRECTORY:
                    continue  # a DICOMDIR: an index, no image
                # a damaged file dropped here would silently shorten its series
                raise ValueError(
                    f"{source}: {name} is a DICOM file without a SeriesInstanceUID (damaged, "
                    "or not an image); remove it or give a folder of the series alone"
                )
            obj = _Object(path, name, header, offset, path.stat().st_size)
            groups.setdefault(str(uid), []).append(obj)
    return groups, looked_at


def _summary(uid: str, objects: list[_Object]) -> dict[str, Any]:
    sop = objects[0].get("SOPClassUID")
    return {
        "uid": uid,
        "modality": str(objects[0].get("Modality", "") or "?"),
        "kind": getattr(sop, "name", str(sop)) if sop is not None else "?",
        "files": len(objects),
        "description": str(objects[0].get("SeriesDescription", "") or ""),
    }


def _listing(groups: dict[str, list[_Object]]) -> str:
    items = []
    for uid, objs in sorted(groups.items()):
        s = _summary(uid, objs)
        files = f"{s['files']} file{'s' if s['files'] != 1 else ''}"
        items.append(f"{uid} ({s['modality']}, {s['kind']}, {files}, '{s['description']}')")
    return "; ".join(items)


def _choose(
    groups: dict[str, list[_Object]], source: Path, series: str | None, looked_at: int
) -> str:
    if not groups:
        raise ValueError(
            f"{source}: no DICOM series found ({looked_at} file{'s' if looked_at != 1 else ''}"
            " looked at); expected a folder or .zip holding the files of one CT series"
        )
    if series is not None:
        if str(series) not in groups:
            raise ValueError(f"{source}: holds no series {series!r}; it holds {_listing(groups)}")
        return str(series)
    if len(groups) > 1:
        raise ValueError(
            f"{source}: holds {len(groups)} series; choose one with series='UID' "
            f"(--series UID on the command line): {_listing(groups)}"
        )
    return next(iter(groups))


# --------------------------------------------------------------------------- checking


def _check_ct(objects: list[_Object], uid: str, source: Path) -> None:
    def kind(o: _Object) -> tuple[str, str]:
        return str(o.get("SOPClassUID", "") or ""), str(o.get("Modality", "") or "")

    ct = (CT_IMAGE_STORAGE, "CT")
    if all(sop in ENHANCED_CT for sop, _ in map(kind, objects)):
        raise ValueError(
            f"series {uid} in {source} is an enhanced (multi-frame) CT; expected classic "
            "CT images, one file per slice (most archives can export them)"
        )
    if not any(kind(o) == ct for o in objects):
        sop, modality = kind(objects[0])
        raise ValueError(
            f"series {uid} in {source} holds {_sop_name(sop)} objects (Modality "
            f"{modality!r}); expected a CT series (Modality CT, CT Image Storage)"
        )
    for o in objects:
        if kind(o) != ct:
            sop, modality = kind(o)
            raise ValueError(
                f"{source}: {o.name} is {_sop_name(sop)} (Modality {modality!r}) in CT series "
                f"{uid}; expected CT images only"
            )
    for o in objects:
        missing = [
            k
            for k in (
                "ImagePositionPatient",
                "ImageOrientationPatient",
                "PixelSpacing",
                "Rows",
                "Columns",
                "BitsAllocated",
            )
            if o.get(k) is None
        ]
        if missing:
            raise ValueError(f"{source}: {o.name} has no {', '.join(missing)}; cannot place it")
        frames = _int(o, "NumberOfFrames", source, 1)
        samples = _int(o, "SamplesPerPixel", source, 1)
        photometric = str(o.get("PhotometricInterpretation", "MONOCHROME2"))
        if frames != 1 or samples != 1 or photometric != "MONOCHROME2":
            raise ValueError(
                f"{source}: {o.name} has {frames} frame(s), {samples} sample(s) per pixel, "
                f"{photometric}; expected one MONOCHROME2 CT slice per file"
            )


def _sop_name(sop: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(sop).name
    except (ImportError, ValueError):
        return sop


def _int(o: _Object, keyword: str, source: Path, default: int | None = None) -> int:
    value = o.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{source}: {o.name} has no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{source}: {o.name} has {keyword} {value!r}; expected one whole number"
        ) from e


def _floats(o: _Object, keyword: str, n: int, source: Path) -> np.ndarray:
    try:
        values = np.array([float(v) for v in o.get(keyword)], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {o.name} has an unreadable {keyword} ({e})") from e
    if values.shape != (n,) or not np.isfinite(values).all():
        raise ValueError(
            f"{source}: {o.name} has {keyword} {values.tolist()}; expected {n} finite numbers"
        )
    return values


def _geometry(
    objects: list[_Object], uid: str, source: Path
) -> tuple[list[_Object], np.ndarray, tuple[int, int, int]]:
    """The slices in order along the normal, the LPS affine and the shape, after checking
    that they form one evenly spaced volume."""
    first = objects[0]
    rows, cols = _int(first, "Rows", source), _int(first, "Columns", source)
    iop = _floats(first, "ImageOrientationPatient", 6, source)
    spacing = _floats(first, "PixelSpacing", 2, source)  # (between rows, between columns)
    bits = _int(first, "BitsAllocated", source)
    for o in objects[1:]:
        same = (
            tuple(_int(o, k, source) for k in ("Rows", "Columns", "BitsAllocated"))
            == (rows, cols, bits)
            and np.allclose(_floats(o, "ImageOrientationPatient", 6, source), iop, atol=1e-4)
            and np.allclose(_floats(o, "PixelSpacing", 2, source), spacing, rtol=1e-4)
        )
        if not same:
            raise ValueError(
                f"{source}: {o.name} and {first.name} differ in size, pixel spacing or "
                f"orientation; series {uid} is not one volume"
            )
    if rows < 1 or cols < 1 or not (spacing > 0).all() or bits not in (8, 16, 32):
        raise ValueError(
            f"{source}: {first.name} has {rows}×{cols} pixels of {spacing.tolist()} mm, "
            f"{bits} bits allocated; expected positive sizes and 8, 16 or 32 bits"
        )
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOL
        or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOL
        or abs(row @ col) > ORIENTATION_TOL
    ):
        raise ValueError(
            f"{source}: {first.name} has ImageOrientationPatient {iop.tolist()}; expected two "
            "orthogonal unit vectors"
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.stack([_floats(o, "ImagePositionPatient", 3, source) for o in objects])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    objects = [objects[i] for i in order]
    positions, along = positions[order], along[order]
    n = len(objects)
    if n > 1:
        dz = _slice_spacing(objects, along, source)
        drift = positions - positions[0] - np.outer(along - along[0], normal)
        worst = int(np.argmax(np.linalg.norm(drift, axis=1)))
        if np.linalg.norm(drift[worst]) > SPACING_TOL * dz:
            raise ValueError(
                f"{source}: {objects[worst].name} lies {np.linalg.norm(drift[worst]):.3g} mm "
                f"beside the line of {objects[0].name}'s normal (a tilted gantry?); expected "
                "slices stacked along their normal"
            )
    else:
        dz = _single_slice_thickness(first, source)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[0]
    return objects, lps, (cols, rows, n)


def _slice_spacing(objects: list[_Object], along: np.ndarray, source: Path) -> float:
    gaps = np.diff(along)
    step = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if gap <= SPACING_TOL * max(step, 1e-6):
            raise ValueError(
                f"{source}: {objects[k].name} and {objects[k + 1].name} lie at the same "
                f"position ({along[k]:.4g} mm along the normal); expected one slice per position"
            )
    for k, gap in enumerate(gaps):
        if abs(gap - step) > SPACING_TOL * step:
            missing = round(gap / step) - 1
            hint = f", about {missing} slice(s) missing" if missing >= 1 else ""
            raise ValueError(
                f"{source}: a gap of {gap:.4g} mm between {objects[k].name} and "
                f"{objects[k + 1].name}, where the series' slices are {step:.4g} mm apart"
                f"{hint}; expected evenly spaced slices with none missing"
            )
    dz = float(along[-1] - along[0]) / (len(objects) - 1)
    grid = along[0] + dz * np.arange(len(objects))
    worst = int(np.argmax(np.abs(along - grid)))
    if abs(along[worst] - grid[worst]) > SPACING_TOL * dz:
        raise ValueError(
            f"{source}: slice spacing drifts: {objects[worst].name} lies "
            f"{along[worst] - grid[worst]:.3g} mm off an even {dz:.4g} mm grid; expected "
            "evenly spaced slices"
        )
    return dz


def _single_slice_thickness(o: _Object, source: Path) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = o.get(keyword)
        try:
            dz = float(value) if value is not None else 0.0
        except (TypeError, ValueError):
            dz = 0.0
        if np.isfinite(dz) and dz > 0:
            return dz
    raise ValueError(
        f"{source}: one slice ({o.name}) with no SpacingBetweenSlices or SliceThickness; "
        "cannot tell its thickness"
    )


def _check_pixel_data(
    objects: list[_Object], shape: tuple[int, int, int], bits: int, source: Path
) -> None:
    """An uncompressed file must hold its slice's bytes after the header (a truncated copy
    otherwise fails deep inside GDCM without naming the file)."""
    needed = shape[0] * shape[1] * bits // 8
    for o in objects:
        syntax = str(getattr(o.header, "file_meta", {}).get("TransferSyntaxUID", ""))
        if syntax not in _UNCOMPRESSED:
            continue
        # the pixel data element's tag and length (and VR in the explicit-VR syntaxes)
        stored = o.size - o.pixel_offset - (8 if syntax == _UNCOMPRESSED[0] else 12)
        if stored < needed:
            raise ValueError(
                f"{source}: {o.name} holds {max(stored, 0):,} bytes of "
                f"pixel data, expected {needed:,} ({shape[0]}×{shape[1]} pixels of {bits} "
                "bits); the file is truncated"
            )


def _read_voxels(objects: list[_Object], source: Path):
    """The series as a float32 ``SimpleITK.Image``, files in the given order."""
    sitk = require("SimpleITK", "reading DICOM")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(o.path) for o in objects])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # each file's rescale, kept fractional
    try:
        return reader.Execute()
    except RuntimeError as e:
        for o in objects:  # name the file that fails (only on this path: slow)
            try:
                sitk.ReadImage(str(o.path), sitk.sitkFloat32)
            except RuntimeError:
                raise ValueError(
                    f"{source}: cannot read the pixel data of {o.name}; the file is "
                    "truncated, corrupt or in an unsupported compression"
                ) from e
        raise ValueError(f"{source}: cannot read the series' pixel data ({e})") from e


def _check_reader_geometry(
    got: np.ndarray, expected: np.ndarray, shape: tuple, size: tuple, source: Path
) -> None:
    """SimpleITK's geometry against the headers': the same shape, voxel sizes within
    1e-4, axis directions within the orientation tolerance, origins within 1e-3 mm. (The
    thickness of a single slice is the headers' alone: SimpleITK says 1 mm.)"""
    zooms = np.linalg.norm(expected[:3, :3], axis=0)
    axes = 3 if shape[2] > 1 else 2
    same = (
        tuple(int(s) for s in size[:3]) == tuple(shape)
        and np.allclose(np.linalg.norm(got[:3, :axes], axis=0), zooms[:axes], rtol=1e-4)
        and np.allclose(
            got[:3, :3] / np.linalg.norm(got[:3, :3], axis=0),
            expected[:3, :3] / zooms,
            atol=2 * ORIENTATION_TOL,
        )
        and np.allclose(got[:3, 3], expected[:3, 3], atol=1e-3)
    )
    if not same:
        raise ValueError(
            f"{source}: SimpleITK read the series as {tuple(size)} voxels with affine "
            f"{np.round(got, 4).tolist()}, but its headers give {shape} and "
            f"{np.round(expected, 4).tolist()}; refusing an ambiguous geometry"
        )
