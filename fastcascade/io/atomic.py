"""Writing files atomically: a temporary file beside the target, fsynced, then renamed
onto it, so that no reader ever sees a partial file under the target's name and an
interrupted write leaves the old file as it was.

Temporaries are hidden files named after their target, this machine and the writing
process (``.seg.nii.gz.<host>-<pid>.<random>.tmp.nii.gz``). A process killed while it
writes cannot remove its own; the next write into the same folder removes those of this
machine whose process no longer runs (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike

#: This machine in temporary names: a short hash of its host name.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.([0-9a-f]{8})-(\d+)\.[0-9a-f]{12}\.tmp(\..*)?$")


def temporary_name(target: Path) -> Path:
    """A new hidden temporary path beside ``target``, with ``target``'s suffix."""
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    token = secrets.token_hex(6)
    return target.with_name(f".{target.name}.{HOST_TAG}-{os.getpid()}.{token}.tmp{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` left by writers of this machine that have
    died (by the process id in their names); returns the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m is None or m.group(1) != HOST_TAG or _alive(int(m.group(2))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def output_folders(paths: Iterable[PathLike]) -> Iterator[list[Path]]:
    """Create the missing folders ``paths`` (and their missing parents); if the block
    fails, remove those it created that are still empty, so a failed command leaves no
    empty output folder behind. Yields the folders created."""
    created: list[Path] = []
    for folder in paths:
        missing = []
        folder = Path(folder)
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            if d.is_symlink():  # a dangling link: not ours to replace
                raise FileNotFoundError(f"output folder {d} is a broken symbolic link")
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile by another process (parts of a batch)
                if not d.is_dir():
                    raise
                continue  # theirs: not removed by us
            created.append(d)
    try:
        yield created
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        raise


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (symlinks and hard links resolved)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` lies in (or under) the existing folder ``folder`` (links resolved),
    e.g. an output inside a DICOM series' folder, which the next read would take in."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


@contextlib.contextmanager
def atomic_outputs(
    paths: Iterable[PathLike], protect: Iterable[PathLike] = ()
) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; on success move them into place.

    ``protect``: inputs: a path that is one of them, or inside one that is a folder, is
    refused with a ``ValueError`` before anything is written.

    Temporaries are created with mode 0o666 minus the umask (like a plain ``open``),
    keep the destination's suffix (nibabel picks gzip from it), are fsynced, and are
    removed on any error, so no partial file is ever left under a destination name. They
    are moved into place in the order of ``paths`` (put the file readers look for last).
    Stale temporaries of dead writers in the destination folders are removed first.
    """
    paths, protect = [Path(p) for p in paths], [Path(q) for q in protect]
    for p in paths:
        for q in protect:
            if same_file(p, q):
                raise ValueError(f"refusing to write {p}: it is the input file {q}")
            if inside(p, q):
                raise ValueError(f"refusing to write {p}: it is inside the input folder {q}")
        if p.is_dir():
            raise ValueError(f"{p} is a folder; expected a file name")
        if not p.parent.is_dir():
            raise FileNotFoundError(f"output folder {p.parent} does not exist")
    for folder in {p.parent for p in paths}:
        remove_stale_temporaries(folder)
    tmps: list[Path] = []
    try:
        for p in paths:
            tmp = temporary_name(p)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            tmps.append(tmp)
        yield tmps
        for tmp in tmps:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, p in zip(tmps, paths, strict=True):
            os.replace(tmp, p)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then move the temporary file onto ``path`` (its folder is
    created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs([path]) as (tmp,):
        write(str(tmp))
    return path
