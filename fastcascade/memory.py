"""Host memory: what this process may still allocate, and whether freed blocks are kept.

CPU inference allocates and frees activations of tens of MB to several GB per layer.
glibc serves every block above its ``mmap`` threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``, so each layer's output is faulted in and zeroed by
the kernel again, page by page: on a 2-core machine a whole-scan pass of the default
model spent about half its time in those page faults (``benchmarks/e2e.py`` reports the
allocator it ran with). :func:`keep_freed_memory` asks glibc to serve large blocks from
its heap and to keep freed ones for the next allocation (``mallopt``: no ``mmap`` for
large blocks, a 2 GiB trim threshold), which removes those faults.

It changes the whole process, so the library never does it on import or inside
``segment()``: the ``fastcascade`` command does it at start, since the process is its own
(``FASTCASCADE_KEEP_FREED_MEMORY=0`` leaves glibc as it is), and a program that embeds
the library may call :func:`keep_freed_memory` itself or start Python with glibc's own
variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. What it costs: the
process keeps the memory it freed until it exits or calls :func:`release_freed_memory`,
and blocks of many sizes can fragment the heap (the resident peak of one pass of the
paper's network rose by up to 1.6x in our measurements). glibc reuses kept blocks from
the second allocation of a size on, so the first pass still faults. Elsewhere than on
glibc (macOS, Windows, musl) these calls do nothing and say so.

>>> isinstance(heap_free(), int)
True
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from .io.limits import max_memory

__all__ = [
    "available_memory",
    "heap_free",
    "keep_freed_memory",
    "keeping_freed_memory",
    "release_freed_memory",
]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: The largest trim threshold ``mallopt`` takes (an ``int``): a free top of the heap is
#: handed back to the system only beyond it.
TRIM_THRESHOLD = 2**31 - 1

_kept = False


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (``mallopt``, ``mallinfo2``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and newer
        libc.mallinfo2.restype = _MallInfo2
    return libc


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep freed ones for reuse, for the
    rest of this process (see the module's docstring). Returns whether it took effect
    (``False`` without glibc)."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    done = libc.mallopt(_M_MMAP_MAX, 0) == 1
    done = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    _kept = _kept or done
    return done


def keeping_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _kept


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the system (``malloc_trim``); whether any was."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def heap_free() -> int:
    """Bytes free in this process's heap (glibc's ``mallinfo2().fordblks``, glibc 2.33 or
    newer; 0 where it cannot be read): memory the process holds and can allocate again
    without the system, which the system's own estimates count as used."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return int(libc.mallinfo2().fordblks)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """Linux's estimate of the memory available to new allocations without swapping."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """The memory this process's cgroup (v2, or v1) may still take: its limit less its
    usage; ``None`` without a limit or where it cannot be read."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            with open(os.path.join(root, limit_file)) as f:
                text = f.read().strip()
            if text == "max":
                return None
            limit = int(text)
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, limit - usage)
    return None


def available_memory() -> int | None:
    """Host bytes this process may still allocate: the least of the kernel's
    ``MemAvailable`` and the cgroup's limit less its usage (containers), each plus the
    process's own free heap (:func:`heap_free`), and ``FASTCASCADE_MAX_MEMORY`` (by
    default the physical memory, all that is known on other systems); ``None`` where
    nothing is known."""
    own = heap_free()
    known = [v + own for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    limit = max_memory()  # FASTCASCADE_MAX_MEMORY, else the physical memory
    if limit is not None:
        known.append(limit)
    return min(known) if known else None
