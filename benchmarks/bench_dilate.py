"""Benchmark of the candidate map's dilation (``fastcascade.ops.dilate``) against its peers.

Run through ``benchmarks/run.py --area dilate`` (``benchmarks/gpu_check.sh --area kernels``
runs it after the conv-BN-ReLU benchmark). Providers, timed in the same run on the same
mask, every one compared voxel by voxel with SciPy's result:

- ``scipy``: ``scipy.ndimage.binary_dilation`` with ``structuring_element(r, spacing)`` on
  a host array (one CPU thread; no transfers timed, on a GPU machine too);
- ``torch``: ``dilate(..., backend="torch")``, the row decomposition on the mask's device;
- ``cupy``: ``cupyx.scipy.ndimage.binary_dilation`` with the same element (GPU with CuPy);
- ``cupy_edt``: ``distance_transform_edt(~mask, sampling=spacing) <= r·min(spacing)``
  (GPU with CuPy): a different rounding of the same ball, so its agreement is recorded
  (``mismatches``), and whether it gives the same element on a single voxel
  (``meta.edt_element``; checked with SciPy's EDT on every machine);
- ``fastcascade_triton``: ``dilate(mask, ..., backend="triton")``, the two kernels on a
  bool mask; ``fastcascade_triton_labels`` the same on the uint8 label map (foreground =
  label > 0, the pass that makes the mask saved).

Masks: phantom labels (case A's anatomy, ``fastcascade.phantom``) resampled by nearest
neighbour to each shape: 256³ (r = 3), case A's 3 mm grid 122×101×112 (r = 3) and, on a
GPU, the half-resolution working grid of a 512×512×300 CT, 256×256×150 at 1.5×1.5×2 mm,
whose z rows are not 16-byte aligned (the kernels' byte-wise path). Without a GPU the
benchmark times SciPy and torch on the CPU (the Triton interpreter would take minutes);
``--cpu`` is a dry run on a tiny volume that runs the Triton kernels in the interpreter.

GB/s counts one read of the input and one write of the output (2 bytes per voxel), the
traffic floor of any dilation; ``floor ms`` is that traffic at the device's peak bandwidth.
"""

from __future__ import annotations

import contextlib
import math

import common
import numpy as np
import torch
from bench_kernels import _try, device_peaks
from run import markdown_table, measure
from scipy import ndimage

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend
from fastcascade.ops.dilate import dilate, structuring_element
from fastcascade.phantom import make_phantom

#: name: (shape, radius in voxels of the finest axis, spacing in mm)
CASES = {
    "256cube-r3": ((256, 256, 256), 3, (1.0, 1.0, 1.0)),
    "caseA-3mm-r3": ((122, 101, 112), 3, (3.0, 3.0, 3.0)),
}
GPU_CASES = {"half-res-512-r3": ((256, 256, 150), 3, (1.5, 1.5, 2.0))}
CPU_DRY_CASES = {"dry-run": ((12, 10, 40), 2, (1.0, 1.0, 2.0))}

