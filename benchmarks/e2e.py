"""End-to-end benchmark: ``segment()`` on phantoms, on case A and on case A at 0.8 mm.

    python benchmarks/e2e.py --device cpu             # the full CPU run
    python benchmarks/e2e.py --quick                  # one phantom + case A, 1 repeat
    python benchmarks/e2e.py --device cuda --paper-net

Cases (``--cases``): ``phantom`` (two generated phantoms of the default size, 122x101x112
voxels at 3 mm, seeds never used for training), ``case_a`` (the real CT as it is,
122x101x112 at 3 mm), ``case_a_08mm`` (case A resampled trilinearly to 0.8 mm isotropic
in memory: 458x379x420 voxels, the size of a clinical scan; its reference labels follow
by nearest neighbour) and ``phantom_small`` (61x51x56 at 6 mm, for smoke tests).

Providers (``--providers``), all in the same run on the same inputs:

====================  ====================================================================
``fastcascade``       default options: empty tiles skipped, overlapping stage 2, fp32 (on
                      a GPU the fused conv-BN-ReLU kernels)
``every_tile``        the original's approach: every tile computed, non-overlapping stage
                      2, the body mask in SciPy on the host (``skip_empty=False,
                      overlap=False, body_mask_backend="scipy"``), same networks
``torch_best``        the best pure-PyTorch fast cascade: tiles skipped, overlap, the
                      networks with PyTorch's own conv/BN/ReLU (no fastcascade kernels),
                      channels-last, ``torch.compile``; bf16 autocast on a GPU, fp32 on
                      the CPU (bf16 conv3d is a slow path there). On the CPU fastcascade
                      itself is pure PyTorch, so this differs from it only by the compile.
``fastcascade_bf16``  GPU only: fastcascade in bf16 autocast, like for like with torch_best
====================  ====================================================================

Models: the embedded default model, or a random initialisation of its architecture
(``default_config(base_channels=6)``) while its weights do not exist yet (``--model``);
with ``--paper-net`` (GPU only) also the paper-size network (base 32, 4 levels, valid
convolutions, 132x132x116 tiles, 11 classes, 1.5 mm grid) with random weights.

Timed region: one ``Predictor.segment()`` call on an in-memory float32 HU volume with its
affine, returning NumPy labels on the input grid: upload, resampling to the working grid,
C1, stage 1, C2, stage 2, back to the input grid, download. Per-stage seconds are the
result's own ``timings`` (each lap synchronises on a GPU). For each case and provider:
one untimed warm-up run that also counts host syncs under ``SyncCounter`` (the dispatch
mode slows every op, so it never runs during a timed run), then ``--repeats`` timed runs
(medians). Compiled providers get one more plain warm-up first, so that recompiles for a
new tile-batch shape land in neither the counted nor the timed runs; the first of those
calls, minus the provider's median total on that case, is reported as compile time.

Output: ``<out>/e2e-<device-slug>-<YYYY-MM-DD>[-quick].json``, rewritten atomically after
every run, and a markdown table printed at the end and saved beside it as ``.md``.
A benchmark reports; it never asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Runnable from a checkout without installing the package.
sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    available_memory_bytes,
    environment,
    load_average,
    markdown_table,
    peak_memory_mb,
    reset_peak_memory,
    result_path,
    stats,
    uptime,
    write_atomic,
    write_json,
)
from torch import nn  # noqa: E402

from fastcascade.api import DEFAULT_MODEL, Predictor, resolve_device  # noqa: E402
from fastcascade.config import (  # noqa: E402
    CLASS_NAMES,
    Architecture,
    CascadeConfig,
)
from fastcascade.demo import case_a_reference  # noqa: E402
from fastcascade.diagnostics import SyncCounter  # noqa: E402
from fastcascade.evaluate import confusion_matrix, dice_from_confusion  # noqa: E402
from fastcascade.model import UNet3D  # noqa: E402
from fastcascade.model.checkpoint import load_cascade, model_paths  # noqa: E402
from fastcascade.model.unet3d import ConvBNReLU  # noqa: E402
from fastcascade.ops.morphology import resolve_backend as resolve_body_mask_backend  # noqa: E402
from fastcascade.ops.resample import resample, working_shape  # noqa: E402
from fastcascade.phantom import make_phantom  # noqa: E402
from fastcascade.presets import default_config, paper_config  # noqa: E402

CASES = ("phantom", "case_a", "case_a_08mm", "phantom_small")
DEFAULT_CASES = ("phantom", "case_a", "case_a_08mm")
PHANTOM_SEEDS = (9001, 9002)  # never used to train the default model
PROVIDERS = ("fastcascade", "every_tile", "torch_best", "fastcascade_bf16")
STEPS = ("load", "to_working_grid", "c1", "stage1", "c2", "stage2", "to_input_grid", "total")
SHIPPED_BASE_CHANNELS = 6  # the width of the default model, for the random stand-in
FINE_MM = 0.8
QUICK_COMPILE_BUDGET_S = 120.0


def data_dir() -> Path:
    """``$FASTCASCADE_DATA``, else ``../shared/data`` beside the repository root."""
    return Path(os.environ.get("FASTCASCADE_DATA", ROOT.parent / "shared" / "data"))


# -- cases -------------------------------------------------------------------------------
@dataclass
class Case:
    """One input scan: ``volume`` float32 HU ``(x, y, z)`` on the grid of ``affine``
    (4x4 voxel → RAS mm), ``reference`` uint8 ids of ``CLASS_NAMES`` on the same grid or
    ``None``."""

    name: str
    volume: np.ndarray
    affine: np.ndarray
    reference: np.ndarray | None
    description: str

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def resample_to_spacing(
    volume: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Trilinear resampling of ``volume`` (x, y, z) to about ``spacing_mm`` isotropic.

    Keeps the field of view (outer voxel edges), so the output has ``round(n·s/t)``
    voxels per axis with spacing ``n·s/m``; the affine is scaled accordingly. Returns
    ``(float32 volume, affine, shape)``; ``F.interpolate(trilinear, align_corners=False)``.

    >>> v, a, shape = resample_to_spacing(np.zeros((4, 4, 2), np.float32), np.eye(4), 0.5)
    >>> shape, float(a[0, 0]), float(a[0, 3])
    ((8, 8, 4), 0.5, -0.25)
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = working_shape(volume.shape, spacing, (spacing_mm,) * 3)
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    # Output voxel i sits at input voxel (i + 0.5)·n/m − 0.5 (edges kept).
    scale = np.array(volume.shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
    to_input = np.diag([*scale, 1.0])
    to_input[:3, 3] = 0.5 * scale - 0.5
    return out, affine @ to_input, shape


def _case_a(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ct_path = root / "ct" / "case_a" / "example_ct.nii.gz"
    seg_path = root / "ct" / "case_a" / "example_seg_fast_force_split.nii.gz"
    if not (ct_path.exists() and seg_path.exists()):
        raise FileNotFoundError(f"case A not found under {root} (set FASTCASCADE_DATA)")
    img = nib.load(str(ct_path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine, case_a_reference(seg_path)


def iter_cases(names: list[str], root: Path, quick: bool, notes: list[str]) -> Iterator[Case]:
    """Build the cases one at a time (the 0.8 mm one holds ~0.4 GB), in ``names`` order;
    a missing case A is skipped with a note."""
    for name in names:
        if name == "phantom":
            for seed in PHANTOM_SEEDS[: 1 if quick else None]:
                ph = make_phantom(seed=seed)
                yield Case(
                    f"phantom_{seed}",
                    ph.image,
                    ph.affine,
                    ph.labels,
                    f"phantom seed {seed}, default size at 3 mm",
                )
        elif name == "phantom_small":
            ph = make_phantom(shape=(61, 51, 56), spacing=(6.0, 6.0, 6.0), seed=PHANTOM_SEEDS[0])
            yield Case(
                "phantom_small",
                ph.image,
                ph.affine,
                ph.labels,
                f"phantom seed {PHANTOM_SEEDS[0]}, 61x51x56 at 6 mm",
            )
        elif name in ("case_a", "case_a_08mm"):
            try:
                volume, affine, reference = _case_a(root)
            except FileNotFoundError as err:
                notes.append(f"{name} skipped: {err}")
                print(f"skipping {name}: {err}", flush=True)
                continue
            if name == "case_a":
                yield Case(name, volume, affine, reference, "case A CT as it is (3 mm)")
                continue
            need = 6 * int(np.prod(working_shape(volume.shape, (3.0,) * 3, (FINE_MM,) * 3))) * 4
            free = available_memory_bytes()
            if free is not None and free < need:
                notes.append(
                    f"{name} skipped: needs about {need / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB available"
                )
                continue
            fine, fine_affine, shape = resample_to_spacing(volume, affine, FINE_MM)
            ref = resample(torch.from_numpy(reference), shape, mode="nearest").numpy()
            del volume
            yield Case(
                name,
                fine,
                fine_affine,
                ref,
                f"case A resampled trilinearly to {FINE_MM} mm (labels: nearest)",
            )
        else:
            raise ValueError(f"unknown case {name!r}; expected one of {CASES}")


# -- models ------------------------------------------------------------------------------
@dataclass
class Model:
    """A cascade to benchmark and how to name it in the results (``identity``)."""

    name: str
    config: CascadeConfig
    stage1: UNet3D
    stage2: UNet3D
    identity: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def random_model(config: CascadeConfig, seed: int, name: str, why: str) -> Model:
    """Both stages freshly initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    s1 = UNet3D.from_architecture(config.stage1.architecture)
    s2 = UNet3D.from_architecture(config.stage2.architecture)
    identity = {
        "weights": "random init",
        "seed": seed,
        "why": why,
        "architecture": asdict(config.stage1.architecture),
        "tile": list(config.stage1.tile),
        "spacing_mm": list(config.spacing),
        "parameters_per_stage": _params(s1),
    }
    return Model(name, config, s1, s2, identity)


