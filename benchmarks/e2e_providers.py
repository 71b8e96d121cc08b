"""The cascades and the providers the end-to-end benchmark runs.

A ``Model`` is a cascade with the identity recorded for it (weights and their hash, or the
seed of a random initialisation); a ``Provider`` is one way of running it (a ``Predictor``
and the ``segment()`` options). ``make_providers`` builds them, ``torch_only`` gives the
PyTorch-only networks of ``torch_best`` and ``compile_probe`` times one ``torch.compile``
in a child process.
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT
from torch import nn

from fastcascade.api import DEFAULT_MODEL, Predictor
from fastcascade.config import Architecture, CascadeConfig
from fastcascade.model import UNet3D
from fastcascade.model.checkpoint import load_cascade, model_paths
from fastcascade.model.unet3d import ConvBNReLU
from fastcascade.ops.morphology import resolve_backend as resolve_body_mask_backend
from fastcascade.presets import default_config

PROVIDERS = (
    "fastcascade",
    "every_tile",
    "torch_best",
    "tiles_overlap",
    "slabs_single",
    "fastcascade_bf16",
)


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
    initialisation of its architecture (``presets.default_config()``); ``"random"``; or a path."""
    if spec == "random" or (spec == "auto" and not DEFAULT_MODEL.exists()):
        why = (
            "asked for"
            if spec == "random"
            else f"no default weights at {DEFAULT_MODEL.relative_to(ROOT)} yet"
        )
        cfg = default_config()  # the shipped model's recipe
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
    every = {
        "inference": "tiles",
        "skip_empty": False,
        "overlap": False,
        "body_mask_backend": "scipy",
        **batch,
    }

    def torch_best() -> Provider:
        precision = "bf16" if gpu else "fp32"
        nets = torch_only(model.stage1), torch_only(model.stage2)
        pred = Predictor(model.config, *nets, device=device, precision=precision, compile=True)
        what = f"PyTorch only, tiles skipped, overlap, {precision}, channels-last, torch.compile"
        return Provider("torch_best", pred, {"inference": "tiles", **batch}, True, what)

    def fastcascade_bf16() -> Provider:
        if not gpu:
            raise ValueError("provider fastcascade_bf16 needs a GPU")
        pred = Predictor(model.config, model.stage1, model.stage2, device, precision="bf16")
        return Provider("fastcascade_bf16", pred, batch, False, "fastcascade in bf16 autocast")

    labelling = resolve_body_mask_backend("auto", torch.zeros(1, device=device))
    fused = f", fused kernels, body mask: {labelling}" if gpu else ""
    build = {
        "fastcascade": lambda: Provider(
            "fastcascade", fast, batch, False, f"slabs, 4 phase passes in stage 2, fp32{fused}"
        ),
        "tiles_overlap": lambda: Provider(
            "tiles_overlap",
            fast,
            {"inference": "tiles", **batch},
            False,
            "model-sized tiles, empty ones skipped, overlapping stage 2 (like for like "
            "with fastcascade's slabs)",
        ),
        "slabs_single": lambda: Provider(
            "slabs_single",
            fast,
            {"overlap": False, **batch},
            False,
            "slabs, one pass per region in both stages (like for like with every_tile)",
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
