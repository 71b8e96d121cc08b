"""Benchmark of the body mask's steps: hole filling, largest component, the whole C1.

Run through ``benchmarks/run.py --area morphology`` (``benchmarks/gpu_check.sh --area
cascade`` runs it before the end-to-end benchmark). Providers, timed in the same run on
the same phantom (``op(..., backend=provider)`` from ``fastcascade.ops.morphology``):

- ``scipy``: ``scipy.ndimage`` on the host; for a CUDA tensor the timed region includes
  the mask's download and the result's upload (what the cascade pays);
- ``cupy``: ``cupyx.scipy.ndimage.label`` on the GPU (CUDA with CuPy installed);
- ``torch``: the PyTorch labelling on the tensor's device (every device);
- ``cuda``: fastcascade's CUDA kernels (``csrc/ccl.cu``), built before the timing starts
  (the build's seconds are recorded as ``cuda_build_s``); a GPU with the CUDA toolkit.

Without a GPU the benchmark times the CPU (the numbers behind ``backend="auto"`` choosing
SciPy there); ``--cpu`` is a dry run on tiny volumes. Every provider's mask is compared
with SciPy's (``equal``), and the host syncs of one call are counted. Providers that
cannot run here are listed with the reason (``unavailable``).

Volumes: a phantom on case A's 3 mm grid (122×101×112) and, on a GPU, one at 1.5 mm over
256×256×150 voxels (the working grid of a 512×512×300 CT at half resolution).
"""

from __future__ import annotations

import time

import torch
from run import markdown_table, measure

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend, ccl
from fastcascade.ops.morphology import body_mask, fill_holes_2d, largest_component
from fastcascade.phantom import make_phantom

THRESHOLD = -300.0
VOLUMES = {  # name: (shape, spacing in mm)
    "3mm": ((122, 101, 112), (3.0, 3.0, 3.0)),
    "half-res-512": ((256, 256, 150), (1.5, 1.5, 2.0)),
}
CPU_DRY_VOLUME = {"dry-run": ((24, 20, 12), (12.0, 12.0, 12.0))}

COLUMNS = [
    ("op", "op", ""),
    ("volume", "volume", ""),
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20–p80 ms", "spread", ""),
    ("syncs", "syncs", "d"),
    ("equal to SciPy", "equal", ""),
    ("× vs SciPy", "speedup_vs_scipy", ".2f"),
]


#: Providers that need more than PyTorch and SciPy, in the order they are timed.
OPTIONAL = ("cupy", "cuda")


def _providers(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The providers that run on ``device`` here, and why each of the others cannot."""
    probe = torch.zeros(1, device=device)
    providers, unavailable = ["scipy"], {}
    for name in OPTIONAL:
        try:
            _backend.resolve(name, probe, candidates=(name,))
        except _backend.BackendUnavailableError as error:
            unavailable[name] = str(error)
        else:
            providers.append(name)
    return providers + ["torch"], unavailable


def _build_cuda(rec) -> None:
    """Compile (or load the cached build of) the CUDA extension before any timing."""
    t0 = time.perf_counter()
    ccl.extension()
    rec.data["meta"]["cuda_build_s"] = time.perf_counter() - t0


def _ops(image: torch.Tensor) -> dict:
    """op name → (function of backend, its input)."""
    above = image > THRESHOLD
    filled = fill_holes_2d(above, backend="scipy")
    return {
        "fill_holes_2d": (lambda b: fill_holes_2d(above, backend=b)),
        "largest_component": (lambda b: largest_component(filled, backend=b)),
        "body_mask": (lambda b: body_mask(image, THRESHOLD, backend=b)),
    }


def run_morphology(args, rec) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    volumes = CPU_DRY_VOLUME if args.cpu else dict(VOLUMES)
    if not cuda and not args.cpu:
        volumes.pop("half-res-512")  # minutes of phantom drawing and SciPy on two cores
    reps = 2 if args.cpu else (5 if args.quick else 10)
    rec.data["meta"]["timed_region"] = (
        "one call of the op per rep after warm-up, CUDA events (wall clock on a CPU); "
        "scipy on a CUDA tensor includes the mask's download and the result's upload; "
        "cuda excludes its build (cuda_build_s)"
    )
    providers, unavailable = _providers(device)
    rec.data["meta"]["providers"] = providers
    rec.data["meta"]["unavailable"] = unavailable
    for name, why in unavailable.items():
        print(f"  {name}: unavailable ({why})")
    if "cuda" in providers:
        _build_cuda(rec)
    for volume, (shape, spacing) in volumes.items():
        image = torch.from_numpy(make_phantom(shape, spacing, seed=7).image).to(device)
        ops = _ops(image)
        for op, call in ops.items():
            expected = call("scipy").cpu()
            times = {}
            for provider in providers:
                with SyncCounter() as counter:
                    out = call(provider)
                timing = measure(lambda c=call, p=provider: c(p), cuda=cuda, reps=reps)
                times[provider] = timing["median_ms"]
                rec.add(
                    op=op,
                    volume=volume,
                    shape=list(shape),
                    provider=provider,
                    device=str(device),
                    equal=bool(torch.equal(out.cpu(), expected)),
                    syncs=counter.syncs,
                    spread=f"{timing['p20_ms']:.3f}–{timing['p80_ms']:.3f}",
                    **timing,
                )
            for record in rec.data["results"][-len(times) :]:
                record["speedup_vs_scipy"] = times["scipy"] / record["median_ms"]
    rec.flush()
    title = f"# Body mask steps on {rec.data['meta']['device']}\n\n"
    if args.cpu:
        title += "CPU dry run on a tiny volume: proves the code paths, times mean nothing.\n\n"
    title += (
        "Syncs: host reads counted by `SyncCounter` in one call (PyTorch's only; CuPy's "
        "labelling reads its component count itself, once per labelling).\n\n"
    )
    if "cuda_build_s" in rec.data["meta"]:
        title += f"cuda: built in {rec.data['meta']['cuda_build_s']:.1f} s before timing.\n\n"
    title += "".join(f"{name}: unavailable ({why}).\n\n" for name, why in unavailable.items())
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh."""
    short = [c for c in COLUMNS if c[1] != "spread"]
    unavailable = data["meta"].get("unavailable", {})
    notes = "".join(f"\n{name}: unavailable ({why})" for name, why in unavailable.items())
    return markdown_table(data["results"], short) + notes