def load_benchmark_model(spec: str, seed: int) -> Model:
    """``"auto"``: the embedded default model if its weights exist, else a random
    initialisation of its architecture (base width 6); ``"random"``; or a path."""
    if spec == "random" or (spec == "auto" and not DEFAULT_MODEL.exists()):
        why = (
            "asked for"
            if spec == "random"
            else f"no default weights at {DEFAULT_MODEL.relative_to(ROOT)} yet"
        )
        cfg = default_config(base_channels=SHIPPED_BASE_CHANNELS)
        return random_model(cfg, seed, "default_random", why)
    path = DEFAULT_MODEL if spec == "auto" else Path(spec)
    config, s1, s2 = load_cascade(path)
    weights, cfg_path = model_paths(path)
    try:
        shown = str(weights.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(weights)
    identity = {
        "weights": shown,
        "sha256": _sha256(weights),
        "config_sha256": _sha256(cfg_path),
        "architecture": asdict(config.stage1.architecture),
        "tile": list(config.stage1.tile),
        "spacing_mm": list(config.spacing),
        "parameters_per_stage": _params(s1),
    }
    return Model("default" if spec == "auto" else weights.stem, config, s1, s2, identity)


# -- providers ---------------------------------------------------------------------------
class TorchConvBNReLU(nn.Module):
    """A ``ConvBNReLU`` that always runs PyTorch's own conv, BatchNorm and ReLU (the model's
    block dispatches to fastcascade's fused kernel on a GPU); shares the parameters."""

    def __init__(self, block: ConvBNReLU):
        super().__init__()
        self.conv, self.bn = block.conv, block.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def torch_only(net: UNet3D) -> UNet3D:
    """A copy of ``net`` with every ``ConvBNReLU`` replaced by :class:`TorchConvBNReLU`.

    >>> net = torch_only(UNet3D(1, 2, 2, 2, "same"))
    >>> any(isinstance(m, ConvBNReLU) for m in net.modules())
    False
    """
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, ConvBNReLU):
                setattr(module, child_name, TorchConvBNReLU(child))
    return net


