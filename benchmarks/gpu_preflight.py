"""The GPU check's first step: can this machine run it at all? Seconds, not minutes.

    python benchmarks/gpu_preflight.py --out WORK/preflight.json [--cpu] [--min-free-gib N]

Checks, in order, and writes every finding to the JSON as it goes (an interrupted check
still leaves what it found):

- the Python packages the check needs import (torch, triton, numpy, scipy, nibabel,
  safetensors, tqdm, pytest and fastcascade itself, from this checkout), with versions;
  CuPy is optional (reported, never required);
- on a GPU run: a CUDA device is visible, its name, capability and free memory (at least
  ``--min-free-gib``), and a tiny Triton kernel compiles, runs and writes what it should;
- on a CPU dry run (``--cpu``): the same kernel in Triton's interpreter, and whether the
  interpreter can work with this numpy (Triton 3.6's breaks with numpy >= 2.4).

The last line printed is one summary: ``preflight: ok · torch ... · <device> · N GiB free``
or ``preflight: FAILED · missing: nibabel (...) · ...``. Exit status 0 when everything
required is there, 1 otherwise. Only the standard library is imported at module level, so
that a missing package is reported, not raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module → what to do when it is missing on the GPU machine
REQUIRED = {
    "torch": "the image's own PyTorch (python3 of the GPU image)",
    "numpy": "comes with torch",
    "scipy": "the GPU image has it",
    "nibabel": "carry wheels/ made by benchmarks/gpu_prepare.sh",
    "safetensors": "the GPU image has it; else add it to gpu_prepare.sh's wheels",
    "tqdm": "the GPU image has it; else add it to gpu_prepare.sh's wheels",
    "pytest": "the GPU image has it",
    "triton": "the GPU image has it (Linux only)",
}
OPTIONAL = ("cupy",)


class Report:
    """The findings so far, rewritten to ``path`` after each one."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "problems": []}
        self.flush()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def problem(self, text: str) -> None:
        print(f"  PROBLEM: {text}", flush=True)
        self.data["problems"].append(text)
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def check_imports(rep: Report) -> dict:
    versions, missing = {}, []
    for name in [*REQUIRED, *OPTIONAL]:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is a finding
            versions[name] = None
            if name in REQUIRED:
                missing.append(name)
                rep.problem(f"cannot import {name} ({type(e).__name__}: {e}); {REQUIRED[name]}")
            continue
        versions[name] = getattr(module, "__version__", "?")
    try:
        import fastcascade

        where = Path(fastcascade.__file__).resolve()
        versions["fastcascade"] = getattr(fastcascade, "__version__", "?")
        if ROOT not in where.parents:
            rep.problem(f"fastcascade is imported from {where}, not from this checkout {ROOT}")
    except Exception as e:  # noqa: BLE001
        versions["fastcascade"] = None
        missing.append("fastcascade")
        rep.problem(f"cannot import fastcascade from {ROOT} ({type(e).__name__}: {e})")
    rep.set("python", platform.python_version())
    rep.set("executable", sys.executable)
    rep.set("versions", versions)
    rep.set("missing", missing)
    return versions


def check_cuda(rep: Report, min_free_gib: float) -> str:
    import torch

    cuda = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    rep.set("cuda", cuda)
    if not cuda["available"]:
        rep.problem("no CUDA device visible to torch (use --cpu for a dry run on a CPU)")
        return "no CUDA device"
    free, total = torch.cuda.mem_get_info()
    cuda |= {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "count": torch.cuda.device_count(),
        "free_gib": round(free / 2**30, 2),
        "total_gib": round(total / 2**30, 2),
        "cudnn": torch.backends.cudnn.version(),
    }
    rep.set("cuda", cuda)
    if free < min_free_gib * 2**30:
        rep.problem(f"only {free / 2**30:.1f} GiB of GPU memory free, {min_free_gib:g} needed")
    major, minor = cuda["capability"]
    return (
        f"{cuda['device']} (sm_{major}{minor}) · {cuda['free_gib']:.1f} of "
        f"{cuda['total_gib']:.1f} GiB free"
    )


def check_triton(rep: Report, cpu: bool) -> None:
    """Compile and run (or interpret) a kernel that writes 2 * i + 1, and read it back."""
    t0 = time.perf_counter()
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def _probe(out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, 2 * offs + 1, mask=offs < n)

        device = "cpu" if cpu else "cuda"
        out = torch.full((1000,), -1, dtype=torch.int32, device=device)
        _probe[(triton.cdiv(1000, 256),)](out, 1000, BLOCK=256)
        want = torch.arange(1000, dtype=torch.int32, device=device) * 2 + 1
        ok = bool(torch.equal(out, want))
        rep.set("triton_probe", {"ok": ok, "seconds": round(time.perf_counter() - t0, 2)})
        if not ok:
            rep.problem("a tiny Triton kernel ran but wrote wrong values")
    except Exception as e:  # noqa: BLE001 - the finding is the point
        rep.set("triton_probe", {"ok": False, "error": f"{type(e).__name__}: {e}"})
        rep.problem(f"a tiny Triton kernel failed: {type(e).__name__}: {str(e)[:300]}")


def side_files(out_dir: Path) -> None:
    """``nvidia-smi`` and the installed packages beside the JSON (best effort)."""
    if shutil.which("nvidia-smi"):
        with open(out_dir / "nvidia-smi.txt", "w") as f:
            subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, timeout=30)
    from importlib import metadata  # in-process: seconds faster than `pip list`

    names = {(d.metadata["Name"] or "?", d.version) for d in metadata.distributions()}
    lines = [f"{n}=={v}" for n, v in sorted(names, key=lambda nv: nv[0].lower())]
    (out_dir / "pip-freeze.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--cpu", action="store_true", help="dry run: no CUDA, Triton interpreted")
    p.add_argument("--min-free-gib", type=float, default=8.0)
    args = p.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    rep = Report(args.out)
    rep.set("mode", "cpu dry run" if args.cpu else "gpu")
    versions = check_imports(rep)
    parts = [f"python {platform.python_version()}"]
    parts += [f"{k} {v}" for k, v in versions.items() if v and k != "fastcascade"]
    parts += [f"no {k}" for k in OPTIONAL if not versions.get(k)]
    where = "no torch"
    if versions.get("torch"):
        if args.cpu:
            where = "CPU dry run"
            numpy_v, triton_v = versions.get("numpy") or "0", versions.get("triton") or "0"
            old_triton = tuple(int(x) for x in triton_v.split(".")[:2] if x.isdigit()) < (3, 7)
            if old_triton and tuple(int(x) for x in numpy_v.split(".")[:2]) >= (2, 4):
                rep.problem(f"Triton {triton_v}'s interpreter needs numpy < 2.4 ({numpy_v})")
        else:
            where = check_cuda(rep, args.min_free_gib)
        if versions.get("triton") and (args.cpu or rep.data["cuda"]["available"]):
            check_triton(rep, args.cpu)
    if args.out is not None:
        try:
            side_files(args.out.parent)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"  (side files: {e})")
    problems = rep.data["problems"]
    rep.set("ok", not problems)
    if problems:
        missing = rep.data.get("missing") or []
        head = f"missing: {', '.join(missing)} · " if missing else ""
        line = f"preflight: FAILED · {head}{' · '.join(problems)}"
    else:
        line = f"preflight: ok · {where} · " + " · ".join(parts)
    rep.set("summary", line)
    print(line, flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
