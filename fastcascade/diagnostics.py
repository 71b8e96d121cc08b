"""What a scan costs: wall-clock laps per step (``Clock``), and what stalls a GPU:
scalar reads and host↔device copies (``SyncCounter``).

``SyncCounter`` is a ``TorchDispatchMode``: it sees every ATen call, on the CPU as on a
GPU, so CI can check the count without a GPU. Counted as syncs: ``.item()``/``float()``
of a tensor (``_local_scalar_dense``), ``nonzero``, ``masked_select``, boolean-mask
indexing (which calls ``nonzero`` inside), ``unique`` and ``torch.equal``. Copies
between devices are counted separately with their size in bytes.

>>> import torch
>>> with SyncCounter() as counter:
...     _ = torch.arange(4)[torch.arange(4) > 1]
>>> counter.syncs
1
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.equal.default: "equal",
}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Context manager counting host syncs (``syncs``, ``by_op``) and cross-device copies
    (``transfers``: list of ``(src_device, dst_device, bytes)``)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.transfers: list[tuple[str, str, int]] = []

    @property
    def syncs(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _SYNC_OPS.get(func)
        if name is None and func is aten.index.Tensor and _has_bool_index(args):
            name = "bool_index"
        if name is not None:
            self.by_op[name] += 1
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = out if func is aten._to_copy.default else args[0]
            if isinstance(src, torch.Tensor) and src.device != dst.device:
                self.transfers.append(
                    (str(src.device), str(dst.device), src.numel() * src.element_size())
                )
        return out


class Clock:
    """Wall-clock laps of a scan's steps, in seconds (``timings[name]``).

    On a GPU each lap synchronises the device first (one documented sync per lap), so a
    step's time includes the GPU work it queued. ``start``: a ``time.perf_counter()``
    value the first lap counts from (default: now).

    >>> clock = Clock(torch.device("cpu"))
    >>> clock.lap("load")
    >>> list(clock.timings)
    ['load']
    """

    def __init__(self, device: torch.device, start: float | None = None):
        self.device = torch.device(device)
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter() if start is None else start
        self.last = self.start

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now

    def total(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self.start
