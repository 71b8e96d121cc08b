"""Every inference choice in one frozen object, built once per call and passed unchanged.

``segment(volume, options=None, **overrides)`` and ``Predictor.segment`` build an
:class:`InferenceOptions` from a base object (the predictor's defaults, or
``InferenceOptions()``) and keyword overrides, check it once, and hand it down unchanged:
cascade → stage → stage runner. Nothing below re-reads or re-defaults an option.

>>> from fastcascade.options import InferenceOptions
>>> opts = InferenceOptions(overlap=False)
>>> opts.replace(weights="gaussian").weights
'gaussian'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .memory import available_memory
from .ops._backend import cuda_free_memory
from .ops.morphology import BACKENDS as BODY_MASK_BACKENDS

#: autocast dtypes by ``precision`` name (``None``: no autocast); probabilities are
#: averaged in fp32 whatever the precision. ``"auto"`` is resolved per device:
#: :meth:`InferenceOptions.autocast_dtype_for`.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
WEIGHTS = ("constant", "gaussian")
INFERENCE = ("tiles", "slabs")
HU_CHECKS = ("warn", "error", "off")

#: The share of the free memory an automatic ``memory_budget`` takes, per device type.
#: :func:`fastcascade.passes.forward_memory` errs high, but leaves out weights and
#: convolution workspaces; on the CPU nothing catches an out-of-memory error (the system
#: may end the process), on a GPU the failing region is halved and retried, so the share
#: there is larger.
AUTO_SHARE = {"cpu": 0.5, "cuda": 0.8}


def auto_share(device: torch.device | str) -> float:
    """The share of :data:`AUTO_SHARE` for ``device``: a CUDA device's own, the host's
    for every other device (their memory is the host's)."""
    return AUTO_SHARE["cuda" if torch.device(device).type == "cuda" else "cpu"]


def resolve_memory_budget(budget: int | str | None, device: torch.device | str) -> int | None:
    """``memory_budget`` in bytes on ``device``: ``"auto"`` is :data:`AUTO_SHARE` of the
    memory free there now (on a GPU the driver's free memory and PyTorch's unused cache;
    on the CPU :func:`~fastcascade.memory.available_memory`: ``MemAvailable``, a
    container's limit and ``FASTCASCADE_MAX_MEMORY``), read when the stage starts;
    ``None`` (no limit) and a number of bytes stay as they are. Results do not depend on
    the budget beyond floating-point summation order: it only decides how regions are cut.

    >>> resolve_memory_budget(2**30, "cpu"), resolve_memory_budget(None, "cpu")
    (1073741824, None)
    """
    if budget != "auto":
        return budget
    device = torch.device(device)
    free = cuda_free_memory(device) if device.type == "cuda" else available_memory()
    return None if free is None else int(auto_share(device) * free)


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a cascade (not part of the model; the model's choices live in its config).

    - ``overlap``: stage 2 on overlapping tiles, probabilities averaged with ``weights``
      (``"constant"`` or ``"gaussian"``). ``overlap_step``: the lattice step as fractions
      of the output tile per axis; the paper's 4x overlap is ``(0.5, 0.5, 1.0)``.
    - ``skip_empty``: compute only tiles touching the stage's candidate region (``False``
      computes every tile, as the original does).
    - ``batch_size``: tiles per network call (≥ 1).
    - ``probabilities``: also return stage 2's class probabilities.
    - ``memory_budget``: bytes a stage may use: ``"auto"`` (the default) takes a share
      of the memory free on the device when the stage starts
      (:func:`resolve_memory_budget`), ``None`` sets no limit. With
      tiles, the stitching accumulators take at most half of it, beyond which a stage
      stitches in parts along x; with slabs, it covers one pass's activations
      (estimated from the architecture) and its accumulators, and sets the slab size
      (:func:`fastcascade.passes.pass_bytes`). It changes how a stage is cut, not its
      result (beyond floating-point summation order).
    - ``body_mask_backend``: how C1's hole filling and labelling run (``"auto"``,
      ``"scipy"``, ``"cupy"``, ``"torch"``, ``"cuda"``; all give the same mask).
    - ``precision``: ``"auto"`` (bf16 autocast on a CUDA GPU with native bf16, compute
      capability 8.0 or newer; fp32 elsewhere, the CPU included, where results are those of
      ``"fp32"`` bit for bit), ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast of the
      networks. Probabilities are averaged in fp32 whatever the precision.
    - ``compile``: ``torch.compile`` both networks on first use.
    - ``inference``: how a stage runs its network (:mod:`fastcascade.passes`):
      ``"slabs"`` (the default), the largest inputs that fit ``memory_budget``,
      phase-aligned, the 4x overlap as four pooling-phase passes, or ``"tiles"`` of the
      model's trained input size (the original's way). ``batch_size`` and
      ``overlap_step`` apply to tiles only.
    - ``hu_check``: what to do with a scan whose intensities do not look like HU (no air,
      no soft tissue, or values beyond any CT's range; ``io.scan.check_hu``): ``"warn"``
      (the default), ``"error"`` (refuse it with a ``ValueError``) or ``"off"``.
    """

    overlap: bool = True
    overlap_step: tuple[float, float, float] = (0.5, 0.5, 1.0)
    weights: str = "constant"
    skip_empty: bool = True
    batch_size: int = 2
    probabilities: bool = False
    memory_budget: int | str | None = "auto"
    body_mask_backend: str = "auto"
    precision: str = "auto"
    compile: bool = False
    inference: str = "slabs"
    hu_check: str = "warn"

    def __post_init__(self):
        object.__setattr__(self, "overlap_step", tuple(float(s) for s in self.overlap_step))
        if len(self.overlap_step) != 3 or any(not 0.0 < s <= 1.0 for s in self.overlap_step):
            raise ValueError(f"overlap_step must be 3 fractions in (0, 1], got {self.overlap_step}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise TypeError(f"batch_size must be an integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.memory_budget not in (None, "auto") and (
            isinstance(self.memory_budget, bool)
            or not isinstance(self.memory_budget, int)
            or self.memory_budget < 1
        ):
            raise ValueError(
                f"memory_budget must be 'auto', a positive number of bytes or None, "
                f"got {self.memory_budget!r}"
            )
        if self.body_mask_backend not in BODY_MASK_BACKENDS:
            raise ValueError(
                f"body_mask_backend must be one of {BODY_MASK_BACKENDS}, "
                f"got {self.body_mask_backend!r}"
            )
        if self.hu_check not in HU_CHECKS:
            raise ValueError(f"hu_check must be one of {HU_CHECKS}, got {self.hu_check!r}")
        if self.inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {self.inference!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {('auto', *PRECISIONS)}, got {self.precision!r}"
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The networks' autocast dtype, ``None`` for fp32; for ``"auto"`` it depends on
        the device, see :meth:`autocast_dtype_for`."""
        if self.precision == "auto":
            raise ValueError("precision 'auto' depends on the device: use autocast_dtype_for")
        return PRECISIONS[self.precision]

    def autocast_dtype_for(self, device: torch.device | str) -> torch.dtype | None:
        """The networks' autocast dtype on ``device``, ``None`` for fp32.

        ``"auto"``: bf16 on a CUDA device of compute capability 8.0 or newer (native bf16;
        older GPUs have no bf16 convolution engines), ``None`` on every other device.

        >>> InferenceOptions().autocast_dtype_for("cpu") is None
        True
        """
        if self.precision != "auto":
            return PRECISIONS[self.precision]
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
            return torch.bfloat16
        return None

    def memory_budget_for(self, device: torch.device | str) -> int | None:
        """``memory_budget`` in bytes on ``device`` (``None``: no limit); ``"auto"`` is
        read from the device's free memory now: :func:`resolve_memory_budget`."""
        return resolve_memory_budget(self.memory_budget, device)

    def replace(self, **changes: Any) -> InferenceOptions:
        """A copy with ``changes`` applied (checked like a new object); unknown names
        raise ``TypeError`` naming them and the valid ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown inference option(s) {unknown}; expected some of {option_names()}"
            )
        return dataclasses.replace(self, **changes) if changes else self


def option_names() -> list[str]:
    """The names of every inference option, in declaration order."""
    return [f.name for f in dataclasses.fields(InferenceOptions)]


def build_options(
    options: InferenceOptions | Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
    base: InferenceOptions | None = None,
) -> InferenceOptions:
    """The one place options are built: ``options`` (an object, a mapping of option names,
    or ``None`` for ``base``), then ``overrides`` on top.

    >>> build_options(None, {"overlap": False}).overlap
    False
    """
    base = InferenceOptions() if base is None else base
    if options is None:
        options = base
    elif isinstance(options, Mapping):
        options = base.replace(**options)
    elif not isinstance(options, InferenceOptions):
        raise TypeError(
            f"options must be an InferenceOptions, a dict of option names or None, "
            f"got {type(options).__name__}"
        )
    return options.replace(**overrides)