@dataclass
class Provider:
    name: str
    predictor: Predictor
    options: dict  # segment() keyword arguments
    compiled: bool
    description: str


def make_providers(
    model: Model, device: torch.device, names: list[str], batch_size: int = 2
) -> list[Provider]:
    """The providers in ``names`` order, each running tiles in batches of ``batch_size``;
    ``fastcascade`` and ``every_tile`` share one predictor (same networks), ``torch_best``
    holds compiled PyTorch-only copies."""
    gpu = device.type == "cuda"
    fast = Predictor(model.config, model.stage1, model.stage2, device=device)
    batch = {"batch_size": batch_size}
    every = {"skip_empty": False, "overlap": False, "body_mask_backend": "scipy", **batch}

    def torch_best() -> Provider:
        precision = "bf16" if gpu else "fp32"
        nets = torch_only(model.stage1), torch_only(model.stage2)
        pred = Predictor(model.config, *nets, device=device, precision=precision, compile=True)
        what = f"PyTorch only, tiles skipped, overlap, {precision}, channels-last, torch.compile"
        return Provider("torch_best", pred, batch, True, what)

    def fastcascade_bf16() -> Provider:
        if not gpu:
            raise ValueError("provider fastcascade_bf16 needs a GPU")
        pred = Predictor(model.config, model.stage1, model.stage2, device, precision="bf16")
        return Provider("fastcascade_bf16", pred, batch, False, "fastcascade in bf16 autocast")

    labelling = resolve_body_mask_backend("auto", torch.zeros(1, device=device))
    fused = f", fused kernels, body mask: {labelling}" if gpu else ""
    build = {
        "fastcascade": lambda: Provider(
            "fastcascade", fast, batch, False, f"tiles skipped, overlapping stage 2, fp32{fused}"
        ),
        "every_tile": lambda: Provider(
            "every_tile",
            fast,
            every,
            False,
            "every tile, non-overlapping stage 2, body mask in SciPy (original)",
        ),
        "torch_best": torch_best,
        "fastcascade_bf16": fastcascade_bf16,
    }
    unknown = [n for n in names if n not in build]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; expected some of {PROVIDERS}")
    return [build[n]() for n in names]


