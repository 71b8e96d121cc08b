"""Benchmark of the training warp (``fastcascade.ops.warp``) against PyTorch and SciPy.

Run through ``benchmarks/run.py --area warp`` (``benchmarks/gpu_check.sh --area kernels``
runs it). One warp is the paper's augmentation at its bounds: a rotation of up to 5° per
axis, a translation of up to 20 voxels, a cubic B-spline field from control points every
32 voxels displaced by up to 4 voxels; the image (one fp32 channel, HU) is resampled
trilinearly, the uint8 labels by nearest neighbour. Providers, timed in the same run on the
same inputs:

- ``torch_grid_sample``: the PyTorch pipeline peers write: the positions as
  ``affine_coordinates + displacement_field`` (an einsum of per-axis B-spline weights),
  normalised for ``F.grid_sample``, the image through ``grid_sample`` (trilinear, the fill
  by shifting), the labels through ``grid_sample(mode="nearest")`` on a float copy; all
  fp32. Its nearest rounds ties to even, ours half up: label mismatches are reported.
- ``torch_ref``: ``elastic_affine_warp(..., backend="torch")``, the reference and CPU
  path (the same positions, float64 interpolation so that integer positions are exact).
- ``scipy``: ``map_coordinates`` (order 1 image, order 0 labels, ``grid-constant``) on the
  host from the reference's positions, one CPU thread, positions not timed; full runs only.
- ``fastcascade_triton``: ``elastic_affine_warp(..., backend="triton")``, one kernel that
  computes the positions itself (8 warps of 2 voxels per thread); ``fastcascade_triton_w4``
  the same launched with 4 warps, to tell which launch shape to keep.
- ``fastcascade_triton_coords``: ``warp(..., backend="triton")`` from positions computed
  beforehand (not timed): the kernel's sampling alone.

Each provider is compared with ``torch_ref``: the largest image difference (HU) and the
count of differing labels. GB/s counts the image read and written once (4 + 4 bytes per
voxel) and the labels read and written once (1 + 1), plus 12 bytes per voxel of positions
read for ``fastcascade_triton_coords``; ``floor ms`` is that traffic at the device's peak
bandwidth. On a GPU: 256³ and the paper's tile 132×132×116 (not in ``--quick``); without a
GPU the torch and SciPy paths on 64³; ``--cpu`` is a dry run on a tiny volume with the
kernel in Triton's interpreter.
"""

from __future__ import annotations

import math

import common
import numpy as np
import torch
import torch.nn.functional as F
from bench_kernels import _try, device_peaks
from run import markdown_table, measure
from scipy.ndimage import map_coordinates

from fastcascade.ops import _backend
from fastcascade.ops import warp as warp_mod
from fastcascade.ops.warp import (
    affine_coordinates,
    control_grid_shape,
    displacement_field,
    elastic_affine_warp,
    warp,
)

AIR = -1024.0
SPACING = 32.0
#: name: shape (x, y, z)
GPU_CASES = {"256cube": (256, 256, 256), "paper-tile": (132, 132, 116)}
GPU_QUICK_CASES = {"256cube": (256, 256, 256)}
CPU_CASES = {"64cube": (64, 64, 64)}
CPU_DRY_CASES = {"dry-run": (6, 5, 7)}  # one program of the kernel: the interpreter is slow

