"""Network passes per stage: slabs against model-sized tiles, the paper's network.

Run through ``benchmarks/run.py --area passes``. One case (case A brought to the paper's
1.5 mm working grid; a phantom where case A is missing), the paper's U-Net (base 32,
four levels, valid convolutions, 132×132×116 → 44×44×28 tiles) with random weights, and
both stages as the cascade runs them (``fastcascade.passes.run_stage``):

- stage 1 over C1 (the body mask), non-overlapping;
- stage 2 over C2 taken from the *reference* labels dilated by r = 3 (random weights
  would give a meaningless C2), non-overlapping and with the 4x overlap.

Providers: ``tiles`` (the model's trained tile size, as the original runs) and
``slabs`` (network inputs as large as ``--memory-budget`` allows; the 4x overlap as four
pooling-phase passes). Each record gives the network passes, the output voxels computed
against those of the grid, and the convolution FLOPs of every pass (counted with
``torch.utils.flop_counter`` on the meta device, from the input shapes the network
actually received), next to the time.

Timed region: the stage's ``run_stage`` call (the network passes, the stitching, the
labels). On the CPU a tiles run of the paper network takes many minutes, so by default
only the first ``--sample-tiles`` tile passes run the network and the rest return at
once: the tiles' time is then the measured time per pass times the number of passes
(recorded as ``extrapolated``), their FLOPs exact. Slab runs always run in full.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcascade.config import AIR_HU, CLASS_NAMES
from fastcascade.io.scan import load_scan
from fastcascade.model import UNet3D
from fastcascade.ops.dilate import dilate
from fastcascade.ops.intensity import apply_window, window_value
from fastcascade.ops.morphology import body_mask
from fastcascade.options import InferenceOptions, resolve_memory_budget
from fastcascade.passes import run_stage
from fastcascade.phantom import make_phantom
from fastcascade.presets import CASE_A_TO_CLASSES, paper_config

import common  # isort: skip
from run import markdown_table  # isort: skip

COLUMNS = [
    ("stage", "stage", ""),
    ("provider", "provider", ""),
    ("passes", "passes", "d"),
    ("voxels computed / grid", "voxel_ratio", ".2f"),
    ("TFLOP", "tflop", ".2f"),
    ("seconds", "seconds", ".1f"),
    ("timed", "timed", ""),
    ("× vs tiles (time)", "speedup_time", ".2f"),
    ("× vs tiles (FLOP)", "speedup_flop", ".2f"),
]


class _CountingNet(torch.nn.Module):
    """Runs ``net`` on the first ``limit`` calls (``None``: all), returns zeros of the
    right shape after that, and records every call's input shape and time."""

    def __init__(self, net: UNet3D, limit: int | None):
        super().__init__()
        self.net, self.limit = net, limit
        self.architecture = net.architecture
        self.shapes: list[tuple[int, ...]] = []
        self.seconds: list[float] = []

    def output_size(self, size):
        return self.net.output_size(size)

    def valid_input_size(self, *args):
        return self.net.valid_input_size(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        if self.limit is not None and len(self.shapes) > self.limit:
            out = self.net.output_size(tuple(x.shape[2:]))
            return x.new_zeros((x.shape[0], self.net.architecture.num_classes, *out))
        t0 = time.perf_counter()
        y = self.net(x)
        self.seconds.append(time.perf_counter() - t0)
        return y


def conv_flops(net: UNet3D, shape: tuple[int, ...], cache: dict) -> int:
    """FLOPs of one forward pass on an input of ``shape`` (N, C, X, Y, Z), meta device."""
    if shape not in cache:
        meta = UNet3D.from_architecture(net.architecture).to("meta").eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            meta(torch.empty(shape, device="meta"))
        cache[shape] = int(counter.get_total_flops())
    return cache[shape]


def _case(root: Path, spacing) -> tuple[torch.Tensor, torch.Tensor, str]:
    ct = root / "ct" / "case_a" / "example_ct.nii.gz"
    seg = root / "ct" / "case_a" / "example_seg_fast_force_split.nii.gz"
    if ct.exists() and seg.exists():
        from fastcascade.io.nifti import map_labels, read_labels

        grid = load_scan(ct).working_grid(spacing)
        ref = map_labels(read_labels(seg), CASE_A_TO_CLASSES).astype(np.uint8)
        labels = grid.labels_from_input(torch.from_numpy(ref))
        return grid.image(), labels, f"case A at {spacing[0]} mm {grid.shape}"
    ph = make_phantom(seed=9001)
    grid = load_scan(torch.from_numpy(ph.image), spacing=ph.spacing).working_grid(spacing)
    labels = grid.labels_from_input(torch.from_numpy(ph.labels))
    return grid.image(), labels, f"phantom 9001 at {spacing[0]} mm {grid.shape} (no case A)"


def run_passes(args, rec) -> None:
    from e2e_cases import data_dir

    torch.manual_seed(0)
    config = paper_config(CLASS_NAMES)
    spacing = (12.0, 12.0, 12.0) if args.cpu else config.spacing
    image_hu, reference, what = _case(data_dir(), spacing)
    nets = [UNet3D.from_architecture(s.architecture).eval() for s in (config.stage1, config.stage2)]
    nets = [n.to(memory_format=torch.channels_last_3d) for n in nets]
    c1 = body_mask(image_hu, config.body_threshold)
    c2 = dilate(reference > 0, config.radius, spacing)
    budget = args.memory_budget
    budget = resolve_memory_budget(budget if budget == "auto" else int(budget * 2**30), "cpu")
    sample = 1 if args.cpu else args.sample_tiles
    rec.data["meta"].update(
        load_average_start=common.load_average(),
        case=what,
        network="paper U-Net (base 32, 4 levels, valid), random weights, fp32",
        c1_fraction=float(c1.float().mean()),
        c2_fraction=float(c2.float().mean()),
        c2_from="reference labels dilated by r = 3",
        memory_budget_gib=None if budget is None else budget / 2**30,
        memory_budget_from=args.memory_budget,
        sample_tiles=sample,
        timed_region="one run_stage call; tiles beyond the sample return zeros (time "
        "extrapolated per pass), slabs run in full",
    )
    flop_cache: dict = {}
    runs = [
        ("stage1", 0, c1, config.stage1, False),
        ("stage2", 1, c2, config.stage2, False),
        ("stage2_overlap", 1, c2, config.stage2, True),
    ]
    for stage, k, mask, stage_cfg, overlap in runs:
        image = apply_window(image_hu, stage_cfg.window)
        pad = window_value(AIR_HU, stage_cfg.window)
        base = {}
        for provider in ("tiles", "slabs"):
            limit = sample if provider == "tiles" else None
            net = _CountingNet(nets[k], limit)
            options = InferenceOptions(inference=provider, memory_budget=budget, batch_size=1)
            t0 = time.perf_counter()
            out = run_stage(
                net,
                image,
                mask,
                tile=stage_cfg.tile,
                num_classes=config.num_classes,
                pad_value=pad,
                options=options,
                overlap=overlap,
                probabilities=False,
            )
            wall = time.perf_counter() - t0
            flops = sum(conv_flops(nets[k], s, flop_cache) for s in net.shapes)
            extrapolated = limit is not None and len(net.shapes) > limit
            if extrapolated:
                per_pass = sum(net.seconds) / len(net.seconds)
                seconds = wall - sum(net.seconds) + per_pass * len(net.shapes)
            else:
                seconds = wall
            record = rec.add(
                op=stage,
                stage=stage,
                provider=provider,
                shape=list(image.shape),
                dtype="float32",
                passes=out.passes,
                input_shapes=sorted({str(list(s[2:])) for s in net.shapes}),
                voxels_computed=out.voxels_computed,
                voxels_grid=out.voxels_grid,
                voxel_ratio=out.voxels_computed / out.voxels_grid,
                tflop=flops / 1e12,
                seconds=seconds,
                median_ms=seconds * 1e3,
                timed="extrapolated" if extrapolated else "measured",
                measured_passes=len(net.seconds),
            )
            base.setdefault("seconds", record["seconds"])
            base.setdefault("tflop", record["tflop"])
            record["speedup_time"] = base["seconds"] / record["seconds"]
            record["speedup_flop"] = base["tflop"] / max(record["tflop"], 1e-12)
            rec.flush()
    _add_totals(rec)
    rec.data["meta"]["load_average_end"] = common.load_average()
    rec.flush()
    load = [
        rec.data["meta"][f"load_average_{t}"].get("1min", float("nan")) for t in ("start", "end")
    ]
    budget_text = (
        "no memory budget" if budget is None else f"memory budget {budget / 2**30:.1f} GiB"
    )
    title = f"# Network passes per stage on {rec.data['meta']['device']}\n\n"
    title += f"{what}; {rec.data['meta']['network']}; C2 from the reference dilated by r = 3; "
    title += f"{budget_text} ({args.memory_budget}); tiles timed on {sample} pass(es) each and "
    title += f"extrapolated; load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the "
    title += "end. FLOPs are exact (every pass counted); the time ratios depend on the load. "
    title += f"Allocator: {rec.data['meta']['allocator']}.\n"
    if args.cpu:
        title += "\nCPU dry run on a coarse grid: proves the code paths, times mean nothing.\n"
    title += "\n"
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def _add_totals(rec) -> None:
    """Both stages of the cascade together, per provider: without and with the overlap."""
    by = {(r["stage"], r["provider"]): r for r in rec.data["results"] if "+" not in r["stage"]}
    for second in ("stage2", "stage2_overlap"):
        base = None
        for provider in ("tiles", "slabs"):
            parts = [by.get(("stage1", provider)), by.get((second, provider))]
            if None in parts:
                return
            total = {k: parts[0][k] + parts[1][k] for k in ("passes", "tflop", "seconds")}
            base = base or total
            rec.add(
                op=f"stage1+{second}",
                stage=f"stage1+{second}",
                provider=provider,
                **total,
                median_ms=total["seconds"] * 1e3,
                timed=" + ".join(p["timed"] for p in parts),
                speedup_time=base["seconds"] / total["seconds"],
                speedup_flop=base["tflop"] / max(total["tflop"], 1e-12),
            )


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh."""
    return markdown_table(data["results"], COLUMNS)
