"""When a fused kernel has no way to run a layer shape: the folded convolution + ReLU.

cuDNN has no fused convolution + bias + ReLU engine for some shapes (one input channel
in bf16, small channel counts such as 6, 12 or 36): ``torch.cudnn_convolution_relu``
raises ``RuntimeError: GET was unable to find an engine to execute this computation``
(``FIND ...`` or ``Unable to find an engine ...`` in other PyTorch versions). Triton
refuses to launch a block configuration that needs more shared memory, threads or
registers than the GPU has (``triton.runtime.errors.OutOfResources`` when the kernel is
loaded, or the driver's ``Triton Error [CUDA]: too many resources requested for launch``).

In either case the layer runs ``relu(conv3d(x, w', b'))`` with the BatchNorm-folded
weights instead, through PyTorch (on a GPU, cuDNN's unfused convolution, which has an
engine for every shape). The decision is made at a layer's first call and remembered per
``(path, input shape, C_out, dtype, device, padding)`` in :data:`FALLBACKS`: the fused
kernel is not tried again for that key. Every other error propagates, and is not
remembered.

>>> path = FusedPath("demo", (RuntimeError,), cudnn_lacks_engine)
>>> def no_engine():
...     raise RuntimeError("GET was unable to find an engine to execute this computation")
>>> x, w, b = torch.ones(1, 1, 3, 3, 3), torch.ones(2, 1, 3, 3, 3), torch.zeros(2)
>>> path.run(x, 2, 0, no_engine, lambda: (w, b)).flatten().tolist()
[27.0, 27.0]
>>> FALLBACKS.pop(("demo", (1, 1, 3, 3, 3), 2, torch.float32, torch.device("cpu"), 0))
'RuntimeError: GET was unable to find an engine to execute this computation'
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _backend

_log = logging.getLogger(__name__)

#: ``(path, input shape, C_out, dtype, device, padding) → the error's first line`` for
#: every layer shape a fused path could not run in this process.
FALLBACKS: dict[tuple, str] = {}


def conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
    """``relu(conv3d(x, weight) + bias)`` in PyTorch, channels-last like the fused paths.

    ``x`` (N, C_in, X, Y, Z); ``weight`` (C_out, C_in, 3, 3, 3) and ``bias`` (C_out,), the
    BatchNorm-folded parameters in ``x``'s dtype; ``pad`` 0 (valid) or 1 (same).
    """
    y = F.relu_(F.conv3d(x, weight, bias, padding=pad))
    return y.contiguous(memory_format=torch.channels_last_3d)


def cudnn_lacks_engine(err: BaseException) -> bool:
    """Whether ``err`` is cuDNN saying it has no engine for this convolution."""
    return isinstance(err, RuntimeError) and (
        "unable to find an engine to execute this computation" in str(err).lower()
    )


def _out_of_resources() -> tuple[type[BaseException], ...]:
    if not _backend.triton_available():
        return ()
    from triton.runtime.errors import OutOfResources

    return (OutOfResources,)


_OUT_OF_RESOURCES = _out_of_resources()


def triton_out_of_resources(err: BaseException) -> bool:
    """Whether ``err`` is Triton (or the CUDA driver) refusing to launch a block
    configuration for lack of shared memory, threads or registers."""
    if isinstance(err, _OUT_OF_RESOURCES):
        return True
    return isinstance(err, RuntimeError) and str(err).startswith(
        "Triton Error [CUDA]: too many resources requested for launch"
    )


@dataclass(frozen=True)
class FusedPath:
    """One fused provider: its ``name``, the exception types its launch may raise for an
    unsupported shape (``errors``) and the test that tells that case from a real failure
    (``lacks_kernel``)."""

    name: str
    errors: tuple[type[BaseException], ...]
    lacks_kernel: Callable[[BaseException], bool]

    def run(
        self,
        x: torch.Tensor,
        cout: int,
        pad: int,
        fused: Callable[[], torch.Tensor],
        folded: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """``fused()``, or :func:`conv_relu` of ``x`` with ``folded()`` (the folded weight
        and bias in ``x``'s dtype) where this path has no kernel for the layer shape."""
        # Most processes never fall back: the key is only built once there is something
        # to look up, or an error to remember.
        if not FALLBACKS or _key(self.name, x, cout, pad) not in FALLBACKS:
            try:
                return fused()
            except self.errors as err:
                if not self.lacks_kernel(err):
                    raise
                key = _key(self.name, x, cout, pad)
                FALLBACKS[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                _log.info("%s cannot run %s, using conv3d + ReLU: %s", self.name, key, err)
        weight, bias = folded()
        return conv_relu(x, weight, bias, pad)


def _key(name: str, x: torch.Tensor, cout: int, pad: int) -> tuple:
    return (name, x.shape, cout, x.dtype, x.device, pad)


CUDNN = FusedPath("cudnn", (RuntimeError,), cudnn_lacks_engine)
TRITON = FusedPath("triton", (*_OUT_OF_RESOURCES, RuntimeError), triton_out_of_resources)


def fallbacks() -> dict[tuple, str]:
    """A copy of :data:`FALLBACKS`: the layer shapes that ran unfused in this process."""
    return dict(FALLBACKS)


def reason(name: str, x: torch.Tensor, cout: int, pad: int) -> str | None:
    """Why path ``name`` (``"cudnn"`` or ``"triton"``) runs ``x`` → ``cout`` channels
    unfused, or ``None`` where it runs fused (or has not been tried)."""
    return FALLBACKS.get(_key(name, x, cout, pad))
