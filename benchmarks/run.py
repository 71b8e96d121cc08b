"""Benchmark entry point: ``python benchmarks/run.py --area AREA [--quick] [--cpu] --out DIR``.

Each area is a function in a module of this folder, registered in ``AREAS``; it receives
the parsed arguments and a :class:`Recorder`. Benchmarks report, they never assert: every
record holds the op, shape, dtype, provider, median and 20/80 percentiles, derived
throughput, peak memory, and the run's device, library versions and git commit. Results
are rewritten to ``DIR/<area>.json`` after every record (an interrupted run keeps its data)
and summarised in ``DIR/<area>.md``, and in a short table ``DIR/<area>.short.md`` (the area
module's ``summarize``).

``--cpu`` runs the same code paths on tiny inputs on the CPU (Triton kernels in the
interpreter) to prove the scripts work; its times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (benchmarks/common.py, beside this file)

#: area → (module in benchmarks/, function(args, recorder)). Add areas here.
AREAS: dict[str, tuple[str, str]] = {
    "kernels": ("bench_kernels", "run_kernels"),
    "tune": ("bench_tune", "run_tune"),
    "morphology": ("bench_morphology", "run_morphology"),
    "dilate": ("bench_dilate", "run_dilate"),
    "stitch": ("bench_stitch", "run_stitch"),
    "warp": ("bench_warp", "run_warp"),
    "passes": ("bench_passes", "run_passes"),
    "host": ("bench_host", "run_host"),
}


# -- shared helpers for every area ---------------------------------------------------------
def environment() -> dict:
    """Device, versions and commit, recorded with every result file (``common`` gathers
    them; this is the flat form ``gpu_check.sh`` and the area summaries read)."""
    import torch

    from fastcascade.ops import _backend

    git = common.git_commit(ROOT)
    commit = git["commit"] or "unknown (no git checkout)"
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit + ("+dirty" if git["dirty"] else ""),
        **common.versions(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu: " + common.cpu_name(),
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "backends": _backend.summary(),
    }


def measure(fn, *, cuda: bool, warmup: int = 3, reps: int = 10) -> dict:
    """Time ``fn()``: CUDA events around each call after a warm-up (GPU), or wall-clock
    (CPU). Returns median and 20th/80th percentiles in ms, and the peak of memory
    allocated during the timed calls above what was allocated before (MiB, GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    q = common.stats(times)
    return {
        "median_ms": q["median"],
        "p20_ms": q["p20"],
        "p80_ms": q["p80"],
        "reps": reps,
        "peak_mem_mib": peak,
    }


class Recorder:
    """Collects result records; rewrites ``out/<name>.json`` after each one."""

    def __init__(self, out_dir: Path, name: str, meta: dict):
        self.path = Path(out_dir) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "results": []}
        self.flush()

    def add(self, **record) -> dict:
        self.data["results"].append(record)
        self.flush()
        shown = {k: v for k, v in record.items() if k in ("op", "shape", "dtype", "provider")}
        time_ms = record.get("median_ms")
        tail = f"{time_ms:.3f} ms" if isinstance(time_ms, float) else record.get("error", "")
        print(f"  {shown} {tail}", flush=True)
        return record

    def flush(self) -> None:
        common.write_atomic(self.path, json.dumps(self.data, indent=1, default=str))

    def write_markdown(self, text: str) -> Path:
        path = self.path.with_suffix(".md")
        path.write_text(text)
        return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (header, key, format) triples; missing values print as ``–``. The
    table of dict records, laid out by ``common.markdown_table``."""

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None:
            return None
        return format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)

    header = [h for h, _, _ in columns]
    cells = ([cell(r, k, f) for _, k, f in columns] for r in rows)
    return common.markdown_table(header, cells) + "\n"


# -- entry point -------------------------------------------------------------------------
def short_table(module, data: dict, name: str) -> str | None:
    """A result's short table (its area module's ``summarize(data)``) under a heading, or
    ``None`` for an area without one."""
    if not hasattr(module, "summarize"):
        return None
    meta = data["meta"]
    return f"## {meta['area']} on {meta.get('device')} ({name})\n\n" + module.summarize(data)


def summary(out_dir: Path) -> int:
    """Print each result file's short table."""
    for path in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(path.read_text())
        area = data.get("meta", {}).get("area") if isinstance(data, dict) else None
        if area not in AREAS:
            continue
        text = short_table(importlib.import_module(AREAS[area][0]), data, path.name)
        if text is not None:
            print("\n" + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", choices=sorted(AREAS))
    parser.add_argument("--list-areas", action="store_true", help="print the areas and exit")
    parser.add_argument("--summary", type=Path, help="print short tables of DIR/*.json, exit")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--quick", action="store_true", help="bf16 only, batch 1-2, one compile")
    parser.add_argument("--cpu", action="store_true", help="tiny dry run on the CPU, no timings")
    parser.add_argument(
        "--memory-budget",
        type=lambda text: text if text == "auto" else float(text),
        default="auto",
        help="passes area: GiB a slab pass may use, or auto (what segment() takes by default: "
        "a share of the device's free memory, read once at the start)",
    )
    parser.add_argument(
        "--sample-tiles",
        type=int,
        default=3,
        help="passes area: tile passes that run the network (the rest extrapolated)",
    )
    common.add_allocator_argument(parser)
    parser.add_argument(
        "--baseline", help="git revision to time against in the same run (--area host; 'none')"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(ROOT))
    if args.list_areas:
        print(" ".join(sorted(AREAS)))
        return 0
    if args.summary:
        return summary(args.summary)
    if not args.area:
        parser.error("--area is required")
    if args.cpu:
        # Triton reads this when kernels are defined: set it before fastcascade is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    allocator = common.use_allocator(args.allocator)
    module_name, function_name = AREAS[args.area]
    module = importlib.import_module(module_name)
    meta = environment() | {"area": args.area, "quick": args.quick, "cpu_dry_run": args.cpu}
    meta["allocator"] = allocator
    recorder = Recorder(args.out, args.area, meta)
    print(f"[{args.area}] {meta['device']} · torch {meta['torch']} · triton {meta['triton']}")
    getattr(module, function_name)(args, recorder)
    print(f"[{args.area}] results: {recorder.path}")
    short = short_table(module, recorder.data, recorder.path.name)
    if short is not None:  # the short table gpu_check.sh's summary shows
        common.write_atomic(recorder.path.with_suffix(".short.md"), short)
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("run", sys.modules[__name__])  # areas import these helpers
    sys.exit(main())
