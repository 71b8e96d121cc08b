"""``segment()`` and the reusable ``Predictor``: a scan in, labels on its own grid out.

``Predictor.segment`` is load → cascade → result: ``io.scan.load_scan`` reads and checks
the scan, the options are built once (``options.build_options``) and
``cascade.segment_scan`` does the rest. Host↔device traffic per scan: one upload of the
scan (as given, before resampling), one download of the labels on the input grid, plus
the probabilities when asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cascade import segment_scan
from .config import CascadeConfig
from .diagnostics import Clock
from .io.limits import human_bytes, max_memory
from .io.scan import load_scan
from .model import UNet3D
from .model.checkpoint import load_cascade
from .options import PRECISIONS, InferenceOptions, build_options
from .passes import forward_memory

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default.safetensors"


@dataclass
class SegmentationResult:
    """Labels on the input's grid and what it took to get them.

    ``labels``: uint8 ``(x, y, z)`` in the input's own orientation — a NumPy array for
    path, image and array inputs, a tensor on the input's device for tensor inputs.
    ``probabilities``: float32 ``(C, x, y, z)`` likewise, when asked for. ``timings`` in
    seconds per step; ``tiles[stage] = (computed, total)``. ``source``: the scan's file
    (or DICOM folder or zip) for path inputs, which :meth:`save` refuses to overwrite or
    write into. ``dicom``: the ``io.dicom.DicomSeries`` of a DICOM input (its labels can
    be saved as a DICOM SEG referencing it), else ``None``.
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
    dicom: Any = None

    def save(
        self,
        path,
        probabilities_path=None,
        probabilities_dtype: str = "float32",
        *,
        marker: Mapping[str, Any] | None = None,
        dicom_seg=None,
    ) -> list[Path]:
        """Write the labels (and probabilities) as NIfTI on the input's grid, each with a
        JSON of label names beside it; never onto the input scan. Returns the paths.

        All or nothing: every file is written to a temporary first and moved into place
        only when all are written, the label file last. With ``marker`` (a JSON-able
        record, e.g. the options used) a completion marker ``seg.done.json`` is written
        after them (``io.nifti.completion_marker_path``), holding the record and the
        outputs' names; an old marker is removed before the first file moves (and kept if
        writing fails, the old files with it), so a marker always describes the files
        beside it.

        ``dicom_seg``: also write the labels as a DICOM SEG referencing the input series
        (only for a DICOM input; ``io.dicom_seg``), with the other files, all or nothing.
        """
        from .io.atomic import atomic_write
        from .io.nifti import (
            completion_marker_path,
            labels_outputs,
            probabilities_outputs,
            write_outputs,
        )

        if probabilities_path is not None and self.probabilities is None:
            raise ValueError("no probabilities: call segment(..., probabilities=True)")
        outputs, protect = [], []
        if probabilities_path is not None:
            outputs, protect = probabilities_outputs(
                probabilities_path,
                self.probabilities,
                self.affine,
                header=self.header,
                dtype=probabilities_dtype,
                class_names=self.class_names,
                input_path=self.source,
            )
        label_files, protect = labels_outputs(
            path,
            self.labels,
            self.affine,
            self.class_names,
            header=self.header,
            input_path=self.source,
        )
        if dicom_seg is not None:
            from . import __version__
            from .io.dicom_seg import seg_output

            if self.dicom is None:
                raise ValueError("a DICOM SEG needs a DICOM series as the input; this was not one")
            outputs.append(
                seg_output(dicom_seg, self.labels, self.class_names, self.dicom, __version__)
            )
        outputs += label_files  # the label file last
        paths = [p for p, _ in outputs]
        if len(set(map(str, paths))) != len(paths):
            raise ValueError(f"two outputs would share one file name: {[str(p) for p in paths]}")
        record = None
        if marker is not None:
            series = {} if self.dicom is None else {"series": self.dicom.uid}
            record = json.dumps(
                {**dict(marker), **series, "outputs": [p.name for p in paths]},
                indent=1,
                sort_keys=True,
            )
            done = completion_marker_path(path)
        # the old marker goes once the new files are written, before they move into place
        unmark = None if record is None else lambda: done.unlink(missing_ok=True)
        write_outputs(outputs, protect, before_move=unmark)
        if record is not None:
            atomic_write(done, lambda tmp: Path(tmp).write_text(record + "\n"))
            paths.append(done)
        return paths


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

    ``options``: the predictor's default :class:`~fastcascade.options.InferenceOptions`
    (each call may override them); ``precision`` and ``compile`` are shorthands for two
    of them. ``precision="auto"`` (the default) runs the networks under bf16 autocast on a
    recent GPU and in fp32 on the CPU; the :attr:`precision` property says which.

    >>> predictor = load_model()                      # the embedded default model
    >>> result = predictor.segment("ct.nii.gz")       # doctest: +SKIP
    >>> result.save("seg.nii.gz")                     # doctest: +SKIP
    """

    #: autocast dtypes by ``precision`` name; probabilities are stitched in fp32 always.
    PRECISIONS = PRECISIONS

    def __init__(
        self,
        config: CascadeConfig,
        stage1: UNet3D,
        stage2: UNet3D,
        device="auto",
        precision: str = "auto",
        compile: bool = False,
        options: InferenceOptions | None = None,
    ):
        check_tile_memory(config)
        base = InferenceOptions() if options is None else options
        self.options = base.replace(precision=precision, compile=compile)
        self.config = config
        self.stage1, self.stage2 = stage1.eval(), stage2.eval()
        self._compiled = None
        self.to(device)

    @property
    def precision(self) -> str:
        """The precision the networks run in on the predictor's device (``"auto"``
        resolved: ``"bf16"`` on a recent GPU, ``"fp32"`` on the CPU)."""
        dtype = self.options.autocast_dtype_for(self.device)
        return next(name for name, d in self.PRECISIONS.items() if d == dtype)

    @property
    def compile(self) -> bool:
        return self.options.compile

    @compile.setter
    def compile(self, value: bool) -> None:
        self.options = self.options.replace(compile=bool(value))

    def _networks(self, compile: bool | None = None) -> tuple[UNet3D, UNet3D]:
        if not (self.options.compile if compile is None else compile):
            return self.stage1, self.stage2
        if self._compiled is None:
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
        options: InferenceOptions | Mapping[str, Any] | None = None,
        *,
        spacing=None,
        affine=None,
        series: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        **overrides: Any,
    ) -> SegmentationResult:
        """Segment one scan; see :func:`segment`. ``options`` (default: the predictor's)
        and keyword ``overrides`` of any :class:`~fastcascade.options.InferenceOptions`
        field, e.g. ``overlap=False``, ``skip_empty=False`` (every tile, as the original).
        """
        t0 = time.perf_counter()
        options = build_options(options, overrides, self.options)
        scan = load_scan(
            volume, spacing=spacing, affine=affine, hu_check=options.hu_check, series=series
        )
        keep_tensor = isinstance(volume, torch.Tensor)
        if keep_tensor and scan.data.device != self.device:
            self.to(scan.data.device)  # a tensor input decides the device
        clock = Clock(self.device, start=t0)
        clock.lap("load")
        out = segment_scan(
            scan,
            *self._networks(options.compile),
            self.config,
            options,
            self.device,
            to_host=not keep_tensor,
            progress=progress,
            clock=clock,
        )
        return SegmentationResult(
            labels=out.labels,
            class_names=self.config.class_names,
            affine=scan.input_affine,
            header=scan.header,
            probabilities=out.probabilities,
            timings={**out.timings, "total": clock.total()},
            c1_fraction=out.c1_fraction,
            c2_fraction=out.c2_fraction,
            tiles=out.tiles,
            source=scan.path,
            dicom=scan.dicom,
        )


def check_tile_memory(config: CascadeConfig) -> None:
    """Refuse a model one of whose tiles would need more memory than one pass may use
    (``FASTCASCADE_MAX_MEMORY``, default the machine's memory), naming the stage."""
    limit = max_memory()
    if limit is None:
        return
    for name in ("stage1", "stage2"):
        stage = getattr(config, name)
        peak, _ = forward_memory(stage.architecture, stage.tile)
        if peak > limit:
            raise ValueError(
                f"model config {name}: one {'×'.join(map(str, stage.tile))} tile of its "
                f"network needs about {human_bytes(peak)} of activations; the limit is "
                f"{human_bytes(limit)} (FASTCASCADE_MAX_MEMORY)"
            )


def load_model(
    path=None, device="auto", precision: str = "auto", compile: bool = False
) -> Predictor:
    """Load a cascade (``model.safetensors`` + ``model.json``); ``None`` is the default.

    ``precision``: ``"auto"`` (bf16 autocast on a recent GPU, fp32 on the CPU), ``"fp32"``,
    or ``"bf16"``/``"fp16"`` autocast for the networks;
    ``compile``: ``torch.compile`` both networks on first use. Both become the
    predictor's default options.
    """
    path = DEFAULT_MODEL if path is None else Path(path)
    config, stage1, stage2 = load_cascade(path)
    return Predictor(config, stage1, stage2, device=device, precision=precision, compile=compile)


def segment(
    volume,
    options: InferenceOptions | Mapping[str, Any] | None = None,
    *,
    spacing=None,
    affine=None,
    series: str | None = None,
    model=None,
    device="auto",
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> SegmentationResult:
    """Segment the organs and vessels of an abdominal CT.

    ``volume``: a path to a NIfTI, NRRD or MetaImage file or to a folder or ``.zip`` of one
    DICOM CT series (``series``: the SeriesInstanceUID to read where it holds several; these
    need ``pip install 'fastcascade[dicom]'``), a nibabel image, or a NumPy array / torch
    tensor of HU values ``(x, y, z)`` with ``spacing`` (mm) or an ``affine``. ``model``: a
    :class:`Predictor`, a path to a saved cascade, or ``None`` for the embedded default
    model. ``device``: ``"auto"`` (a tensor's own device, else a GPU when present, else the
    CPU), ``"cpu"``, ``"cuda"``… ``progress(stage, done, total)`` is called after each batch
    of tiles.

    How to run is one :class:`~fastcascade.options.InferenceOptions` (``options``, or the
    model's defaults) with keyword ``overrides`` of its fields on top, built once:
    ``overlap`` (stage 2 on overlapping tiles, each voxel seen 4x, probabilities
    averaged with ``weights``), ``probabilities``, ``batch_size``, ``skip_empty``,
    ``memory_budget`` (bytes the stitching may use; beyond it stages stitch in parts, and
    a GPU out-of-memory error also falls back to smaller tile batches, then parts),
    ``body_mask_backend``, ``precision``, ``compile``, ``overlap_step``. An unknown name
    raises ``TypeError``.

    >>> import numpy as np, fastcascade
    >>> ct = np.full((40, 40, 30), -1000.0, dtype=np.float32)
    >>> result = fastcascade.segment(ct, spacing=(3.0, 3.0, 3.0))  # doctest: +SKIP
    >>> result = fastcascade.segment(ct, spacing=(3.0,) * 3, overlap=False)  # doctest: +SKIP
    """
    if isinstance(model, Predictor):
        predictor = model
        if device != "auto":
            predictor.to(device)
    else:
        predictor = load_model(model, device=resolve_device(device, volume))
    return predictor.segment(
        volume,
        options,
        spacing=spacing,
        affine=affine,
        series=series,
        progress=progress,
        **overrides,
    )
