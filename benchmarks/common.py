"""What every fastcascade benchmark records besides its measurements.

A benchmark reports, it never asserts a time. Each result file holds the device, the
library versions, the git commit and the machine load next to the records, is written
atomically after every run (an interrupted run still leaves valid JSON), and gets a
markdown table beside it.

>>> stats([3.0, 1.0, 2.0])["median"]
2.0
>>> slug("NVIDIA H100 80GB HBM3")
'nvidia-h100-80gb-hbm3'
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# -- the machine -----------------------------------------------------------------------
def slug(text: str, max_len: int = 48) -> str:
    """Lower-case letters, digits and single dashes: a file-name-safe device name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for a GPU; the CPU's model and core count otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU; ``cpu-<model>`` without the ``(R)``/``@ GHz``
    noise for the CPU."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    name = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b", " ", cpu_name(), flags=re.I)
    return "cpu-" + (slug(name, 40) or "unknown")


ALLOCATORS = ("kept", "system")


def add_allocator_argument(parser) -> None:
    """``--allocator kept|system`` (default ``kept``, as the ``fastcascade`` command runs)."""
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="kept",
        help="kept: glibc keeps freed memory for reuse, as the fastcascade command sets it "
        "(fastcascade.memory.keep_freed_memory); system: the C library's defaults, as a "
        "Python program embedding the library gets them (default: kept)",
    )


def use_allocator(choice: str) -> str:
    """Apply ``--allocator`` to this process; returns the sentence a result records."""
    if choice == "system":
        return "the C library's defaults (large blocks mapped and unmapped each time)"
    from fastcascade.memory import keep_freed_memory

    if keep_freed_memory():
        return "glibc keeps freed memory for reuse, as the fastcascade command sets it"
    return "--allocator kept asked for, but this C library is not glibc: its defaults"


def load_average() -> dict:
    """The 1/5/15-minute load averages and the core count: other work on the machine
    makes timings noisy, so every result file says how busy it was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return {"cores": os.cpu_count()}
    return {"1min": one, "5min": five, "15min": fifteen, "cores": os.cpu_count()}


def uptime() -> str | None:
    """The ``uptime`` command's line (load averages included), or ``None``."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def git_commit(root: Path = ROOT) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the checkout, or ``{"commit": None}``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


def versions() -> dict:
    """Versions of Python and of the libraries the timings depend on."""
    import numpy
    import scipy

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import fastcascade

        out["fastcascade"] = fastcascade.__version__
    except ImportError:
        out["fastcascade"] = None
    return out


def environment(device: torch.device) -> dict:
    """Device, versions, commit, command line and machine load for a result file."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_commit(),
        "argv": sys.argv,
        "load_average_start": load_average(),
        "uptime_start": uptime(),
    }


# -- measurements ----------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict:
    """Median and 20/80th percentiles (linear interpolation) of a list of seconds."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("stats needs at least one value")

    def pct(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": pct(0.5), "p20": pct(0.2), "p80": pct(0.8), "n": len(xs)}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (CUDA only: the CPU peak is the
    process's, which cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """``(MiB, what it is)``: CUDA ``max_memory_allocated`` since the last reset; on the
    CPU the process's peak resident set (``ru_maxrss``), which only ever grows — a later
    run shows a new value only if it needed more than every earlier one."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "process peak RSS (ru_maxrss, cumulative)"


def add_speedups(
    rows: Iterable[dict],
    baseline: str,
    *,
    by: Sequence[str] = ("case",),
    column: str | None = None,
    not_baselines: Iterable[str] = (),
) -> None:
    """Add speed-ups to the timed records of ``rows`` (those with a ``median_ms``), in
    place, comparing records that share the fields ``by``:

    - ``column`` (default ``speedup_vs_<baseline>``): the ``baseline`` provider's median
      over the record's, where ``baseline`` was timed in the group;
    - ``speedup_vs_best_baseline``: the fastest median of the providers that are not
      fastcascade's (name not starting with ``fastcascade``, not in ``not_baselines``)
      over the record's, where there is one.

    >>> rows = [{"case": "a", "provider": "scipy", "median_ms": 4.0},
    ...         {"case": "a", "provider": "fastcascade", "median_ms": 1.0}]
    >>> add_speedups(rows, "scipy"); rows[1]["speedup_vs_scipy"]
    4.0
    """
    column = f"speedup_vs_{baseline}" if column is None else column
    not_baselines = set(not_baselines)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("median_ms"):
            groups.setdefault(tuple(r[k] for k in by), []).append(r)
    for group in groups.values():
        timed = {r["provider"]: r["median_ms"] for r in group}
        baselines = [
            t
            for p, t in timed.items()
            if not p.startswith("fastcascade") and p not in not_baselines
        ]
        for r in group:
            if baseline in timed:
                r[column] = timed[baseline] / r["median_ms"]
            if baselines:
                r["speedup_vs_best_baseline"] = min(baselines) / r["median_ms"]


# -- output ----------------------------------------------------------------------------
def result_path(out_dir: Path, name: str, device: torch.device, suffix: str = "") -> Path:
    """``<out_dir>/<name>-<device-slug>-<YYYY-MM-DD><suffix>.json``."""
    day = datetime.now().strftime("%Y-%m-%d")
    return Path(out_dir) / f"{name}-{device_slug(device)}-{day}{suffix}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    from fastcascade.io.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (NaN written as ``null``)."""
    write_atomic(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; ``None`` cells print as an en dash."""

    def cell(v) -> str:
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
