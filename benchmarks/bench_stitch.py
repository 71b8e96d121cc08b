"""Benchmark of stitching (``fastcascade.ops.stitch``): accumulating network outputs into
the overlap-averaged probability volume, and finalising it into labels.

Run through ``benchmarks/run.py --area stitch`` (``benchmarks/gpu_check.sh --area
kernels`` runs it after the dilation benchmark). Three ops, every provider timed in the
same run on the same data:

- ``accumulate``: a batch of tiles (softmax outputs of 8 classes, float32) with a Gaussian
  weight into a float32 accumulator, as tile inference does. On a GPU the goal's size:
  **2,178 tiles of 44×44×28 into 8×256³** (11×11×18 origins spread over the volume, 3.8 GB
  of tile data). Providers: ``loop`` (``accumulate_ref``: a slice-add per tile, as MONAI
  and nnU-Net stitch), ``index_add`` (``accumulate(backend="torch")``: one
  ``index_add_`` per tensor over flat indices) and ``fastcascade_triton``
  (``accumulate(backend="triton")``: one launch, atomic adds). Timed region: one call
  adding the whole batch (resident on the device) into a resident accumulator.
- ``finalize``: that accumulator into uint8 labels, with a candidate mask, labels only
  (``finalize-labels``) or probabilities too (``finalize-probs``). Providers: ``argmax``
  (``acc.argmax(0)`` alone, no mask, no background: a floor for PyTorch), ``torch``
  (``finalize(backend="torch")``) and ``fastcascade_triton`` (the fused kernel).
- ``passes-4``: what slab inference does per region (``fastcascade.passes``): four
  phase-shifted passes (each a ``(C, X, Y, Z)`` output covering the whole region) added
  with their weights, then finalised into labels within the mask. On a GPU
  8×256×256×150 (the half-resolution grid of a 512×512×300 CT). Providers:
  ``torch_addcmul`` (what ``passes.py`` does: ``acc.addcmul_``, ``weight_sum += w``,
  ``finalize``), ``index_add`` (``accumulate(backend="torch")`` per pass, then
  ``finalize(backend="torch")``) and ``fastcascade_triton`` (one accumulate launch per
  pass, then the fused finalize). Timed region: allocating the zeroed accumulators, the
  four additions and the labels.

Agreement: each provider's accumulator is finalised and compared with the baseline's
(``loop``, ``torch``, ``torch_addcmul``): the largest probability difference, the label
mismatches, and how many voxels have a top-two probability margin below ``EPS`` in the
baseline, where atomics' order may flip a label (``mismatches_beyond_eps`` must be 0).

GB/s: for ``accumulate`` the tile data read (B·C·x·y·z·4 bytes), whose time at the
device's peak bandwidth is ``floor ms``; for ``finalize`` the accumulator read once;
for ``passes-4`` the four outputs read once. Without a GPU the benchmark runs the PyTorch
providers on the CPU at a small size (Triton needs a GPU); ``--cpu`` is a dry run on a
tiny volume that runs the Triton kernels in the interpreter (times mean nothing).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import common
import torch
from bench_kernels import _try, device_peaks
from run import markdown_table, measure

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend
from fastcascade.ops.stitch import accumulate, accumulate_ref, finalize, tile_weight

CLASSES = 8
#: Top-two probability margin below which a label may differ between adding orders.
EPS = 1e-5

#: name: (accumulator spatial shape, tile size, tile counts per axis), for accumulate
#: and finalize; name: region shape, for the four passes.
GPU_CASES = {"goal-2178-tiles": ((256, 256, 256), (44, 44, 28), (11, 11, 18))}
GPU_PASSES = {"half-res-region": (256, 256, 150)}
CPU_CASES = {"cpu-27-tiles": ((96, 96, 64), (44, 44, 28), (3, 3, 3))}
CPU_PASSES = {"cpu-region": (64, 64, 48)}
DRY_CASES = {"dry-run": ((12, 11, 9), (5, 4, 3), (3, 3, 3))}
DRY_PASSES = {"dry-run": (7, 6, 5)}

COLUMNS = [
    ("op", "op", ""),
    ("case", "case", ""),
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20 ms", "p20_ms", ".3f"),
    ("p80 ms", "p80_ms", ".3f"),
    ("GB/s", "gbps", ".3g"),
    ("floor ms", "floor_ms", ".3f"),
    ("× baseline", "speedup_vs_baseline", ".2f"),
    ("× best baseline", "speedup_vs_best_baseline", ".2f"),
    ("max |Δp|", "max_abs_diff", ".2e"),
    ("label mismatches", "label_mismatches", "d"),
    ("margin < EPS", "near_ties", "d"),
    ("mismatches beyond EPS", "mismatches_beyond_eps", "d"),
    ("syncs", "syncs", "d"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("note", "error", ""),
]

#: The provider each op's others are compared with (agreement and "× baseline").
BASELINES = {
    "accumulate": "loop",
    "finalize-labels": "torch",
    "finalize-probs": "torch",
    "passes-4": "torch_addcmul",
}


def spread_origins(spatial, tile, counts) -> torch.Tensor:
    """``counts`` origins per axis spread evenly from 0 to ``n - t`` (tiles touch both
    borders and overlap), as a ``(prod(counts), 3)`` int64 tensor."""
    axes = [
        [round(i * (n - t) / max(k - 1, 1)) for i in range(k)]
        for n, t, k in zip(spatial, tile, counts, strict=True)
    ]
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int64)


def random_probabilities(shape, device, seed) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(shape, generator=g, device=device).mul_(3.0)
    return torch.softmax(out, dim=-4)


def candidate_mask(spatial, device) -> torch.Tensor:
    """An ellipsoid filling about half the volume: a candidate map's shape."""
    axes = [(torch.arange(n, device=device) + 0.5) / n - 0.5 for n in spatial]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    return (x**2 + y**2 + z**2) < 0.24


