"""``segment()`` and the reusable ``Predictor``: a scan in, labels on its own grid out.

Host↔device traffic per scan: one upload of the scan (as given, before resampling), one
download of the labels on the input grid, plus the probabilities when asked for. The
working-grid resampling, both stages and the return to the input grid run on the device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cascade import CascadeOptions, run_cascade
from .config import CascadeConfig
from .io.scan import load_scan
from .model import UNet3D
from .model.checkpoint import load_cascade
from .ops.resample import resample, working_shape

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default.safetensors"


@dataclass
class SegmentationResult:
    """Labels on the input's grid and what it took to get them.

    ``labels``: uint8 ``(x, y, z)`` in the input's own orientation — a NumPy array for
    path, image and array inputs, a tensor on the input's device for tensor inputs.
    ``probabilities``: float32 ``(C, x, y, z)`` likewise, when asked for. ``timings`` in
    seconds per step; ``tiles[stage] = (computed, total)``. ``source``: the scan's file
    for path inputs, which :meth:`save` refuses to overwrite.
    """

    labels: np.ndarray | torch.Tensor
    class_names: tuple[str, ...]
    affine: np.ndarray
    header: object = None
    probabilities: np.ndarray | torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    c1_fraction: float = 0.0
    c2_fraction: float = 0.0
    tiles: dict[str, tuple[int, int]] = field(default_factory=dict)
    source: Path | None = None

    def save(self, path, probabilities_path=None, probabilities_dtype: str = "float32") -> None:
        """Write the labels (and probabilities) as NIfTI on the input's grid, atomically,
        each with a JSON of label names beside it; never onto the input scan."""
        from .io.nifti import write_labels, write_probabilities

        if probabilities_path is not None and self.probabilities is None:
            raise ValueError("no probabilities: call segment(..., probabilities=True)")
        write_labels(
            path,
            self.labels,
            self.affine,
            self.class_names,
            header=self.header,
            input_path=self.source,
        )
        if probabilities_path is not None:
            write_probabilities(
                probabilities_path,
                self.probabilities,
                self.affine,
                header=self.header,
                dtype=probabilities_dtype,
                class_names=self.class_names,
                input_path=self.source,
            )


def resolve_device(device: str | torch.device, volume=None) -> torch.device:
    """``"auto"``: the input's device for a tensor, else a GPU when present, else the CPU."""
    if isinstance(device, torch.device):
        return resolve_device(str(device))
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    if device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA device is available")
        if dev.type == "cuda" and dev.index is None:  # "cuda" is the current GPU, by index
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    if isinstance(volume, torch.Tensor):
        return volume.device
    return resolve_device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """A loaded cascade, kept on one device for segmenting many scans.

    >>> predictor = load_model()                      # the embedded default model
    >>> result = predictor.segment("ct.nii.gz")       # doctest: +SKIP
    >>> result.save("seg.nii.gz")                     # doctest: +SKIP
    """

    #: autocast dtypes by ``precision`` name; probabilities are stitched in fp32 always.
    PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(
        self,
        config: CascadeConfig,
        stage1: UNet3D,
        stage2: UNet3D,
        device="auto",
        precision: str = "fp32",
        compile: bool = False,
    ):
        if precision not in self.PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(self.PRECISIONS)}, got {precision!r}"
            )
        self.config, self.precision, self.compile = config, precision, compile
        self.stage1, self.stage2 = stage1.eval(), stage2.eval()
        self.to(device)

    def _networks(self) -> tuple[UNet3D, UNet3D]:
        if not self.compile:
            return self.stage1, self.stage2
        if getattr(self, "_compiled", None) is None:
            self._compiled = (torch.compile(self.stage1), torch.compile(self.stage2))
        return self._compiled

    def to(self, device) -> Predictor:
        """Move both networks to ``device``; channels-last 3D (faster on CPU and GPU). A
        move to the device they are on is a no-op (compiled networks are kept)."""
        device = resolve_device(device)
        if device == getattr(self, "device", None):
            return self
        self.device = device
        for net in (self.stage1, self.stage2):
            net.to(self.device, memory_format=torch.channels_last_3d)
        self._compiled = None
        return self

    def segment(
        self,
        volume,
        *,
        spacing=None,
        affine=None,
        overlap: bool = True,
        probabilities: bool = False,
        batch_size: int = 2,
        weights: str = "constant",
        skip_empty: bool = True,
        memory_budget: int | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        body_mask_backend: str = "auto",
    ) -> SegmentationResult:
        """Segment one scan; see :func:`segment`. ``skip_empty=False`` computes every tile
        (the original's approach); ``body_mask_backend`` picks how C1 is labelled
        (:class:`~fastcascade.cascade.CascadeOptions`)."""
        t0 = time.perf_counter()
        options = CascadeOptions(
            overlap=overlap,
            weights=weights,
            skip_empty=skip_empty,
            batch_size=batch_size,
            probabilities=probabilities,
            memory_budget=memory_budget,
            body_mask_backend=body_mask_backend,
        )
        scan = load_scan(volume, spacing=spacing, affine=affine)
        if isinstance(volume, torch.Tensor) and scan.data.device != self.device:
            self.to(scan.data.device)  # a tensor input decides the device
        data = scan.data.to(self.device, non_blocking=True)  # the one upload
        t_load = time.perf_counter()
        shape = working_shape(tuple(data.shape), scan.spacing, self.config.spacing)
        image = resample(data, shape, mode="linear")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a lap, as each of the cascade's steps
        t_grid = time.perf_counter()
        dtype = self.PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = run_cascade(image, *self._networks(), self.config, options, progress)

        t_back = time.perf_counter()
        labels = scan.to_input_grid(resample(out.stage2.labels, tuple(data.shape), "nearest"))
        probs = None
        if probabilities:
            probs = scan.to_input_grid(
                resample(out.stage2.probabilities, tuple(data.shape), "linear")
            )
        keep_tensor = isinstance(volume, torch.Tensor)
        labels = labels if keep_tensor else labels.cpu().numpy()  # the one download
        if probs is not None and not keep_tensor:
            probs = probs.cpu().numpy()
        c1_fraction = float(out.c1.float().mean())
        if c1_fraction == 0.0:
            warnings.warn(
                "no body found (no voxel above the body threshold of "
                f"{self.config.body_threshold} HU): the result is all background",
                stacklevel=2,
            )
        timings = {"load": t_load - t0, "to_working_grid": t_grid - t_load, **out.timings}
        timings["to_input_grid"] = time.perf_counter() - t_back
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(
            labels=labels,
            class_names=self.config.class_names,
            affine=scan.input_affine,
            header=scan.header,
            probabilities=probs,
            timings=timings,
            c1_fraction=c1_fraction,
            c2_fraction=float(out.c2.float().mean()),
            source=scan.path,
            tiles={
                "stage1": (out.stage1.tiles_computed, out.stage1.tiles_total),
                "stage2": (out.stage2.tiles_computed, out.stage2.tiles_total),
            },
        )


