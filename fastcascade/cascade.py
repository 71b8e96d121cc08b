"""The two stages, top to bottom like the paper's Fig. 3: C1 → stage 1 → C2 → stage 2.

Everything here runs on the device of the input volume (the working-grid image), the
body mask included (``ops/morphology.py``: SciPy for a CPU tensor, CuPy or PyTorch
labelling on a GPU), so no volume-sized tensor crosses to the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import AIR_HU, CascadeConfig, StageConfig
from .model import UNet3D
from .ops.dilate import dilate
from .ops.intensity import apply_window, window_value
from .ops.morphology import BACKENDS as MORPHOLOGY_BACKENDS
from .ops.morphology import body_mask
from .tiling import StageOutput, make_grid, overlap_step, run_stage


@dataclass(frozen=True)
class CascadeOptions:
    """How to run the cascade (not part of the model).

    ``overlap``: stage 2 on overlapping tiles (step ``overlap_step`` as fractions of the
    output tile per axis; the paper's 4x is ``(0.5, 0.5, 1.0)``) with ``weights``
    ``"constant"`` or ``"gaussian"``. ``skip_empty``: compute only tiles touching the
    candidate region (``False`` is the original's every-tile approach).
    ``memory_budget``: bytes the stitching accumulators may use (``None``: no limit);
    beyond it a stage stitches in slabs. ``body_mask_backend``: how C1's hole filling and
    component labelling run (:func:`~fastcascade.ops.morphology.body_mask`: ``"auto"``,
    ``"scipy"``, ``"cupy"`` or ``"torch"``; all give the same mask).
    """

    overlap: bool = True
    overlap_step: tuple[float, float, float] = (0.5, 0.5, 1.0)
    weights: str = "constant"
    skip_empty: bool = True
    batch_size: int = 2
    probabilities: bool = False
    memory_budget: int | None = None
    body_mask_backend: str = "auto"

    def __post_init__(self):
        if self.weights not in ("constant", "gaussian"):
            raise ValueError(f"weights must be 'constant' or 'gaussian', got {self.weights!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if any(not 0.0 < s <= 1.0 for s in self.overlap_step):
            raise ValueError(f"overlap_step fractions must be in (0, 1], got {self.overlap_step}")
        if self.body_mask_backend not in MORPHOLOGY_BACKENDS:
            raise ValueError(
                f"body_mask_backend must be one of {MORPHOLOGY_BACKENDS}, "
                f"got {self.body_mask_backend!r}"
            )


@dataclass
class CascadeOutput:
    """Both stages' outputs on the working grid; ``stage2.labels`` is the segmentation."""

    stage1: StageOutput
    stage2: StageOutput
    c1: torch.Tensor  # bool (X, Y, Z)
    c2: torch.Tensor  # bool (X, Y, Z)
    timings: dict[str, float] = field(default_factory=dict)


def _stage(
    network: UNet3D,
    image_hu: torch.Tensor,
    mask: torch.Tensor,
    stage: StageConfig,
    num_classes: int,
    options: CascadeOptions,
    *,
    overlap: bool,
    probabilities: bool,
    progress: Callable[[int, int], None] | None,
) -> StageOutput:
    """One stage over the tiles touching ``mask``; ``overlap`` uses the options' step
    and weights, otherwise non-overlapping tiles of constant weight."""
    out_size = network.output_size(stage.tile)
    step = overlap_step(out_size, options.overlap_step) if overlap else None
    grid = make_grid(tuple(image_hu.shape), stage.tile, out_size, step)
    with torch.inference_mode():
        return run_stage(
            network,
            apply_window(image_hu, stage.window),
            mask,
            grid,
            num_classes,
            pad_value=window_value(AIR_HU, stage.window),
            skip_empty=options.skip_empty,
            weight_mode=options.weights if overlap else "constant",
            batch_size=options.batch_size,
            probabilities=probabilities,
            memory_budget=options.memory_budget,
            progress=progress,
        )


def candidate_region(
    image_hu: torch.Tensor,
    stage1: UNet3D,
    config: CascadeConfig,
    options: CascadeOptions = CascadeOptions(),
    progress: Callable[[int, int], None] | None = None,
    lap: Callable[[str], None] = lambda name: None,
) -> tuple[torch.Tensor, StageOutput, torch.Tensor]:
    """C1 → stage 1 → C2 on the working grid: ``(c1, stage-1 output, c2)``.

    Stage 2's training regions come from here too, so that it learns on the candidate
    regions it will see at inference. ``lap(name)`` is called after each step (timing).
    """
    c1 = body_mask(image_hu, config.body_threshold, backend=options.body_mask_backend)
    lap("c1")
    first = _stage(
        stage1,
        image_hu,
        c1,
        config.stage1,
        config.num_classes,
        options,
        overlap=False,
        probabilities=False,
        progress=progress,
    )
    lap("stage1")
    c2 = dilate(first.labels > 0, config.radius, config.spacing)
    lap("c2")
    return c1, first, c2


def run_cascade(
    image_hu: torch.Tensor,
    stage1: UNet3D,
    stage2: UNet3D,
    config: CascadeConfig,
    options: CascadeOptions = CascadeOptions(),
    progress: Callable[[str, int, int], None] | None = None,
) -> CascadeOutput:
    """Segment ``image_hu`` (X, Y, Z) float32 HU on the working grid ``config.spacing``.

    Both networks must be in eval mode on ``image_hu``'s device.
    """

    def report(name):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    clock = _Clock(image_hu.device)
    c1, first, c2 = candidate_region(image_hu, stage1, config, options, report("stage1"), clock.lap)
    second = _stage(
        stage2,
        image_hu,
        c2,
        config.stage2,
        config.num_classes,
        options,
        overlap=options.overlap,
        probabilities=options.probabilities,
        progress=report("stage2"),
    )
    clock.lap("stage2")
    return CascadeOutput(first, second, c1, c2, clock.timings)


class _Clock:
    """Wall-clock laps; on a GPU each lap synchronises (one sync per lap, documented)."""

    def __init__(self, device: torch.device):
        self.device, self.timings = device, {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now