def _margin_and_labels(acc, ws):
    probs, labels = finalize(acc, ws, backend="torch")
    top = probs.topk(2, dim=0).values
    return probs, labels, top[0] - top[1]


def _agreement(entry, probs, labels, ref) -> None:
    ref_probs, ref_labels, margin = ref
    differ = labels != ref_labels
    entry["max_abs_diff"] = float((probs - ref_probs).abs().max()) if probs is not None else None
    entry["label_mismatches"] = int(differ.sum())
    near = margin < EPS
    entry["near_ties"] = int(near.sum())
    entry["mismatches_beyond_eps"] = int((differ & ~near).sum())


def _interpreted(provider: str) -> bool:
    return provider.startswith("fastcascade") and _backend.interpreter_on()


def _record(rec, entry, fn, *, cuda, reps, warmup, traffic, peaks) -> None:
    timing, err = _try(lambda: measure(fn, cuda=cuda, warmup=warmup, reps=reps))
    if timing:
        entry.update(timing)
        entry["gbps"] = traffic / (timing["median_ms"] * 1e-3) / 1e9
        if peaks:
            entry["floor_ms"] = traffic / peaks["bw"] * 1e3
    if err:
        entry["error"] = err
    rec.add(**entry)


def _bench_tiles(rec, case, spec, *, device, cuda, reps, warmup, peaks, triton_ok) -> None:
    spatial, tile, counts = spec
    origins = spread_origins(spatial, tile, counts).to(device)
    num = origins.shape[0]
    tiles = random_probabilities((num, CLASSES, *tile), device, seed=0)
    weight = tile_weight(tile, "gaussian", device=device)
    tile_bytes = tiles.numel() * tiles.element_size()
    base = dict(
        op="accumulate",
        case=case,
        shape=[CLASSES, *spatial],
        tile=list(tile),
        tiles=num,
        dtype="fp32",
        weight="gaussian",
        device=str(device),
    )
    providers = {
        "loop": accumulate_ref,
        "index_add": lambda *a: accumulate(*a, backend="torch"),
    }
    if triton_ok:
        providers["fastcascade_triton"] = lambda *a: accumulate(*a, backend="triton")
    ref = None
    filled = None
    for name, add in providers.items():
        entry = dict(base, provider=name)
        acc = torch.zeros(CLASSES, *spatial, device=device)
        ws = torch.zeros(spatial, device=device)
        counter = contextlib.nullcontext() if _interpreted(name) else SyncCounter()
        with counter:
            _, err = _try(lambda add=add, acc=acc, ws=ws: add(acc, ws, tiles, origins, weight))
        if err:
            rec.add(**entry, error=err)
            continue
        entry["syncs"] = None if _interpreted(name) else counter.syncs
        if ref is None:
            ref = _margin_and_labels(acc, ws)
            filled = (acc.clone(), ws.clone())  # what the finalize ops start from
        probs, labels = finalize(acc, ws, backend="torch")
        _agreement(entry, probs, labels, ref)
        del probs, labels
        _record(
            rec,
            entry,
            lambda add=add, acc=acc, ws=ws: add(acc, ws, tiles, origins, weight),
            cuda=cuda,
            reps=reps,
            warmup=warmup,
            traffic=tile_bytes,
            peaks=peaks,
        )
    if filled is not None:
        _bench_finalize(rec, case, filled, ref, device=device, cuda=cuda, reps=reps,
                        warmup=warmup, peaks=peaks, triton_ok=triton_ok)  # fmt: skip