def compile_probe(arch: Architecture, tile: tuple[int, ...], batch: int, budget_s: float) -> dict:
    """Time ``torch.compile`` of one stage network on a batch of CPU tiles in a child
    process, stopped after ``budget_s`` seconds. Returns ``{"seconds", "within_budget"}``."""
    code = (
        "import sys, time, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from fastcascade.config import Architecture\n"
        "from fastcascade.model import UNet3D\n"
        f"net = UNet3D.from_architecture(Architecture(**{asdict(arch)!r})).eval()\n"
        "net = net.to(memory_format=torch.channels_last_3d)\n"
        f"x = torch.zeros({batch}, 1, *{tuple(tile)!r})\n"
        "with torch.inference_mode():\n"
        "    torch.compile(net)(x)\n"
    )
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = child.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and the compile workers it started
        child.wait()
        return {"seconds": time.perf_counter() - t0, "within_budget": False}
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:]
        return {"seconds": seconds, "within_budget": False, "error": " ".join(tail)}
    return {"seconds": seconds, "within_budget": True}


# -- one measurement ---------------------------------------------------------------------
def dice_slabs(pred: np.ndarray, ref: np.ndarray, num_classes: int, slab: int = 16) -> np.ndarray:
    """``fastcascade.evaluate.dice`` computed from confusion matrices summed over slabs of
    ``slab`` x-slices, so that a clinical-size label map needs no volume-sized int64
    temporaries (which would raise the process's peak memory that the CPU records show).

    >>> dice_slabs(np.array([[[0, 1, 1, 2]]]), np.array([[[0, 1, 2, 2]]]), 4).round(3).tolist()
    [1.0, 0.667, 0.667, nan]
    """
    return dice_from_confusion(
        sum(
            confusion_matrix(pred[i : i + slab], ref[i : i + slab], num_classes)
            for i in range(0, pred.shape[0], slab)
        )
    )


def _dice_summary(pred: np.ndarray, ref: np.ndarray, class_names) -> dict:
    scores = dice_slabs(pred, ref, len(class_names))
    fg = scores[1:]
    per_class = {
        n: (None if np.isnan(s) else round(float(s), 4))
        for n, s in zip(class_names[1:], fg, strict=True)
    }
    mean = float(np.nanmean(fg)) if np.isfinite(fg).any() else None
    return {"mean": mean, "per_class": per_class}


