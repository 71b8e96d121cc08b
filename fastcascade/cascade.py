"""The two stages, top to bottom like the paper's Fig. 3: C1 → stage 1 → C2 → stage 2.

:func:`segment_scan` is the whole route of a scan: onto the model's working grid (the one
upload), :func:`run_cascade` there, back onto the scan's own grid (the one download when
the caller wants host arrays). Everything between the two transfers runs on one device,
the body mask included (``ops/morphology.py``: SciPy for a CPU tensor, CuPy or PyTorch
labelling on a GPU). The cascade owns the timing of every step (``diagnostics.Clock``)
and the scalar reads it makes for the result (the C1 and C2 fractions).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import AIR_HU, CascadeConfig, StageConfig
from .diagnostics import Clock
from .io.scan import Scan
from .model import UNet3D
from .ops.dilate import dilate
from .ops.intensity import apply_window, window_value
from .ops.morphology import body_mask
from .options import InferenceOptions
from .passes import StageOutput, run_stage

#: The former name of :class:`~fastcascade.options.InferenceOptions`, kept for old code.
CascadeOptions = InferenceOptions


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
    options: InferenceOptions,
    *,
    overlap: bool,
    probabilities: bool,
    progress: Callable[[int, int], None] | None,
) -> StageOutput:
    """One stage over ``mask``: the stage's window, then the network passes the options
    choose (:func:`fastcascade.passes.run_stage`: slabs or tiles, 4x overlap or not)."""
    return run_stage(
        network,
        apply_window(image_hu, stage.window),
        mask,
        tile=stage.tile,
        num_classes=num_classes,
        pad_value=window_value(AIR_HU, stage.window),
        options=options,
        overlap=overlap,
        probabilities=probabilities,
        progress=progress,
    )


def candidate_region(
    image_hu: torch.Tensor,
    stage1: UNet3D,
    config: CascadeConfig,
    options: InferenceOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock: Clock | None = None,
) -> tuple[torch.Tensor, StageOutput, torch.Tensor]:
    """C1 → stage 1 → C2 on the working grid: ``(c1, stage-1 output, c2)``.

    Stage 2's training regions come from here too, so that it learns on the candidate
    regions it will see at inference. ``clock`` times each step.
    """
    options = InferenceOptions() if options is None else options
    clock = Clock(image_hu.device) if clock is None else clock
    c1 = body_mask(image_hu, config.body_threshold, backend=options.body_mask_backend)
    clock.lap("c1")
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
    clock.lap("stage1")
    c2 = dilate(first.labels > 0, config.radius, config.spacing)
    clock.lap("c2")
    return c1, first, c2


def second_stage(
    image_hu: torch.Tensor,
    stage2: UNet3D,
    c2: torch.Tensor,
    config: CascadeConfig,
    options: InferenceOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutput:
    """Stage 2 over the candidate region ``c2`` (bool (X, Y, Z), from
    :func:`candidate_region`) of ``image_hu`` on the working grid, on overlapping tiles
    when ``options.overlap``.

    Apart from :func:`run_cascade`, evaluation calls it twice on one stage 1, with and
    without overlap.
    """
    options = InferenceOptions() if options is None else options
    return _stage(
        stage2,
        image_hu,
        c2,
        config.stage2,
        config.num_classes,
        options,
        overlap=options.overlap,
        probabilities=options.probabilities,
        progress=progress,
    )


def run_cascade(
    image_hu: torch.Tensor,
    stage1: UNet3D,
    stage2: UNet3D,
    config: CascadeConfig,
    options: InferenceOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    clock: Clock | None = None,
) -> CascadeOutput:
    """Segment ``image_hu`` (X, Y, Z) float32 HU on the working grid ``config.spacing``.

    Both networks must be in eval mode on ``image_hu``'s device; ``options.precision`` is
    applied by the caller (:func:`segment_scan` autocasts).
    """

    def report(name):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    options = InferenceOptions() if options is None else options
    clock = Clock(image_hu.device) if clock is None else clock
    c1, first, c2 = candidate_region(image_hu, stage1, config, options, report("stage1"), clock)
    second = second_stage(image_hu, stage2, c2, config, options, report("stage2"))
    clock.lap("stage2")
    return CascadeOutput(first, second, c1, c2, clock.timings)


@dataclass
class ScanOutput:
    """A cascade's result on the scan's own grid.

    ``labels``: uint8 ``(i, j, k)`` in the input's orientation, ``probabilities``: float32
    ``(C, i, j, k)`` when asked for; NumPy arrays when ``to_host``, else tensors on the
    cascade's device. ``c1_fraction`` / ``c2_fraction``: the share of working-grid voxels
    in C1 and C2. ``tiles[stage] = (computed, total)``; ``passes[stage]``: the stage's
    :meth:`~fastcascade.tiling.StageOutput.report` (passes, voxels computed against the
    grid's, memory budget); ``timings`` in seconds per step.
    """

    labels: np.ndarray | torch.Tensor
    probabilities: np.ndarray | torch.Tensor | None
    c1_fraction: float
    c2_fraction: float
    tiles: dict[str, tuple[int, int]]
    timings: dict[str, float]
    passes: dict[str, dict] = field(default_factory=dict)


def segment_scan(
    scan: Scan,
    stage1: UNet3D,
    stage2: UNet3D,
    config: CascadeConfig,
    options: InferenceOptions,
    device: torch.device,
    *,
    to_host: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    clock: Clock | None = None,
) -> ScanOutput:
    """A loaded scan through the whole cascade on ``device`` and back onto its own grid.

    Steps timed (``clock``): ``to_working_grid`` (the upload and the resampling),
    ``c1``, ``stage1``, ``c2``, ``stage2``, ``to_input_grid`` (resampling back, the
    download when ``to_host``, and the two fraction reads).
    """
    clock = Clock(device) if clock is None else clock
    grid = scan.working_grid(config.spacing)
    image = grid.image(device)  # the one upload
    clock.lap("to_working_grid")
    dtype = options.autocast_dtype_for(device)  # "auto": bf16 on a GPU, fp32 on the CPU
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = run_cascade(image, stage1, stage2, config, options, progress, clock)
    labels = grid.labels_to_input(out.stage2.labels)
    probs = None
    if options.probabilities:
        probs = grid.probabilities_to_input(out.stage2.probabilities)
    if to_host:
        labels = labels.cpu().numpy()  # the one download
        probs = None if probs is None else probs.cpu().numpy()
    c1_fraction = float(out.c1.float().mean())
    if c1_fraction == 0.0:
        warnings.warn(
            "no body found (no voxel above the body threshold of "
            f"{config.body_threshold} HU): the result is all background",
            stacklevel=3,
        )
    c2_fraction = float(out.c2.float().mean())
    clock.lap("to_input_grid")
    return ScanOutput(
        labels=labels,
        probabilities=probs,
        c1_fraction=c1_fraction,
        c2_fraction=c2_fraction,
        tiles={
            "stage1": (out.stage1.tiles_computed, out.stage1.tiles_total),
            "stage2": (out.stage2.tiles_computed, out.stage2.tiles_total),
        },
        timings=clock.timings,
        passes={"stage1": out.stage1.report(), "stage2": out.stage2.report()},
    )