def _bench_finalize(rec, case, filled, ref, *, device, cuda, reps, warmup, peaks, triton_ok):
    acc, ws = filled
    spatial = tuple(ws.shape)
    mask = candidate_mask(spatial, device)
    ref_probs, ref_labels, margin = ref
    masked_ref = (
        torch.where(mask, ref_probs, torch.eye(CLASSES, device=device)[:, :1, None, None]),
        torch.where(mask, ref_labels, 0),
        margin,
    )
    traffic = acc.numel() * acc.element_size()
    for op, probabilities in (("finalize-labels", False), ("finalize-probs", True)):
        base = dict(op=op, case=case, shape=list(acc.shape), dtype="fp32", device=str(device))
        providers = {"torch": "torch"}
        if not probabilities:
            providers = {"argmax": None, **providers}
        if triton_ok:
            providers["fastcascade_triton"] = "triton"
        for name, backend in providers.items():
            entry = dict(base, provider=name, mask_fraction=float(mask.float().mean()))
            if backend is None:
                fn = lambda: acc.argmax(0)  # noqa: E731 - the PyTorch floor, no mask
            else:
                fn = lambda b=backend, p=probabilities: finalize(  # noqa: E731
                    acc, ws, mask=mask, probabilities=p, backend=b
                )
            counter = contextlib.nullcontext() if _interpreted(name) else SyncCounter()
            with counter:
                out, err = _try(fn)
            if err:
                rec.add(**entry, error=err)
                continue
            entry["syncs"] = None if _interpreted(name) else counter.syncs
            if backend is not None:
                _agreement(entry, out[0], out[1], masked_ref)
            del out
            _record(rec, entry, fn, cuda=cuda, reps=reps, warmup=warmup, traffic=traffic,
                    peaks=peaks)  # fmt: skip


def _bench_passes(rec, case, spatial, *, device, cuda, reps, warmup, peaks, triton_ok):
    outputs = [random_probabilities((CLASSES, *spatial), device, seed=s) for s in range(4)]
    weights = [tile_weight(spatial, "gaussian", device=device)] * 4
    mask = candidate_mask(spatial, device)
    zero = torch.zeros(1, 3, dtype=torch.int64, device=device)

    def run(add, backend):
        acc = torch.zeros((CLASSES, *spatial), device=device)
        ws = torch.zeros(spatial, device=device)
        for out, w in zip(outputs, weights, strict=True):
            add(acc, ws, out, w)
        return acc, ws, finalize(acc, ws, mask=mask, probabilities=False, backend=backend)[1]

    def addcmul(acc, ws, out, w):  # fastcascade/passes.py, _run_region
        acc.addcmul_(out, w)
        ws += w

    providers = {
        "torch_addcmul": lambda: run(addcmul, "torch"),
        "index_add": lambda: run(
            lambda a, s, o, w: accumulate(a, s, o[None], zero, w, backend="torch"), "torch"
        ),
    }
    if triton_ok:
        providers["fastcascade_triton"] = lambda: run(
            lambda a, s, o, w: accumulate(a, s, o[None], zero, w, backend="triton"), "triton"
        )
    base = dict(
        op="passes-4",
        case=case,
        shape=[CLASSES, *spatial],
        passes=4,
        dtype="fp32",
        weight="gaussian",
        mask_fraction=float(mask.float().mean()),
        device=str(device),
    )
    traffic = 4 * outputs[0].numel() * outputs[0].element_size()
    ref = None
    for name, fn in providers.items():
        entry = dict(base, provider=name)
        counter = contextlib.nullcontext() if _interpreted(name) else SyncCounter()
        with counter:
            out, err = _try(fn)
        if err:
            rec.add(**entry, error=err)
            continue
        entry["syncs"] = None if _interpreted(name) else counter.syncs
        acc, ws, labels = out
        if ref is None:
            probs, ref_labels, margin = _margin_and_labels(acc, ws)
            ref = (probs, torch.where(mask, ref_labels, 0), margin)
        _agreement(entry, None, labels, ref)
        del out, acc, ws, labels
        _record(rec, entry, fn, cuda=cuda, reps=reps, warmup=warmup, traffic=traffic,
                peaks=peaks)  # fmt: skip