COLUMNS = [
    ("case", "case", ""),
    ("shape", "shape_str", ""),
    ("input", "dtype", ""),
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20 ms", "p20_ms", ".3f"),
    ("p80 ms", "p80_ms", ".3f"),
    ("GB/s", "gbps", ".3g"),
    ("floor ms", "floor_ms", ".4f"),
    ("× SciPy", "speedup_vs_scipy", ".1f"),
    ("× best baseline", "speedup_vs_best_baseline", ".2f"),
    ("equal to SciPy", "equal", ""),
    ("mismatches", "mismatches", "d"),
    ("syncs", "syncs", "d"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("note", "error", ""),
]


def candidate_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Case A's phantom labels (uint8) resampled by nearest neighbour to ``shape``: drawn
    on case A's 3 mm grid, or a coarser one for a volume smaller than that (dry runs)."""
    case_a = (122, 101, 112)
    step = max(3.0, *(3.0 * m / n for m, n in zip(case_a, shape, strict=True)))
    grid = tuple(max(1, round(3.0 * m / step)) for m in case_a)
    labels = make_phantom(grid, (step,) * 3, seed=7, noise=False).labels
    index = [np.minimum((np.arange(n) + 0.5) * m / n, m - 1).astype(int) for n, m in
             zip(shape, labels.shape, strict=True)]  # fmt: skip
    return np.ascontiguousarray(labels[np.ix_(*index)])


def edt_element_check(radius: int, spacing) -> dict:
    """Whether the EDT route's ball (``edt <= r·min(spacing)``) is our element, from the
    EDT of a single voxel: SciPy's here, CuPy's where a GPU and CuPy are present."""
    element = structuring_element(radius, spacing)
    pad = [n // 2 + 2 for n in element.shape]
    seed = np.ones([2 * p + 1 for p in pad], dtype=bool)
    seed[tuple(pad)] = False  # the EDT's zero: distances to the one foreground voxel
    centre = tuple(
        slice(p - n // 2, p + n // 2 + 1) for p, n in zip(pad, element.shape, strict=True)
    )
    out = {}
    routes = {"scipy": lambda: ndimage.distance_transform_edt(seed, sampling=spacing)}
    if torch.cuda.is_available() and _backend.cupy_available():
        import cupy
        from cupyx.scipy import ndimage as cndimage

        routes["cupy"] = lambda: cupy.asnumpy(
            cndimage.distance_transform_edt(cupy.asarray(seed), sampling=spacing)
        )
    for name, edt in routes.items():
        ball = edt() <= radius * min(spacing)
        same = bool(np.array_equal(ball[centre], element)) and int(ball.sum()) == element.sum()
        out[name] = {"same_element": same, "ball_voxels": int(ball.sum())}
    out["element_voxels"] = int(element.sum())
    return out


def _providers(labels_host, radius, spacing, device, cuda):
    """provider → (function returning the dilated mask, timed with CUDA events?)."""
    element = structuring_element(radius, spacing)
    mask_host = labels_host > 0
    labels = torch.from_numpy(labels_host).to(device)
    mask = labels > 0
    providers = {
        "scipy": (lambda: ndimage.binary_dilation(mask_host, structure=element), False),
        "torch": (lambda: dilate(mask, radius, spacing, backend="torch"), cuda),
    }
    if cuda and _backend.cupy_available():
        import cupy
        from cupyx.scipy import ndimage as cndimage

        cmask = cupy.from_dlpack(mask.view(torch.uint8)).view(cupy.bool_)  # no copy
        celement = cupy.asarray(element)
        threshold = radius * min(spacing)
        providers["cupy"] = (lambda: cndimage.binary_dilation(cmask, structure=celement), True)
        providers["cupy_edt"] = (
            lambda: cndimage.distance_transform_edt(~cmask, sampling=spacing) <= threshold,
            True,
        )
    if _backend.available("triton", mask):  # a GPU, or the interpreter in the dry run
        providers["fastcascade_triton"] = (
            lambda: dilate(mask, radius, spacing, backend="triton"),
            cuda,
        )
        providers["fastcascade_triton_labels"] = (
            lambda: dilate(labels, radius, spacing, backend="triton"),
            cuda,
        )
    return providers


def _to_host(out) -> np.ndarray:
    if isinstance(out, np.ndarray):
        return out
    if isinstance(out, torch.Tensor):
        return out.cpu().numpy()
    import cupy

    return cupy.asnumpy(out)


def _bench_case(rec, case, shape, radius, spacing, *, device, cuda, reps, warmup, peaks):
    labels_host = candidate_labels(shape)
    expected = ndimage.binary_dilation(labels_host > 0, structuring_element(radius, spacing))
    voxels = math.prod(shape)
    traffic = 2.0 * voxels  # bytes: the input read once, the output written once
    base = dict(
        op="dilate",
        case=case,
        shape=list(shape),
        shape_str="x".join(map(str, shape)),
        radius=radius,
        spacing=list(spacing),
        element_voxels=int(structuring_element(radius, spacing).sum()),
        foreground_fraction=float((labels_host > 0).mean()),
        device=str(device),
    )
    for name, (fn, on_gpu) in _providers(labels_host, radius, spacing, device, cuda).items():
        entry = dict(base, provider=name, dtype="uint8" if name.endswith("labels") else "bool")
        entry["device"] = "cpu" if name == "scipy" else str(device)
        # The interpreter runs kernels through many torch calls, which the counter would
        # intercept one by one (seconds): syncs are counted where kernels really run.
        interpreted = name.startswith("fastcascade") and _backend.interpreter_on()
        counter = contextlib.nullcontext() if interpreted else SyncCounter()
        with counter:
            out, err = _try(fn)  # the first call compiles (Triton's JIT, CuPy's kernels)
        if err is None:
            got = _to_host(out)
            entry["mismatches"] = int((got != expected).sum())
            entry["equal"] = entry["mismatches"] == 0
            entry["syncs"] = None if interpreted else counter.syncs
            slow = name == "scipy" and voxels > 4e6  # ~1-3 s per call
            n, warm = (3, 1) if slow else (reps, warmup)
            timing, err = _try(
                lambda fn=fn, g=on_gpu, n=n, w=warm: measure(fn, cuda=g, warmup=w, reps=n)
            )
            if timing:
                entry.update(timing)
                entry["gbps"] = traffic / (timing["median_ms"] * 1e-3) / 1e9
                if peaks and on_gpu:
                    entry["floor_ms"] = traffic / peaks["bw"] * 1e3
        if err:
            entry["error"] = err
        rec.add(**entry)


def run_dilate(args, rec) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cases = CPU_DRY_CASES if args.cpu else dict(CASES) | (GPU_CASES if cuda else {})
    reps, warmup = (1, 0) if args.cpu else ((5, 3) if args.quick else (10, 3))
    peaks = device_peaks(rec.data["meta"]["device"]) if cuda else None
    meta = rec.data["meta"]
    meta["timed_region"] = (
        "one call per rep after warm-up; CUDA events for GPU providers, wall clock for "
        "SciPy (host arrays, 1 thread, no transfers) and for every provider on a CPU; "
        "inputs resident, outputs allocated by each call; scipy at more than 4e6 voxels: "
        "3 reps after 1 warm-up"
    )
    meta["peaks"] = peaks
    meta["load_average_start"] = common.load_average()  # other work makes CPU times noisy
    meta["traffic_model"] = "2 bytes per voxel: the mask or labels read once, bool written once"
    meta["edt_element"] = {
        case: edt_element_check(radius, spacing) for case, (_, radius, spacing) in cases.items()
    }
    if not cuda and not args.cpu:
        meta["note"] = "no GPU: SciPy and the torch path on the CPU; Triton needs a GPU"
    for case, (shape, radius, spacing) in cases.items():
        print(f"{case}: {shape}, r = {radius}, spacing {spacing}")
        _bench_case(
            rec,
            case,
            shape,
            radius,
            spacing,
            device=device,
            cuda=cuda,
            reps=reps,
            warmup=warmup,
            peaks=peaks,
        )
    common.add_speedups(rec.data["results"], "scipy")
    meta["load_average_end"] = common.load_average()
    rec.flush()
    title = f"# Ball dilation (candidate map C2) on {meta['device']}\n\n"
    if args.cpu:
        title += "CPU dry run (Triton interpreter): proves the code paths, times mean nothing.\n\n"
    title += (
        "Mask: case A's phantom labels resampled to each shape; GB/s counts 2 bytes per "
        "voxel (input read, output written). `cupy_edt` is the EDT route "
        "(`distance_transform_edt(~m, sampling) <= r·min(s)`).\n\n"
    )
    checks = []
    for case, check in meta["edt_element"].items():
        routes = ", ".join(
            f"{k} {'same element' if v['same_element'] else 'DIFFERENT element'}"
            for k, v in check.items()
            if isinstance(v, dict)
        )
        checks.append(f"- {case}: EDT ball vs `structuring_element`: {routes}")
    title += "\n".join(checks) + "\n\n"
    load = meta["load_average_start"]
    if not cuda and "1min" in load:
        title += f"Load average at the start: {load['1min']:.1f} on {load['cores']} cores.\n\n"
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh."""
    keep = ("case", "provider", "median_ms", "gbps", "speedup_vs_best_baseline", "equal")
    return markdown_table(data["results"], [c for c in COLUMNS if c[1] in keep])