COLUMNS = [
    ("case", "case", ""),
    ("shape", "shape_str", ""),
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20 ms", "p20_ms", ".3f"),
    ("p80 ms", "p80_ms", ".3f"),
    ("GB/s", "gbps", ".3g"),
    ("Gvoxel/s", "gvoxels", ".3g"),
    ("floor ms", "floor_ms", ".4f"),
    ("× torch pipeline", "speedup_vs_torch_grid_sample", ".2f"),
    ("× best baseline", "speedup_vs_best_baseline", ".2f"),
    ("max |Δ| HU", "max_abs_diff", ".3g"),
    ("labels ≠", "label_mismatches", "d"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("note", "error", ""),
]


def make_case(shape, device, seed=0):
    """A HU-like image (1, x, y, z) fp32 with smooth structure and noise, uint8 labels from
    thresholds of it, and the paper's augmentation drawn at its bounds."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    body = 1.0 - (x**2 + 1.3 * y**2 + 0.5 * z**2)
    image = 600.0 * body + 80.0 * torch.randn(shape, generator=g) - 300.0
    labels = torch.bucketize(image, torch.tensor([-200.0, 0.0, 150.0, 300.0])).to(torch.uint8)
    angles = tuple((torch.rand(3, generator=g) * 10.0 - 5.0).tolist())
    shift = tuple((torch.rand(3, generator=g) * 40.0 - 20.0).tolist())
    ctrl = torch.rand((3, *control_grid_shape(shape, SPACING)), generator=g) * 8.0 - 4.0
    return image[None].to(device), labels.to(device), angles, shift, ctrl.to(device)


def torch_grid_sample(image, labels, angles, shift, ctrl, fill=AIR):
    """The usual PyTorch warp: dense fp32 positions, then ``grid_sample`` twice."""
    shape = tuple(image.shape[1:])
    q = affine_coordinates(shape, angles, shift, device=image.device)
    q = q + displacement_field(shape, ctrl, SPACING)
    grid = torch.stack([(2.0 * q[a] + 1.0) / shape[a] - 1.0 for a in (2, 1, 0)], dim=-1)[None]
    out = F.grid_sample((image - fill)[None], grid, mode="bilinear", align_corners=False)[0]
    lab = F.grid_sample(
        labels[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[0, 0]
    return out + fill, lab.to(labels.dtype)


def _providers(case, *, cuda, quick, cpu):
    """provider → (function returning (image, labels), timed with CUDA events?)."""
    image, labels, angles, shift, ctrl = case
    args = (image, labels, angles, shift, ctrl, SPACING)
    providers = {
        "torch_grid_sample": (lambda: torch_grid_sample(image, labels, angles, shift, ctrl), cuda),
        "torch_ref": (lambda: elastic_affine_warp(*args, backend="torch"), cuda),
    }
    if cpu or not quick:
        coords = affine_coordinates(image.shape[1:], angles, shift)
        coords = (coords + displacement_field(image.shape[1:], ctrl.cpu(), SPACING)).numpy()
        img_host, lab_host = image[0].cpu().numpy(), labels.cpu().numpy()

        def scipy_warp():
            out = map_coordinates(img_host, coords, order=1, mode="grid-constant", cval=AIR)
            lab = map_coordinates(lab_host, coords, order=0, mode="grid-constant", cval=0)
            return out[None], lab

        providers["scipy"] = (scipy_warp, False)
    if _backend.available("triton", image):  # a GPU, or the interpreter in the dry run
        shape = tuple(image.shape[1:])
        affine = warp_mod._affine_params(shape, angles, shift, image.device)
        coords = affine_coordinates(shape, angles, shift, device=image.device)
        coords = coords + displacement_field(shape, ctrl, SPACING)
        providers["fastcascade_triton"] = (
            lambda: elastic_affine_warp(*args, backend="triton"),
            cuda,
        )
        providers["fastcascade_triton_w4"] = (
            lambda: warp_mod._warp_triton(
                image,
                labels,
                affine=affine,
                control_displacements=ctrl,
                grid_spacing=SPACING,
                fill_value=AIR,
                num_warps=4,
            ),
            cuda,
        )
        providers["fastcascade_triton_coords"] = (
            lambda: warp(image, labels, coords, backend="triton"),
            cuda,
        )
    return providers


def _agreement(got, want) -> dict:
    """Largest image difference and count of differing labels against ``want``."""
    img, lab = (torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t for t in got)
    ref_img, ref_lab = want
    img = img.to(ref_img.device, torch.float64)
    return {
        "max_abs_diff": float((img - ref_img.double()).abs().max()),
        "label_mismatches": int((lab.to(ref_lab.device) != ref_lab).sum()),
        "all_written": bool(torch.isfinite(img).all()),
    }


def _bench_case(rec, name, shape, *, device, cuda, quick, cpu, reps, warmup, peaks):
    case = make_case(shape, device)
    voxels = math.prod(shape)
    want = elastic_affine_warp(*case, SPACING, backend="torch")
    base = dict(
        op="elastic_affine_warp",
        case=name,
        shape=list(shape),
        shape_str="x".join(map(str, shape)),
        dtype="fp32 image, uint8 labels",
        grid_spacing=SPACING,
        angles_deg=list(case[2]),
        shift_vox=list(case[3]),
    )
    for provider, (fn, on_gpu) in _providers(case, cuda=cuda, quick=quick, cpu=cpu).items():
        entry = dict(base, provider=provider, device="cpu" if provider == "scipy" else str(device))
        out, err = _try(fn)  # the first call compiles the kernel
        if err is None:
            entry.update(_agreement(out, want))
            slow = provider == "scipy" and voxels > 4e6  # ~1.5 s per call at 256^3
            n, warm = (3, 1) if slow else (reps, warmup)
            timing, err = _try(
                lambda fn=fn, g=on_gpu, n=n, w=warm: measure(fn, cuda=g, warmup=w, reps=n)
            )
            if timing:
                traffic = voxels * (8.0 + 2.0 + (12.0 if provider.endswith("coords") else 0.0))
                entry.update(timing)
                entry["traffic_bytes"] = traffic
                entry["gbps"] = traffic / (timing["median_ms"] * 1e-3) / 1e9
                entry["gvoxels"] = voxels / (timing["median_ms"] * 1e-3) / 1e9
                if peaks and on_gpu:
                    entry["floor_ms"] = traffic / peaks["bw"] * 1e3
        if err:
            entry["error"] = err
        rec.add(**entry)


def run_warp(args, rec) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu:
        cases = CPU_DRY_CASES
    elif cuda:
        cases = GPU_QUICK_CASES if args.quick else GPU_CASES
    else:
        cases = CPU_CASES
    reps, warmup = (1, 0) if args.cpu else ((5, 2) if args.quick else (10, 3))
    peaks = device_peaks(rec.data["meta"]["device"]) if cuda else None
    meta = rec.data["meta"]
    meta["timed_region"] = (
        "one warp of image + labels per rep after warm-up, CUDA events on a GPU (wall clock "
        "for SciPy and on a CPU); inputs resident, outputs allocated by each call; "
        "positions computed inside the timed call except for fastcascade_triton_coords and "
        "scipy; scipy at more than 4e6 voxels: 3 reps after 1 warm-up"
    )
    meta["peaks"] = peaks
    meta["traffic_model"] = (
        "10 bytes per voxel: fp32 image read and written, uint8 labels read and written "
        "(+12 bytes of fp32 positions read for fastcascade_triton_coords)"
    )
    meta["load_average_start"] = common.load_average()
    if not cuda and not args.cpu:
        meta["note"] = "no GPU: the torch paths and SciPy on the CPU; Triton needs a GPU"
    for name, shape in cases.items():
        print(f"{name}: {shape}")
        _bench_case(
            rec,
            name,
            shape,
            device=device,
            cuda=cuda,
            quick=args.quick,
            cpu=args.cpu,
            reps=reps,
            warmup=warmup,
            peaks=peaks,
        )
    common.add_speedups(rec.data["results"], "torch_grid_sample")
    meta["load_average_end"] = common.load_average()
    rec.flush()
    title = f"# Elastic + rigid warp (training augmentation) on {meta['device']}\n\n"
    if args.cpu:
        title += "CPU dry run (Triton interpreter): proves the code paths, times mean nothing.\n\n"
    title += (
        "One fp32 image channel and uint8 labels, rotation ≤ 5°, translation ≤ 20 voxels, "
        "B-spline control points every 32 voxels displaced ≤ 4 voxels. Differences are "
        "against `torch_ref` (the reference, float64 interpolation).\n\n"
    )
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh."""
    keep = ("case", "provider", "median_ms", "gbps", "speedup_vs_torch_grid_sample")
    keep += ("max_abs_diff", "label_mismatches")
    return markdown_table(data["results"], [c for c in COLUMNS if c[1] in keep])