def _speedups(rows: list[dict]) -> None:
    for op in {r["op"] for r in rows}:
        # argmax alone does less than the op (no mask, no background): not a baseline
        common.add_speedups(
            [r for r in rows if r["op"] == op],
            BASELINES[op],
            column="speedup_vs_baseline",
            not_baselines=("argmax",),
        )


def run_stitch(args, rec) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu:
        cases, passes = DRY_CASES, DRY_PASSES
    else:
        cases, passes = (GPU_CASES, GPU_PASSES) if cuda else (CPU_CASES, CPU_PASSES)
    reps, warmup = (1, 0) if args.cpu else ((5, 2) if args.quick else (10, 3))
    peaks = device_peaks(rec.data["meta"]["device"]) if cuda else None
    triton_ok = _backend.available("triton", torch.zeros(1, device=device))
    meta = rec.data["meta"]
    meta["timed_region"] = (
        "accumulate: one call adding the whole batch of resident tiles into a resident "
        "accumulator; finalize: one call on the filled accumulator (outputs allocated by "
        "it); passes-4: zeroed accumulators, four weighted additions and the labels. CUDA "
        "events after a warm-up on a GPU, wall clock on a CPU"
    )
    meta["traffic_model"] = (
        "accumulate: tile data read once (B·C·x·y·z·4 B); finalize: the accumulator read "
        "once; passes-4: the four outputs read once"
    )
    meta["eps"] = EPS
    meta["peaks"] = peaks
    meta["load_average_start"] = common.load_average()
    if not cuda and not args.cpu:
        meta["note"] = "no GPU: the PyTorch providers on the CPU at a small size"
    kwargs = dict(device=device, cuda=cuda, reps=reps, warmup=warmup, peaks=peaks,
                  triton_ok=triton_ok)  # fmt: skip
    for case, spec in cases.items():
        spatial, tile, counts = spec
        print(f"{case}: {math.prod(counts)} tiles of {tile} into {CLASSES}x{spatial}")
        _bench_tiles(rec, case, spec, **kwargs)
        if cuda:
            torch.cuda.empty_cache()
    for case, spatial in passes.items():
        print(f"{case}: 4 passes over {CLASSES}x{spatial}")
        _bench_passes(rec, case, spatial, **kwargs)
    _speedups(rec.data["results"])
    meta["load_average_end"] = common.load_average()
    rec.flush()
    title = f"# Stitching on {meta['device']}\n\n"
    if args.cpu:
        title += "CPU dry run (Triton interpreter): proves the code paths, times mean nothing.\n\n"
    title += (
        f"{CLASSES} classes, float32, Gaussian weights. GB/s counts the data read once "
        f"(tiles, accumulator or pass outputs); `margin < EPS` counts the baseline's voxels "
        f"whose top-two probabilities are within EPS = {EPS:g}.\n\n"
    )
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh."""
    keep = ("op", "case", "provider", "median_ms", "gbps", "speedup_vs_baseline",
            "mismatches_beyond_eps")  # fmt: skip
    return markdown_table(data["results"], [c for c in COLUMNS if c[1] in keep])
