"""NIfTI files in and out: checked reading, and atomic writers for labels and probabilities.

Reading (``load_nifti``, ``read_voxels``, ``read_labels``) turns every way a file can be
broken (missing, empty, not NIfTI, truncated, zero or negative voxel size in the raw
header) into a ``ValueError`` or ``FileNotFoundError`` that names the file, instead of a
zlib/EOF error from deep inside nibabel.

Writing (``write_labels``, ``write_probabilities``, ``save_nifti``) goes through a
temporary file in the destination folder and ``os.replace``, so a reader never sees a
half-written file and an existing output survives a failed write. A path that resolves to
the input scan is refused. Label files get the input's affine in both sform and qform, an
unsigned integer dtype and unit scaling (never the CT's datatype or ``scl_slope``), and a
JSON of class names beside them (``seg.nii.gz`` → ``seg.json``).

Arrays here are on the scan's own (input) grid, indexed like the file's voxel axes; the
canonical RAS view is ``io/scan.py``'s business.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from .atomic import atomic_outputs
from .limits import check_claim

PathLike = str | os.PathLike

#: Errors that nibabel, gzip and zlib raise on unreadable, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: A file to write: its destination and a function that writes it to a given path.
Output = tuple[Path, Callable[[Path], None]]

#: Probabilities stored as 16 bits: uint16 with this slope (NIfTI has no float16 type).
PROB16_SLOPE = 1.0 / 65535.0


# --------------------------------------------------------------------------- reading


def load_nifti(path: PathLike) -> nib.Nifti1Image:
    """Open a ``.nii`` / ``.nii.gz`` file lazily, after checking its raw header.

    Checks that the file exists, is not empty, is NIfTI-1 or NIfTI-2, and that the raw
    ``pixdim[1:4]`` (voxel size in mm) are positive and finite: nibabel quietly reads a
    zero there as 1 mm and a negative one as its absolute value, which would give a scan
    a voxel size nobody wrote. The size the header claims is checked before anything is
    allocated: against ``io/limits.py``'s voxel and memory limits, and against the file
    (an uncompressed file must hold the claimed bytes; a gzip stream is read, without
    keeping it, up to the claimed size when its trailer disagrees). Voxel data are not
    read here (see ``read_voxels``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    everything else.

    >>> load_nifti("ct.nii.gz").shape  # doctest: +SKIP
    (512, 512, 300)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a .nii or .nii.gz scan)")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a .nii or .nii.gz file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty; expected a .nii or .nii.gz file")
    raw = _read_raw_header(path)
    ndim = int(raw["dim"][0])
    pixdim = [float(v) for v in raw["pixdim"][1 : 1 + min(max(ndim, 1), 3)]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise ValueError(
            f"{path}: the header's voxel size pixdim[1:4] is {pixdim}; expected positive "
            "finite values in mm (nibabel would silently replace zero or negative ones)"
        )
    _check_size(path, raw)
    try:
        img = nib.load(path)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read it as NIfTI ({e})") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: is a {type(img).__name__}; expected a .nii or .nii.gz file")
    return img


