"""How large a scan (and the memory to hold it) fastcascade accepts before reading it.

A file's header states its size; nothing is allocated for it before that claim is checked
against these limits and against the file itself (``io/nifti.py``). Both limits can be
raised (or lowered) with environment variables:

- ``FASTCASCADE_MAX_VOXELS`` (default 2³¹ = 2,147,483,648): voxels a scan's header may
  claim;
- ``FASTCASCADE_MAX_MEMORY`` (default: this machine's physical memory): bytes that reading
  a scan, or one network tile of a model, may need; a number with an optional K, M, G or
  T suffix (powers of 1024), e.g. ``16G``.

>>> parse_bytes("16G")
17179869184
>>> human_bytes(3 * 2**30)
'3.0 GiB'
"""

from __future__ import annotations

import os
import re

DEFAULT_MAX_VOXELS = 2**31
_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"16G"``, ``"1.5T"`` or a plain number of bytes, as an int > 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r}; expected a positive size in bytes, e.g. 512M, 16G or 2T")
    return int(float(m.group(1)) * _SUFFIXES[m.group(2).upper()])


def human_bytes(n: float) -> str:
    """``n`` bytes as KiB, MiB, GiB or TiB with one decimal."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def max_voxels() -> int:
    """The voxel count a scan may claim (``FASTCASCADE_MAX_VOXELS``, default 2³¹)."""
    text = os.environ.get("FASTCASCADE_MAX_VOXELS")
    if text is None or not text.strip():
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"FASTCASCADE_MAX_VOXELS={text!r}; expected a positive voxel count")
    return value


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where it cannot be read."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def max_memory() -> int | None:
    """Bytes one read or one tile may need (``FASTCASCADE_MAX_MEMORY``, default the
    physical memory; ``None``: no limit known)."""
    text = os.environ.get("FASTCASCADE_MAX_MEMORY")
    if text is None or not text.strip():
        return physical_memory()
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise ValueError(f"FASTCASCADE_MAX_MEMORY={e}") from None


def check_claim(what: str, shape, itemsize: int, per_voxel: int) -> None:
    """Refuse, before anything is allocated, a volume of ``shape`` whose voxel count
    passes ``max_voxels()`` or whose reading (``per_voxel`` bytes a voxel) passes
    ``max_memory()``; the message says the claimed size, the limit and how to raise it."""
    voxels = 1
    for s in shape:
        voxels *= int(s)
    dims = "×".join(str(int(s)) for s in shape)
    limit = max_voxels()
    if voxels > limit:
        raise ValueError(
            f"{what} claims {dims} = {voxels:,} voxels ({human_bytes(voxels * itemsize)} "
            f"stored); the limit is {limit:,} voxels (raise it with FASTCASCADE_MAX_VOXELS)"
        )
    memory = max_memory()
    if memory is not None and voxels * per_voxel > memory:
        raise ValueError(
            f"{what} claims {dims} voxels, which need about "
            f"{human_bytes(voxels * per_voxel)} to read; the limit is {human_bytes(memory)} "
            "(FASTCASCADE_MAX_MEMORY, default this machine's memory)"
        )
