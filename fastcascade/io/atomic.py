"""Writing files atomically: a temporary file beside the target, fsynced, then renamed
onto it, so that no reader ever sees a partial file under the target's name and an
interrupted write leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (symlinks and hard links resolved)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def atomic_outputs(
    paths: Iterable[PathLike], protect: Iterable[PathLike] = ()
) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; on success move them into place.

    Temporaries are created with mode 0o666 minus the umask (like a plain ``open``),
    keep the destination's suffix (nibabel picks gzip from it), are fsynced, and are
    removed on any error, so no partial file is ever left under a destination name.
    """
    paths, protect = [Path(p) for p in paths], [Path(q) for q in protect]
    for p in paths:
        for q in protect:
            if same_file(p, q):
                raise ValueError(f"refusing to write {p}: it is the input file {q}")
        if p.is_dir():
            raise ValueError(f"{p} is a folder; expected a file name")
        if not p.parent.is_dir():
            raise FileNotFoundError(f"output folder {p.parent} does not exist")
    tmps: list[Path] = []
    try:
        for p in paths:
            suffix = ".nii.gz" if p.name.endswith(".nii.gz") else p.suffix
            tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp{suffix}")
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