def measure(
    provider: Provider, case: Case, device: torch.device, repeats: int
) -> tuple[dict, np.ndarray]:
    """Warm up (counting host syncs), then time ``repeats`` runs; returns the record and
    the last run's labels."""

    def call():
        return provider.predictor.segment(case.volume, affine=case.affine, **provider.options)

    record = {"load_average_before": load_average()}
    if provider.compiled:
        t0 = time.perf_counter()
        call()
        record["warmup_s"] = time.perf_counter() - t0
    with SyncCounter() as counter:
        call()
    reset_peak_memory(device)
    runs = []
    for _ in range(repeats):
        runs.append(call())
    peak, peak_kind = peak_memory_mb(device)
    last = runs[-1]
    totals = [r.timings["total"] for r in runs]
    voxels = int(np.prod(case.volume.shape))
    record.update(
        {
            "timings_s": {k: stats([r.timings[k] for r in runs])["median"] for k in STEPS},
            "total_s": stats(totals),
            "voxels_per_s": voxels / stats(totals)["median"],
            "tiles": {
                stage: {"computed": c, "total": t, "skipped": t - c}
                for stage, (c, t) in last.tiles.items()
            },
            "c1_fraction": last.c1_fraction,
            "c2_fraction": last.c2_fraction,
            "host_syncs": counter.syncs,
            "host_syncs_by_op": dict(counter.by_op),
            "transfers": {
                "count": len(counter.transfers),
                "bytes": sum(b for _, _, b in counter.transfers),
            },
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
        }
    )
    return record, np.asarray(last.labels)


def compare(records: list[dict], labels: dict[str, np.ndarray], case: Case, class_names) -> None:
    """Fill in speedups of ``fastcascade``, agreement with ``every_tile`` and Dice against
    the case's reference labels, in place; called after each provider, it computes each
    record's Dice scores once."""
    by = {r["provider"]: r for r in records}
    base = labels.get("every_tile")
    for r in records:
        name = r["provider"]
        if base is not None and name != "every_tile" and "dice_vs_every_tile" not in r:
            r["dice_vs_every_tile"] = _dice_summary(labels[name], base, class_names)
        if case.reference is not None and "dice_vs_reference" not in r:
            r["dice_vs_reference"] = _dice_summary(labels[name], case.reference, class_names)
    fast = by.get("fastcascade")
    if fast is None:
        return
    for other in ("every_tile", "torch_best", "fastcascade_bf16"):
        if other in by:
            fast[f"speedup_vs_{other}"] = {
                k: by[other]["timings_s"][k] / fast["timings_s"][k]
                for k in ("stage1", "stage2", "total")
                if fast["timings_s"][k] > 0
            }


# -- report ------------------------------------------------------------------------------
def _f(x, digits=2, suffix=""):
    return None if x is None else f"{x:.{digits}f}{suffix}"