def load_model(
    path=None, device="auto", precision: str = "fp32", compile: bool = False
) -> Predictor:
    """Load a cascade (``model.safetensors`` + ``model.json``); ``None`` is the default.

    ``precision``: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast for the networks (GPU);
    ``compile``: ``torch.compile`` both networks on first use.
    """
    path = DEFAULT_MODEL if path is None else Path(path)
    config, stage1, stage2 = load_cascade(path)
    return Predictor(config, stage1, stage2, device=device, precision=precision, compile=compile)


def segment(
    volume,
    *,
    spacing=None,
    affine=None,
    model=None,
    device="auto",
    overlap: bool = True,
    probabilities: bool = False,
    batch_size: int = 2,
    weights: str = "constant",
    memory_budget: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SegmentationResult:
    """Segment the organs and vessels of an abdominal CT.

    ``volume``: a path to a NIfTI file, a nibabel image, or a NumPy array / torch tensor
    of HU values ``(x, y, z)`` with ``spacing`` (mm) or an ``affine``. ``model``: a
    :class:`Predictor`, a path to a saved cascade, or ``None`` for the embedded default
    model. ``device``: ``"auto"`` (a tensor's own device, else a GPU when present, else
    the CPU), ``"cpu"``, ``"cuda"``… ``overlap``: stage 2 on overlapping tiles (each
    voxel seen 4x, probabilities averaged with ``weights``). ``progress(stage, done,
    total)`` is called after each batch of tiles. ``memory_budget``: bytes the stitching
    may use; beyond it stages stitch in slabs (a GPU out-of-memory error also falls back to
    smaller tile batches, then slabs).

    >>> import numpy as np, fastcascade
    >>> ct = np.full((40, 40, 30), -1000.0, dtype=np.float32)
    >>> result = fastcascade.segment(ct, spacing=(3.0, 3.0, 3.0))  # doctest: +SKIP
    """
    if isinstance(model, Predictor):
        predictor = model
        if device != "auto":
            predictor.to(device)
    else:
        predictor = load_model(model, device=resolve_device(device, volume))
    return predictor.segment(
        volume,
        spacing=spacing,
        affine=affine,
        overlap=overlap,
        probabilities=probabilities,
        batch_size=batch_size,
        weights=weights,
        memory_budget=memory_budget,
        progress=progress,
    )