def _check_size(path: Path, raw: nib.Nifti1Header) -> None:
    """The header's claimed data size against the limits and the file (see ``load_nifti``)."""
    ndim = int(raw["dim"][0])
    if not 1 <= ndim <= 7:
        raise ValueError(f"{path}: the header's dim[0] is {ndim}; expected 1 to 7 axes")
    shape = [int(d) for d in raw["dim"][1 : ndim + 1]]
    if min(shape) < 1:
        raise ValueError(f"{path}: the header claims shape {tuple(shape)}; axes need >= 1 voxel")
    try:
        itemsize = np.dtype(raw.get_data_dtype()).itemsize
    except (HeaderDataError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: the header's datatype is not one NIfTI defines ({e})") from e
    # read as stored, then converted to float32 for the scan
    check_claim(str(path), shape, itemsize, per_voxel=itemsize + 4)
    voxels = int(np.prod(shape, dtype=np.int64))
    needed = int(raw["vox_offset"]) + voxels * itemsize
    if path.name.endswith(".gz"):
        stored = _gzip_size(path, needed)
        what = "the gzip stream holds"
    else:
        stored = path.stat().st_size
        what = "the file has"
    if stored < needed:
        raise ValueError(
            f"{path}: the header claims {'×'.join(map(str, shape))} voxels of "
            f"{itemsize} bytes ({needed:,} bytes with the header), but {what} {stored:,}; "
            "the file is truncated or its header is wrong"
        )


def _gzip_size(path: Path, needed: int, chunk: int = 1 << 20) -> int:
    """Uncompressed bytes of a gzip file, counted up to ``needed`` at most.

    The trailer's ISIZE (the size modulo 2³²) settles a single-member file at once when
    it agrees; otherwise the stream is decompressed in bounded chunks, nothing kept, and
    counting stops at ``needed``, so a gzip bomb costs no memory.
    """
    size = path.stat().st_size
    if size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize == needed % 2**32 and needed < 2**32:
            return needed
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < needed:
                data = f.read(min(chunk, needed - total))
                if not data:
                    break
                total += len(data)
    except EOFError:  # the stream ends inside a member: truncated, counted so far
        pass
    except (OSError, zlib.error) as e:
        raise ValueError(f"{path}: the gzip stream is corrupt ({e})") from e
    return total


def _read_raw_header(path: Path) -> nib.Nifti1Header:
    """The header exactly as stored, without nibabel's fix-ups (``check=False``)."""
    try:
        with ImageOpener(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise ValueError("file too short for a header")
            sizes = {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]}
            if 348 in sizes:
                klass = nib.Nifti1Header
            elif 540 in sizes:
                klass = nib.Nifti2Header
            else:
                raise ValueError("no NIfTI header (sizeof_hdr is neither 348 nor 540)")
            f.seek(0)
            header = klass.from_fileobj(f, check=False)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: not a readable NIfTI file ({e})") from e
    if header["magic"].item() not in (b"n+1", b"ni1", b"n+2", b"ni2"):
        raise ValueError(f"{path}: not a NIfTI file (bad magic {header['magic'].item()!r})")
    return header


def read_voxels(img: nib.spatialimages.SpatialImage, source: Any = "image") -> np.ndarray:
    """Voxel values of ``img`` as float32 with the header's scaling applied (HU for a CT).

    Same shape as ``img``; a truncated or corrupt file gives a ``ValueError`` naming
    ``source`` instead of an EOF/zlib error. The image's cache is left untouched.

    >>> read_voxels(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))).dtype
    dtype('float32')
    """
    try:
        # values beyond float32's range become inf here, which the scan's check names
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
            return np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except _READ_ERRORS as e:
        raise ValueError(
            f"{source}: cannot read the voxel data ({e}); the file is truncated or corrupt"
        ) from e


def spatial_shape(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    """``shape`` as a 3D shape: trailing axes of length 1 are dropped (a 4D file with one
    volume is a 3D scan); anything else than 3 axes, or an axis of length 0, is refused.

    >>> spatial_shape((4, 5, 6, 1), "scan")
    (4, 5, 6)
    """
    dims = tuple(int(s) for s in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        kind = {2: "a 2D image", 4: "a 4D series"}.get(len(dims), f"{len(dims)}D data")
        raise ValueError(
            f"{what} has shape {tuple(shape)} ({kind}); expected a 3D volume (x, y, z)"
        )
    if min(dims) < 1:
        raise ValueError(f"{what} has shape {tuple(shape)}; every axis needs at least 1 voxel")
    return dims


def map_labels(labels: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    """``label_map[id]`` for every voxel of an integer array, 0 for ids the map does not
    name (negative ids included); int64, same shape.

    >>> map_labels(np.array([0, 5, 7, 52]), {5: 1, 52: 8}).tolist()
    [0, 1, 0, 8]
    """
    if any(k < 0 or v < 0 for k, v in label_map.items()):
        raise ValueError(f"label map ids must be >= 0, got {dict(label_map)}")
    labels = np.asarray(labels)
    lo = int(labels.min()) if labels.size else 0
    hi = max(int(labels.max()) if labels.size else 0, max(label_map, default=0))
    if lo >= 0 and hi < 2**16:
        lut = np.zeros(hi + 1, dtype=np.int64)
        for src, dst in label_map.items():
            lut[src] = dst
        return lut[labels]
    ids, inverse = np.unique(labels, return_inverse=True)  # huge or negative ids: no table
    mapped = np.array([label_map.get(int(i), 0) for i in ids], dtype=np.int64)
    return mapped[inverse].reshape(labels.shape)


def read_labels(path: PathLike) -> np.ndarray:
    """Read a label map (x, y, z) on its file's own grid, for evaluation.

    Returns uint8 when every id fits, else uint16, else int64. The file must hold a 3D
    volume (a trailing axis of length 1 is dropped) of non-negative integer ids; float
    storage is accepted when every value is a whole number.

    >>> read_labels("seg.nii.gz").max()  # doctest: +SKIP
    np.uint8(10)
    """
    img = load_nifti(path)
    shape = spatial_shape(img.shape, f"label map {path}")
    kind = np.dtype(img.get_data_dtype()).kind
    if kind not in "iuf":
        raise TypeError(f"{path}: label data type {img.get_data_dtype()}; expected integers")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except _READ_ERRORS as e:
        raise ValueError(
            f"{path}: cannot read the voxel data ({e}); the file is truncated or corrupt"
        ) from e
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise ValueError(f"{path}: label map has NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: label map has non-integer values; expected class ids")
    lo, hi = (data.min(), data.max())
    if lo < 0:
        raise ValueError(f"{path}: label map has negative ids (min {lo}); expected ids >= 0")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.int64
    return data.astype(dtype)


def label_names_path(path: PathLike) -> Path:
    """The JSON of class names beside a label file: ``seg.nii.gz`` → ``seg.json``.

    >>> label_names_path("out/seg.nii.gz")
    PosixPath('out/seg.json')
    """
    path = Path(path)
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json")
    raise ValueError(f"{path}: expected a file name ending in .nii or .nii.gz")


def completion_marker_path(path: PathLike) -> Path:
    """The completion marker beside label file ``path``: ``seg.nii.gz`` → ``seg.done.json``.

    >>> completion_marker_path("out/seg.nii.gz")
    PosixPath('out/seg.done.json')
    """
    names = label_names_path(path)
    return names.with_name(names.name[: -len(".json")] + ".done.json")


def read_label_names(path: PathLike) -> tuple[str, ...] | None:
    """Class names from the JSON beside label file ``path``; ``None`` if there is none."""
    names_path = label_names_path(path)
    if not names_path.exists():
        return None
    mapping = json.loads(names_path.read_text())
    try:
        return tuple(str(mapping[str(i)]) for i in range(len(mapping)))
    except (KeyError, TypeError):
        raise ValueError(
            f"{names_path} must map every id 0..{len(mapping) - 1} to a name, "
            '{"0": "background", ...}'
        ) from None


# --------------------------------------------------------------------------- writing


def write_labels(
    path: PathLike,
    labels: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    header: nib.Nifti1Header | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_path: PathLike | None = None,
) -> None:
    """Write a label map and the JSON of its class names, atomically.

    ``labels``: (x, y, z) integer class ids on the *input* grid (numpy or a tensor on any
    device), each in ``[0, len(class_names))``. ``affine``: the input's 4x4 voxel-to-mm
    matrix. ``header``: the input's header, if any; its qform/sform codes are kept (1
    where it has none) and its spatial units, nothing else: the file gets uint8 (uint16
    for more classes than uint8 can number), ``scl_slope`` 1, ``scl_inter`` 0 and the
    NIfTI "label" intent. ``input_shape``: the input grid ``(x, y, z)`` the labels must
    match (default: the header's shape, when there is a header; no check without either).

    ``path`` must end in ``.nii`` or ``.nii.gz``; ``path`` with that suffix replaced by
    ``.json`` receives ``{"0": "background", ...}``. Neither may resolve to the input file
    ``input_path``: ``ValueError``. On any error no new file remains and an existing
    output is left as it was.

    For a ``Scan``: ``write_labels(path, labels, scan.input_affine, names, scan.header,
    input_shape=scan.input_shape, input_path=scan.path)``.

    >>> write_labels("seg.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4), CLASS_NAMES)
    ... # doctest: +SKIP
    """
    outputs, protect = labels_outputs(
        path, labels, affine, class_names, header, input_shape=input_shape, input_path=input_path
    )
    write_outputs(outputs, protect)


def write_outputs(
    outputs: Sequence[Output],
    protect: Sequence[PathLike] = (),
    before_move: Callable[[], None] | None = None,
) -> None:
    """Write every output to a temporary file, then move them into place in order (see
    ``atomic.atomic_outputs``): all or, on any error, none of them, and never onto a path
    of ``protect``. ``before_move`` runs once every temporary is written, just before the
    first is moved (e.g. to remove a completion marker that is about to go stale)."""
    with atomic_outputs([p for p, _ in outputs], protect) as tmps:
        for (_, write), tmp in zip(outputs, tmps, strict=True):
            write(tmp)
        if before_move is not None:
            before_move()


def labels_outputs(
    path: PathLike,
    labels: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    header: nib.Nifti1Header | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_path: PathLike | None = None,
) -> tuple[list[Output], list[Path]]:
    """What ``write_labels`` writes, checked and prepared but not yet written: the names
    JSON, then the label file, and the paths they must not overwrite."""
    affine, header, protect = _geometry(affine, header, input_path)
    class_names = tuple(str(n) for n in class_names)
    if not class_names:
        raise ValueError("class_names is empty; expected one name per class id")
    if len(class_names) > 65536:
        raise ValueError(f"{len(class_names)} classes; at most 65536 fit a uint16 label map")
    arr = _to_numpy(labels, "labels")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels have dtype {arr.dtype}; expected integer class ids")
    _check_grid(arr.shape, input_shape, header, "labels")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= len(class_names):
            raise ValueError(
                f"labels range over [{lo}, {hi}]; expected ids in [0, {len(class_names) - 1}] "
                f"for {len(class_names)} classes"
            )
    dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    img = _image(arr.astype(dtype, copy=False), affine, header, slope=1.0)
    img.header.set_intent("label")
    img.header["cal_min"], img.header["cal_max"] = 0, len(class_names) - 1
    names = json.dumps({str(i): n for i, n in enumerate(class_names)}, indent=1) + "\n"
    outputs = [
        (label_names_path(path), lambda tmp: Path(tmp).write_text(names)),
        (Path(path), lambda tmp: nib.save(img, tmp)),
    ]
    return outputs, protect


def mask_file_name(name: str) -> str:
    """The file name of an organ's binary mask: ``liver`` → ``liver.nii.gz``; characters
    other than letters, digits, ``.``, ``_`` and ``-`` become ``_`` (a class name never
    leaves the split folder).

    >>> mask_file_name("inferior_vena_cava")
    'inferior_vena_cava.nii.gz'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".") or "_"
    return f"{safe}.nii.gz"


def split_outputs(
    folder: PathLike,
    labels: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    ids: Sequence[int] | None = None,
    header: nib.Nifti1Header | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_path: PathLike | None = None,
) -> tuple[list[Output], list[Path]]:
    """One binary mask per organ, checked and prepared but not yet written (see
    ``write_outputs``): ``folder/<name>.nii.gz`` (:func:`mask_file_name`) for each id of
    ``ids`` (default: every class but background), present or not, with the voxels of
    that id 1 and every other 0, as a label file: uint8, the input's affine in sform and
    qform, unit scaling, and ``folder/<name>.json`` (``{"0": "background", "1": name}``)
    beside it. ``labels``: (x, y, z) class ids on the input grid.

    >>> split_outputs("masks", np.zeros((2, 2, 2), np.uint8), np.eye(4), CLASS_NAMES, [1])[0][1][0]
    ... # doctest: +SKIP
    PosixPath('masks/liver.nii.gz')
    """
    arr = _to_numpy(labels, "labels")
    class_names = tuple(str(n) for n in class_names)
    ids = range(1, len(class_names)) if ids is None else sorted({int(i) for i in ids})
    if any(not 0 < k < len(class_names) for k in ids):
        raise ValueError(f"ids must be class ids in 1..{len(class_names) - 1}, got {list(ids)}")
    folder = Path(folder)
    files = {k: folder / mask_file_name(class_names[k]) for k in ids}
    if len(set(files.values())) != len(files):
        raise ValueError(
            f"two class names give one mask file name in {folder}: {list(class_names)}"
        )
    _, header, protect = _geometry(affine, header, input_path)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels have dtype {arr.dtype}; expected integer class ids")
    _check_grid(arr.shape, input_shape, header, "labels")

    def mask_writer(path: Path, k: int) -> Callable[[Path], None]:
        # the mask is made when its file is written: one volume-sized mask at a time
        def write(tmp: Path) -> None:
            mask = (arr == k).astype(np.uint8)
            names = ("background", class_names[k])
            ((_, image),) = labels_outputs(path, mask, affine, names, header)[0][1:]
            image(tmp)

        return write

    outputs: list[Output] = []
    for k, path in files.items():
        names = json.dumps({"0": "background", "1": class_names[k]}, indent=1) + "\n"
        outputs.append((label_names_path(path), lambda tmp, text=names: Path(tmp).write_text(text)))
        outputs.append((path, mask_writer(path, k)))
    return outputs, protect


def write_probabilities(
    path: PathLike,
    probabilities: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    header: nib.Nifti1Header | None = None,
    *,
    dtype: str = "float32",
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    input_path: PathLike | None = None,
) -> None:
    """Write class probabilities (C, x, y, z) as a 4D NIfTI (x, y, z, C), atomically.

    Same geometry rules as ``write_labels`` (input affine in sform and qform, codes kept,
    never the input's datatype or scaling; ``input_shape`` or the header's shape checks
    the spatial axes; never onto ``input_path``). ``dtype="float32"`` stores the values as
    they are (``scl_slope`` 1). ``dtype="float16"`` halves the file: NIfTI has no 16-bit
    float type, so values are clipped to [0, 1] and stored as uint16 with
    ``scl_slope = 1/65535`` (absolute error ≤ 7.7e-6, finer than float16 near 1); readers
    get floats back through the slope as usual. With ``class_names`` a JSON of channel
    names is written beside it as for labels.

    >>> write_probabilities("p.nii.gz", np.full((2, 4, 4, 4), 0.5, np.float32), np.eye(4))
    ... # doctest: +SKIP
    """
    outputs, protect = probabilities_outputs(
        path,
        probabilities,
        affine,
        header,
        dtype=dtype,
        class_names=class_names,
        input_shape=input_shape,
        input_path=input_path,
    )
    write_outputs(outputs, protect)


def probabilities_outputs(
    path: PathLike,
    probabilities: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    header: nib.Nifti1Header | None = None,
    *,
    dtype: str = "float32",
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    input_path: PathLike | None = None,
) -> tuple[list[Output], list[Path]]:
    """What ``write_probabilities`` writes, checked and prepared but not yet written."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}; expected 'float32' or 'float16'")
    affine, header, protect = _geometry(affine, header, input_path)
    arr = _to_numpy(probabilities, "probabilities")
    if arr.dtype.kind != "f":
        raise TypeError(f"probabilities have dtype {arr.dtype}; expected floating point")
    if arr.ndim != 4:
        raise ValueError(f"probabilities have shape {arr.shape}; expected (C, x, y, z)")
    if class_names is not None and len(class_names) != arr.shape[0]:
        raise ValueError(
            f"probabilities have {arr.shape[0]} channels but {len(class_names)} class names"
        )
    _check_grid(arr.shape[1:], input_shape, header, "probabilities")
    if not np.isfinite(arr).all():
        raise ValueError("probabilities contain NaN or infinite values")
    arr = np.moveaxis(arr, 0, -1)
    if dtype == "float32":
        img = _image(arr.astype(np.float32, copy=False), affine, header, slope=1.0)
    else:
        quantized = np.rint(np.clip(arr, 0.0, 1.0) * 65535.0).astype(np.uint16)
        img = _image(quantized, affine, header, slope=PROB16_SLOPE)
    img.header.set_intent("estimate", name="probability")
    outputs: list[Output] = []
    if class_names is not None:
        names = json.dumps({str(i): str(n) for i, n in enumerate(class_names)}, indent=1)
        outputs.append((label_names_path(path), lambda tmp: Path(tmp).write_text(names + "\n")))
    outputs.append((Path(path), lambda tmp: nib.save(img, tmp)))
    return outputs, protect


def save_nifti(img: nib.Nifti1Image, path: PathLike, *, input_path: PathLike | None = None) -> None:
    """``nib.save(img, path)``, atomically, refusing to overwrite ``input_path``.

    >>> save_nifti(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), "ct.nii.gz")
    ... # doctest: +SKIP
    """
    label_names_path(path)  # checks the suffix
    protect = [Path(input_path)] if input_path is not None else []
    with atomic_outputs([Path(path)], protect) as (tmp,):
        nib.save(img, tmp)


def _geometry(
    affine: Any, header: nib.Nifti1Header | None, input_path: PathLike | None
) -> tuple[np.ndarray, nib.Nifti1Header | None, list[Path]]:
    protect = [Path(input_path)] if input_path is not None else []
    given = type(affine).__name__
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    try:
        affine = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"affine must be a 4x4 matrix (numpy or torch), got {given}") from e
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if header is not None and not isinstance(header, nib.Nifti1Header):
        raise TypeError(f"header must be a nibabel Nifti1Header or None, got {type(header)}")
    return affine, header, protect


def _check_grid(shape: tuple, input_shape: Sequence[int] | None, header: Any, what: str) -> None:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"{what} have shape {shape}; expected (x, y, z) on the input grid")
    expected = None if input_shape is None else tuple(int(s) for s in input_shape)
    if expected is None and header is not None:
        expected = spatial_shape(header.get_data_shape(), "the input header's image")
    if expected is not None and shape != expected:
        raise ValueError(
            f"{what} have spatial shape {shape} but the input grid is {expected}; "
            "bring them back to the input grid first (Scan.to_input_grid)"
        )


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _image(
    data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, slope: float
) -> nib.Nifti1Image:
    """A fresh NIfTI-1 image: only the geometry (affine, codes, units) comes from ``header``."""
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    qcode = int(header["qform_code"]) if header is not None else 0
    scode = int(header["sform_code"]) if header is not None else 0
    hdr.set_qform(affine, code=qcode if qcode > 0 else 1)
    hdr.set_sform(affine, code=scode if scode > 0 else 1)
    if header is not None and int(header["xyzt_units"]) != 0:
        hdr["xyzt_units"] = header["xyzt_units"]
    else:
        hdr.set_xyzt_units("mm")
    # Explicit (not NaN) so that nibabel writes them as they are instead of choosing.
    hdr.set_slope_inter(slope, 0.0)
    hdr["descrip"] = b"fastcascade"
    return img