def table(report: dict) -> str:
    """The markdown summary of ``report``: header lines, then one row per record."""
    env = report["environment"]
    git = env["git"]
    v = env["versions"]
    commit = (git["commit"] or "unknown")[:10] + (" (uncommitted changes)" if git["dirty"] else "")
    lines = [
        f"# fastcascade end-to-end benchmark: {env['device']}",
        "",
        f"{report['started'][:16]} · commit {commit} · torch {v['torch']} · triton {v['triton']}"
        f" · numpy {v['numpy']} · python {v['python']}",
        f"Load average (1 min) at start {env['load_average_start'].get('1min', 0):.1f}, "
        f"at end {report.get('load_average_end', {}).get('1min', float('nan')):.1f} "
        f"on {env['load_average_start'].get('cores')} cores.",
    ]
    for name, ident in report["models"].items():
        weights = ident["weights"] + (
            f" (sha256 {ident['sha256'][:12]}…)"
            if "sha256" in ident
            else f" (seed {ident.get('seed')}, {ident.get('why')})"
        )
        arch = ident["architecture"]
        lines.append(
            f"Model `{name}`: {weights}; base {arch['base_channels']}, "
            f"{arch['levels']} levels, {arch['padding']}, tile {ident['tile']}, "
            f"{ident['spacing_mm'][0]} mm working grid."
        )
    for key, c in report.get("compile", {}).items():
        items = (f"{k} {_f(x, 1) if isinstance(x, float) else x}" for k, x in c.items())
        lines.append(f"Compile `{key}`: " + ", ".join(items))
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    lines += [
        "",
        "Seconds are medians of the timed runs; peak memory: "
        + (report["records"][0]["peak_memory_kind"] if report["records"] else "–")
        + ". × every-tile, × torch-best: fastcascade's total-time speedup (> 1: fastcascade"
        " faster). Dice: mean over the foreground classes present in either map.",
        "",
    ]
    header = [
        "model",
        "case",
        "provider",
        "load",
        "to grid",
        "C1",
        "stage 1",
        "C2",
        "stage 2",
        "to input",
        "total s",
        "tiles 1",
        "tiles 2",
        "C1 %",
        "C2 %",
        "syncs",
        "peak MiB",
        "× every-tile",
        "× torch-best",
        "Dice vs every-tile",
        "Dice vs ref",
    ]
    rows = []
    for r in report["records"]:
        t = r["timings_s"]
        tiles = r["tiles"]
        rows.append(
            [
                r["model"],
                r["case"],
                r["provider"],
                *(_f(t[k]) for k in STEPS),
                f"{tiles['stage1']['computed']}/{tiles['stage1']['total']}",
                f"{tiles['stage2']['computed']}/{tiles['stage2']['total']}",
                _f(100 * r["c1_fraction"], 1),
                _f(100 * r["c2_fraction"], 1),
                r["host_syncs"],
                _f(r["peak_memory_mb"], 0),
                _f(r.get("speedup_vs_every_tile", {}).get("total"), 2, "×"),
                _f(r.get("speedup_vs_torch_best", {}).get("total"), 2, "×"),
                _f((r.get("dice_vs_every_tile") or {}).get("mean"), 3),
                _f((r.get("dice_vs_reference") or {}).get("mean"), 3),
            ]
        )
    return "\n".join(lines) + "\n" + markdown_table(header, rows) + "\n"


