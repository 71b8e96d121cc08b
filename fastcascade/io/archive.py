"""Zip archives in, unpacked safely: into a new temporary folder, never beside the input.

Before a byte is unpacked, every member is checked: a path that would land outside the
folder (absolute, ``..``, a drive letter: "zip slip"), a symbolic link, an encrypted
member, or sizes that no CT series needs are refused with the member named. The sizes the
archive claims are bounded by ``MAX_BYTES_PER_VOXEL`` times the voxel limit of
``io/limits.py`` (``FASTCASCADE_MAX_VOXELS``) and by the free space of the temporary
folder; while unpacking, bytes are counted and a member that yields more than it claimed
(a lying header) is refused too, so a zip bomb costs neither memory nor disk. The
temporary folder (under ``TMPDIR``) is removed when the ``with`` block ends, whatever
happens.

>>> with unpacked_zip("series.zip") as folder:  # doctest: +SKIP
...     files = sorted(folder.rglob("*"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from .limits import human_bytes, max_voxels

PathLike = str | os.PathLike

#: Bytes a zip may unpack to, per voxel of the voxel limit: a CT series stores at most
#: 2 bytes a voxel, plus its files' headers.
MAX_BYTES_PER_VOXEL = 4

#: Members a zip may hold (a CT series has at most a few thousand slices).
MAX_MEMBERS = 100_000

_CHUNK = 1 << 20


def check_members(path: PathLike, infos: list[zipfile.ZipInfo]) -> int:
    """Refuse the members of zip ``path`` that are unsafe to unpack; returns the bytes
    they claim once unpacked. Raises ``ValueError`` naming the member and the rule."""
    if len(infos) > MAX_MEMBERS:
        raise ValueError(
            f"{path}: holds {len(infos):,} members; a CT series needs at most {MAX_MEMBERS:,}"
        )
    total = 0
    for info in infos:
        name = info.filename
        pure = PurePosixPath(name.replace("\\", "/"))
        if (
            pure.is_absolute()
            or ".." in pure.parts
            or PureWindowsPath(name).drive
            or name.startswith(("/", "\\"))
        ):
            raise ValueError(
                f"{path}: member {name!r} would be written outside the folder it is unpacked "
                "into (an absolute path or '..'); refusing the archive"
            )
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ValueError(f"{path}: member {name!r} is a symbolic link; refusing the archive")
        if info.flag_bits & 0x1:
            raise ValueError(f"{path}: member {name!r} is encrypted; expected a plain zip")
        total += info.file_size
    limit = MAX_BYTES_PER_VOXEL * max_voxels()
    if total > limit:
        raise ValueError(
            f"{path}: its members claim {human_bytes(total)} once unpacked; the limit is "
            f"{human_bytes(limit)} ({MAX_BYTES_PER_VOXEL} bytes a voxel of "
            "FASTCASCADE_MAX_VOXELS, which raises it)"
        )
    return total


@contextlib.contextmanager
def unpacked_zip(path: PathLike) -> Iterator[Path]:
    """Unpack zip ``path`` into a new temporary folder, yield that folder, remove it.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything that
    is not a safe, readable zip (see the module's docstring). The input is only read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .zip of a DICOM series)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable zip archive ({e})") from e
    with archive:
        infos = archive.infolist()
        claimed = check_members(path, infos)
        folder = Path(tempfile.mkdtemp(prefix="fastcascade-zip-"))
        try:
            free = shutil.disk_usage(folder).free
            if claimed > free:
                raise ValueError(
                    f"{path}: its members claim {human_bytes(claimed)} once unpacked, more "
                    f"than the {human_bytes(free)} free in {folder.parent} (set TMPDIR to a "
                    "larger folder)"
                )
            for info in infos:
                _unpack(archive, info, folder, path)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _unpack(archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path, path: Path) -> None:
    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
    if not parts:
        return
    target = folder.joinpath(*parts)
    if not target.resolve().is_relative_to(folder.resolve()):  # checked already; belt and braces
        raise ValueError(f"{path}: member {info.filename!r} leaves the unpacking folder")
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with archive.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    raise ValueError(
                        f"{path}: member {info.filename!r} unpacks to more than the "
                        f"{info.file_size:,} bytes it claims; refusing the archive"
                    )
                dst.write(chunk)
    except FileExistsError:
        raise ValueError(f"{path}: member {info.filename!r} appears twice") from None
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise ValueError(f"{path}: member {info.filename!r} cannot be unpacked ({e})") from e
