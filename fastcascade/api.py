"""``segment()`` and the reusable ``Predictor``: a scan in, labels on its own grid out.

``Predictor.segment`` is load → cascade → result: ``io.scan.load_scan`` reads and checks
the scan, the options are built once (``options.build_options``) and
``cascade.segment_scan`` does the rest. Host↔device traffic per scan: one upload of the
scan (as given, before resampling), one download of the labels on the input grid, plus
the probabilities when asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cascade import segment_scan
from .config import CascadeConfig
from .diagnostics import Clock
from .io.atomic import atomic_write, output_folders
from .io.limits import human_bytes, max_memory
from .io.nifti import (
    Output,
    completion_marker_path,
    labels_outputs,
    probabilities_outputs,
    split_outputs,
    write_outputs,
)
from .io.scan import Scan, load_scan
from .model import UNet3D
from .model.checkpoint import load_cascade
from .options import PRECISIONS, InferenceOptions, build_options
from .passes import forward_memory
from .postprocess import keep_largest_components, keep_organs, organ_ids
from .statistics import organ_statistics, statistics_csv, statistics_json, statistics_paths

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default.safetensors"


@dataclass
class SegmentationResult:
    """Labels on the input's grid and what it took to get them.

    ``labels``: uint8 ``(x, y, z)`` in the input's own orientation — a NumPy array for
    path, image and array inputs, a tensor on the input's device for tensor inputs.
    ``probabilities``: float32 ``(C, x, y, z)`` likewise, when asked for. ``timings`` in
    seconds per step; ``tiles[stage] = (computed, total)``; ``passes[stage]``: how the
    stage ran (``inference``, ``passes``, ``passes_planned``, ``voxels_computed``
    against ``voxels_grid``, the ``memory_budget`` in bytes it was given; what was
    skipped shows as computed voxels below the grid's). ``source``: the scan's file
    (or DICOM folder or zip) for path inputs, which :meth:`save` refuses to overwrite or
    write into. ``dicom``: the ``io.dicom.DicomSeries`` of a DICOM input (its labels can
    be saved as a DICOM SEG referencing it), else ``None``. ``selected``: the class ids
    :meth:`select` kept (``None``: every class). ``scan``: the input as read (its HU, in
    canonical orientation, on the CPU or the input tensor's device), kept for
    :meth:`statistics` and :meth:`preview`; set it to ``None`` to free that memory
    (they then read ``source`` again, or take ``ct=``).

    >>> result = fastcascade.segment("ct.nii.gz")  # doctest: +SKIP
    >>> result = result.select(["liver", "spleen"]).largest_components()  # doctest: +SKIP
    >>> result.statistics()["organs"]["liver"]["volume_ml"]  # doctest: +SKIP
    1532.7
    >>> result.save("seg.nii.gz", preview="seg.png", statistics="stats.json", split="masks")
    ... # doctest: +SKIP
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
    passes: dict[str, dict] = field(default_factory=dict)
    source: Path | None = None
    dicom: Any = None
    selected: tuple[int, ...] | None = None
    scan: Scan | None = field(default=None, repr=False, compare=False)

    # -- label maps -------------------------------------------------------------------
    @property
    def organ_ids(self) -> tuple[int, ...]:
        """The class ids the outputs report: those :meth:`select` kept, else every class
        but background."""
        if self.selected is not None:
            return self.selected
        return tuple(range(1, len(self.class_names)))

    def select(self, organs: Iterable[str] | str) -> SegmentationResult:
        """A copy whose labels keep only ``organs`` (class names, or one comma-separated
        string); every other label becomes background in the labels and in every output
        made from them (statistics, split masks, preview). Ids keep their meaning: the
        class list and the probabilities (the networks' output) are unchanged. An unknown
        name raises ``ValueError`` listing the model's organs.

        >>> result.select(["liver", "spleen"]).organ_ids  # doctest: +SKIP
        (1, 2)
        """
        ids = organ_ids(self.class_names, organs)
        removed = [self.class_names[k] for k in ids if k not in self.organ_ids]
        if removed:
            raise ValueError(f"{', '.join(removed)}: already removed by an earlier select()")
        return dataclasses.replace(self, labels=keep_organs(self.labels, ids), selected=ids)

    def largest_components(self) -> SegmentationResult:
        """A copy in which each organ keeps only its largest 6-connected component (the
        rest becomes background), computed by SciPy on the CPU (a tensor's labels go to
        the host and back); see :func:`fastcascade.postprocess.keep_largest_components`."""
        return dataclasses.replace(
            self, labels=keep_largest_components(self.labels, self.organ_ids)
        )

    # -- what is made from the labels and the CT ------------------------------------
    def image_hu(self, ct=None) -> np.ndarray:
        """The CT in HU on the input's grid, float32 ``(x, y, z)`` like :attr:`labels`.

        ``ct``: ``None`` (the kept :attr:`scan`, else the :attr:`source` file read
        again), a path or nibabel image of the input scan (its affine must match), or an
        array/tensor already on the input's grid and orientation.
        """
        shape = tuple(self.labels.shape)
        if ct is None and self.scan is None and self.source is None:
            raise ValueError(
                "the CT is not kept with this result (result.scan is None and it was not "
                "read from a file): pass ct=, the HU volume on the input's grid"
            )
        if isinstance(ct, np.ndarray | torch.Tensor):
            hu = ct.detach().cpu().numpy() if isinstance(ct, torch.Tensor) else ct
        else:
            scan = self.scan if ct is None else None
            if scan is None:
                # the source again: the series segmented, where its folder holds several
                series = self.dicom.uid if ct is None and self.dicom is not None else None
                scan = load_scan(self.source if ct is None else ct, hu_check="off", series=series)
                if not np.allclose(scan.input_affine, self.affine, rtol=0, atol=1e-3):
                    raise ValueError(
                        "the CT's affine differs from the labels' (more than 1e-3 mm): "
                        f"{scan.input_affine.tolist()} vs {np.asarray(self.affine).tolist()}"
                    )
            hu = scan.to_input_grid(scan.data).cpu().numpy()
        if tuple(hu.shape) != shape:
            raise ValueError(f"the CT has shape {tuple(hu.shape)}; the labels' grid is {shape}")
        if hu.dtype.kind not in "iuf":
            raise TypeError(f"the CT must hold real HU values, got dtype {hu.dtype}")
        return hu.astype(np.float32, copy=False)

    def statistics(self, ct=None) -> dict[str, Any]:
        """Per organ of :attr:`organ_ids`: voxels, volume in ml, mean and standard
        deviation of HU, bounding box in world RAS mm and in voxels, on the input's grid
        (:func:`fastcascade.statistics.organ_statistics`). ``ct`` as for
        :meth:`image_hu`.

        >>> result.statistics()["organs"]["liver"]["hu_mean"]  # doctest: +SKIP
        54.2
        """
        return organ_statistics(
            self.labels, self.image_hu(ct), self.affine, self.class_names, self.organ_ids
        )

    def preview(self, path, ct=None) -> Path:
        """Write the overlay PNG (axial, coronal and sagittal slices through the organs,
        one colour per label, a legend of those present; :func:`fastcascade.viz.preview_png`),
        atomically. Needs matplotlib (``pip install fastcascade[viz]``)."""
        outputs, protect = self._preview_outputs(path, lambda: self.image_hu(ct))
        with output_folders([Path(path).parent]):
            write_outputs(outputs, protect)
        return Path(path)

    def split(self, folder) -> list[Path]:
        """Write one binary mask per organ of :attr:`organ_ids` into ``folder`` (created
        if missing): ``<name>.nii.gz``, uint8 0/1 with the input's affine, and
        ``<name>.json`` naming it; all or none. Returns the paths."""
        outputs, protect = self._split_outputs(folder)
        with output_folders([folder]):
            write_outputs(outputs, protect)
        return [p for p, _ in outputs]

    def _preview_outputs(
        self, path, hu: Callable[[], np.ndarray]
    ) -> tuple[list[Output], list[Path]]:
        """``hu()`` gives :meth:`image_hu`, obtained after the name and matplotlib checks."""
        from . import viz

        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"preview {path}: expected a file name ending in .png")
        viz.require_matplotlib()
        ct = hu()
        labels = _host(self.labels)

        def draw(tmp: Path) -> None:
            viz.preview_png(ct, labels, self.affine, tmp, self.class_names)

        return [(path, draw)], self._protect()

    def _split_outputs(self, folder) -> tuple[list[Output], list[Path]]:
        return split_outputs(
            folder,
            self.labels,
            self.affine,
            self.class_names,
            self.organ_ids,
            header=self.header,
            input_path=self.source,
        )

    def _statistics_outputs(
        self, path, hu: Callable[[], np.ndarray]
    ) -> tuple[list[Output], list[Path]]:
        """``hu()`` gives :meth:`image_hu`, obtained after the file names are checked."""
        json_path, csv_path = statistics_paths(path)
        stats = self.statistics(hu())
        as_json, as_csv = statistics_json(stats), statistics_csv(stats)
        outputs = [
            (json_path, lambda tmp: Path(tmp).write_text(as_json)),
            (csv_path, lambda tmp: Path(tmp).write_text(as_csv)),
        ]
        return outputs, self._protect()

    def _protect(self) -> list[Path]:
        return [] if self.source is None else [Path(self.source)]

    def save(
        self,
        path,
        probabilities_path=None,
        probabilities_dtype: str = "float32",
        *,
        marker: Mapping[str, Any] | None = None,
        preview=None,
        statistics=None,
        split=None,
        ct=None,
        dicom_seg=None,
    ) -> list[Path]:
        """Write the labels (and what else is asked for) on the input's grid; never onto
        the input scan. Returns the paths written.

        - ``path``: the label file (NIfTI), with a JSON of label names beside it;
        - ``probabilities_path`` (``probabilities_dtype`` ``"float32"`` or ``"float16"``);
        - ``preview``: the overlay PNG (:meth:`preview`);
        - ``statistics``: ``stats.json`` and ``stats.csv`` beside it (:meth:`statistics`);
        - ``split``: a folder of one binary mask per organ (:meth:`split`);
        - ``ct``: the CT for the preview and the statistics (:meth:`image_hu`).

        Missing folders are created (and removed again, if still empty, when writing fails).

        All or nothing: every file is written to a temporary first and moved into place
        only when all are written, the label file last. With ``marker`` (a JSON-able
        record, e.g. the options used) a completion marker ``seg.done.json`` is written
        after them (``io.nifti.completion_marker_path``), holding the record and the
        outputs' paths relative to its folder; an old marker is removed before the first
        file moves (and kept if writing fails, the old files with it), so a marker always
        describes the files beside it.

        ``dicom_seg``: also write the labels as a DICOM SEG referencing the input series
        (only for a DICOM input; ``io.dicom_seg``), with the other files, all or nothing.
        """
        if probabilities_path is not None and self.probabilities is None:
            raise ValueError("no probabilities: call segment(..., probabilities=True)")
        outputs: list[Output] = []
        protect = self._protect()
        if probabilities_path is not None:
            outputs += probabilities_outputs(
                probabilities_path,
                self.probabilities,
                self.affine,
                header=self.header,
                dtype=probabilities_dtype,
                class_names=self.class_names,
                input_path=self.source,
            )[0]
        if split is not None:
            outputs += self._split_outputs(split)[0]
        hu = functools.cache(lambda: self.image_hu(ct))  # the CT once for both
        if statistics is not None:
            outputs += self._statistics_outputs(statistics, hu)[0]
        if preview is not None:
            outputs += self._preview_outputs(preview, hu)[0]
        label_files = labels_outputs(
            path,
            self.labels,
            self.affine,
            self.class_names,
            header=self.header,
            input_path=self.source,
        )[0]
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
        if len(set(map(_resolved, paths))) != len(paths):
            raise ValueError(f"two outputs would share one file name: {[str(p) for p in paths]}")
        record = None
        if marker is not None:
            done = completion_marker_path(path)
            listed = [os.path.relpath(p, done.parent) for p in paths]
            series = {} if self.dicom is None else {"series": self.dicom.uid}
            record = json.dumps(
                {**dict(marker), **series, "outputs": listed}, indent=1, sort_keys=True
            )
        # the old marker goes once the new files are written, before they move into place
        unmark = None if record is None else lambda: done.unlink(missing_ok=True)
        with output_folders({p.parent for p in paths}):
            write_outputs(outputs, protect, before_move=unmark)
        if record is not None:
            atomic_write(done, lambda tmp: Path(tmp).write_text(record + "\n"))
            paths.append(done)
        return paths


def _resolved(path: Path) -> str:
    return os.path.realpath(path)


def _host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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

        ``volume`` may also be a :class:`~fastcascade.io.scan.Scan` read beforehand with
        ``io.scan.load_scan`` (its HU check was done then; ``hu_check`` does not apply):
        a batch reads the next scan while this one runs.
        """
        t0 = time.perf_counter()
        options = build_options(options, overrides, self.options)
        if isinstance(volume, Scan):  # read already (e.g. by a batch's reading thread)
            if spacing is not None or affine is not None or series is not None:
                raise ValueError(
                    "a Scan carries its own geometry and series: give no spacing, affine "
                    "or series with it"
                )
            scan = volume
        else:
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
            passes=out.passes,
            source=scan.path,
            scan=scan,
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
    tensor of HU values ``(x, y, z)`` with ``spacing`` (mm) or an ``affine``, or a
    :class:`~fastcascade.io.scan.Scan` already read by ``io.scan.load_scan``. ``model``: a
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