# -- main --------------------------------------------------------------------------------
def _list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{what}: expected a comma-separated subset of {','.join(allowed)}, got {value!r}"
        )
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/e2e.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="one phantom + case A, 1 repeat; on the CPU torch_best only if a "
        "compile probe finishes within --compile-budget",
    )
    p.add_argument(
        "--cases",
        type=lambda v: _list(v, CASES, "--cases"),
        default=None,
        help=f"comma-separated, from {','.join(CASES)} (default: "
        f"{','.join(DEFAULT_CASES)}; --quick: phantom,case_a)",
    )
    p.add_argument(
        "--providers",
        type=lambda v: _list(v, PROVIDERS, "--providers"),
        default=None,
        help="comma-separated (default: fastcascade,every_tile,"
        "torch_best, plus fastcascade_bf16 on a GPU)",
    )
    p.add_argument(
        "--paper-net",
        action="store_true",
        help="also the paper-size network with random weights (GPU only)",
    )
    p.add_argument(
        "--model",
        default="auto",
        help="'auto' (the embedded default model, or a random init of its "
        "architecture while its weights do not exist), 'random', or a path",
    )
    p.add_argument("--batch-size", type=int, default=2, help="tiles per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisations")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per case and provider (default: 1 on the CPU, 3 on a GPU)",
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds a CPU compile probe may take before torch_best is skipped "
        f"(default with --quick: {QUICK_COMPILE_BUDGET_S:.0f}; else no probe)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the shared data folder (default: $FASTCASCADE_DATA or ../shared/data)",
    )
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.paper_net and device.type != "cuda":
        print("--paper-net needs a GPU (--device cuda)", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    repeats = args.repeats or (1 if args.quick or not gpu else 3)
    cases = args.cases or (["phantom", "case_a"] if args.quick else list(DEFAULT_CASES))
    providers = args.providers or (list(PROVIDERS) if gpu else list(PROVIDERS[:3]))
    if not gpu and "fastcascade_bf16" in providers:
        print("fastcascade_bf16 needs a GPU", file=sys.stderr)
        return 2
    budget = args.compile_budget
    if budget is None and args.quick and not gpu:
        budget = QUICK_COMPILE_BUDGET_S

    notes: list[str] = []
    if not gpu:
        notes.append(
            "CPU: fastcascade is pure PyTorch here, so torch_best differs only by "
            "torch.compile; it runs fp32 because bf16 conv3d is a slow path on CPUs."
        )
    models = [load_benchmark_model(args.model, args.seed)]
    if args.paper_net:
        models.append(
            random_model(
                paper_config(CLASS_NAMES),
                args.seed,
                "paper_net",
                "paper-size network, random weights",
            )
        )
    path = result_path(args.out, "e2e", device, "-quick" if args.quick else "")
    report = {
        "benchmark": "e2e",
        "started": datetime.now().isoformat(timespec="seconds"),
        "finished": None,
        "environment": environment(device),
        "options": {
            "quick": args.quick,
            "cases": cases,
            "providers": providers,
            "repeats": repeats,
            "batch_size": args.batch_size,
            "device": str(device),
        },
        "timed_region": "Predictor.segment() on an in-memory float32 HU volume + affine, to "
        "NumPy labels on the input grid; per-step seconds from its timings",
        "models": {m.name: m.identity for m in models},
        "compile": {},
        "notes": notes,
        "records": [],
    }
    write_json(path, report)
    print(f"writing {path}", flush=True)

    for model in models:
        names = list(providers)
        if "torch_best" in names and budget is not None:
            probe = compile_probe(
                model.config.stage1.architecture, model.config.stage1.tile, args.batch_size, budget
            )
            report["compile"][f"{model.name}/probe"] = {**probe, "budget_s": budget}
            if not probe["within_budget"]:
                names.remove("torch_best")
                notes.append(
                    f"torch_best skipped for {model.name}: compiling one stage took "
                    f"over {budget:.0f} s ({probe.get('error', 'budget exceeded')})"
                )
            write_json(path, report)
        provs = make_providers(model, device, names, args.batch_size)
        first_case = True
        for case in iter_cases(cases, args.data or data_dir(), args.quick, notes):
            case_records, labels = [], {}
            for prov in provs:
                print(
                    f"[{model.name}] {case.name} {tuple(case.volume.shape)}: {prov.name} …",
                    flush=True,
                )
                record, labels[prov.name] = measure(prov, case, device, repeats)
                record = {
                    "model": model.name,
                    "case": case.name,
                    "case_description": case.description,
                    "shape": list(case.volume.shape),
                    "spacing_mm": [round(s, 4) for s in case.spacing],
                    "provider": prov.name,
                    "provider_description": prov.description,
                    "options": prov.options,
                    "precision": prov.predictor.precision,
                    "compile": prov.compiled,
                    "repeats": repeats,
                    **record,
                }
                if prov.compiled and first_case:
                    report["compile"][f"{model.name}/{prov.name}"] = {
                        "case": case.name,
                        "first_call_s": record["warmup_s"],
                        "median_total_s": record["timings_s"]["total"],
                        "compile_s_estimate": record["warmup_s"] - record["timings_s"]["total"],
                        "note": "only what the on-disk Inductor cache did not already hold",
                    }
                t = record["timings_s"]
                print(
                    f"    total {t['total']:.2f} s (stage 1 {t['stage1']:.2f}, stage 2 "
                    f"{t['stage2']:.2f}); tiles {record['tiles']['stage1']['computed']}/"
                    f"{record['tiles']['stage1']['total']}, "
                    f"{record['tiles']['stage2']['computed']}/"
                    f"{record['tiles']['stage2']['total']}; syncs {record['host_syncs']}",
                    flush=True,
                )
                case_records.append(record)
                report["records"].append(record)
                compare(case_records, labels, case, model.config.class_names)
                write_json(path, report)
            first_case = False
            del labels

    report["finished"] = datetime.now().isoformat(timespec="seconds")
    report["load_average_end"] = load_average()
    report["uptime_end"] = uptime()
    write_json(path, report)
    text = table(report)
    write_atomic(path.with_suffix(".md"), text)
    print()
    print(text)
    print(f"results: {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
