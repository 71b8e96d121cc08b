"""The one place that asks what this environment can run: Triton, its interpreter, CUDA,
cuDNN, CuPy, the CUDA C++ sources of ``csrc/`` (compiled on first use).

Every op's public function takes ``backend="auto"`` and calls :func:`resolve`. ``"auto"``
picks an accelerated backend only for CUDA tensors and falls back to ``"torch"`` quietly;
a backend asked for by name that cannot run raises :class:`BackendUnavailableError`
naming what to install. Probes are cached, and nothing here initialises CUDA at import
time (``torch.cuda`` is only asked when a caller holds a CUDA tensor or asks for it).

Backends:

=========== ============================================================================
``torch``   plain PyTorch (the references; always available, the CPU path)
``triton``  Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
``cudnn``   cuDNN through PyTorch (CUDA tensors, CUDA build of PyTorch)
``cupy``    CuPy (CUDA tensors, ``pip install 'fastcascade[gpu]'``)
``cuda``    the CUDA C++ kernels of ``csrc/``, compiled on first use by
            ``torch.utils.cpp_extension.load`` (CUDA tensors; a CUDA build of PyTorch, the
            CUDA toolkit's nvcc, ninja and a C++ compiler)
=========== ============================================================================

>>> import torch
>>> resolve("auto", torch.zeros(2))
'torch'
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import types
from pathlib import Path

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton", "cudnn", "cupy", "cuda")

_INSTALL: dict[str, str] = {
    "triton": "pip install 'triton>=3.0' (Linux only)",
    "cudnn": "a CUDA build of PyTorch (see https://pytorch.org/get-started/locally/)",
    "cupy": "pip install 'fastcascade[gpu]'",
    "cuda": "a CUDA build of PyTorch, the CUDA toolkit (nvcc, found through CUDA_HOME or "
    "PATH), ninja (pip install 'fastcascade[cuda]') and a C++ compiler; csrc/ is compiled "
    "on first use",
}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says what to install."""


# -- probes (cached) -------------------------------------------------------------------
@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (Triton ships for Linux only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def interpreter_on() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so it must be set before any
    module of ``fastcascade.ops`` is imported; the answer is therefore cached.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


@functools.cache
def autotune_enabled() -> bool:
    """Whether run-time autotuning of block sizes is opted into (``FASTCASCADE_AUTOTUNE=1``).

    Off by default: kernels use the committed per-shape tables. Read once per process
    (every Triton launch asks, and reading the environment costs microseconds).
    """
    return os.environ.get("FASTCASCADE_AUTOTUNE", "0") == "1"


def on_cuda(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives on a CUDA device (no CUDA call is made)."""
    return tensor.device.type == "cuda"


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which kernels launch on ``tensor``'s CUDA device.

    Triton (and PyTorch's current-device calls) launch on the *current* CUDA device, which
    need not be the tensor's: a tensor on ``cuda:1`` would otherwise be handed to a kernel
    running on ``cuda:0``. Wrap every kernel launch in ``with on_device(t):``. For a tensor
    off CUDA (the CPU, Triton's interpreter) this is a no-op and makes no CUDA call, so it
    never initialises CUDA.

    >>> with on_device(torch.zeros(1)):  # CPU tensor: nothing happens
    ...     pass
    """
    if tensor.device.type == "cuda":  # the device itself: on_cuda may be stood in for
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    """The smallest power of two at least ``n`` (``1`` for ``n <= 1``): block sizes.

    >>> [next_pow2(n) for n in (0, 1, 2, 3, 16, 17)]
    [1, 1, 2, 4, 16, 32]
    """
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def cuda_capability(device_index: int = 0) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, or ``None`` without CUDA.

    This initialises CUDA, so it is only called on demand.
    """
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device_index))


def cuda_free_memory(device: torch.device | str) -> int:
    """Bytes a new allocation on CUDA ``device`` may take: the driver's free memory plus
    what PyTorch's caching allocator holds unused there (it reuses that first)."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


@functools.cache
def cudnn_available() -> bool:
    """Whether this PyTorch build has cuDNN (no CUDA initialisation)."""
    return torch.backends.cudnn.is_available()


@functools.cache
def cupy_available() -> bool:
    """Whether CuPy imports and sees a usable CUDA device (``cupy.is_available()``)."""
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


def csrc_dir() -> Path | None:
    """The folder of the CUDA C++ sources: ``csrc/`` of a source checkout (editable
    install), else ``fastcascade/csrc/`` of an installed package (``setup.py`` copies them
    there); ``None`` where neither holds ``ccl.cu``."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "csrc", package / "csrc"):
        if (folder / "ccl.cu").is_file():
            return folder
    return None


@functools.cache
def cuda_extension_missing() -> str | None:
    """What compiling ``csrc/`` on first use lacks here, in words; ``None`` when nothing.

    Checks a CUDA build of PyTorch, the sources, the CUDA toolkit (the ``CUDA_HOME``
    PyTorch's extension builder finds) and ninja, without compiling anything or
    initialising CUDA.
    """
    if torch.version.cuda is None:
        return f"a CUDA build of PyTorch (this one, {torch.__version__}, has no CUDA)"
    if csrc_dir() is None:
        return "the CUDA sources (csrc/ccl.cu), which a source checkout or a built package holds"
    from torch.utils import cpp_extension  # imports setuptools: only asked on demand

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit's nvcc (set CUDA_HOME, or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja (pip install 'fastcascade[cuda]', or pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "a C++ compiler (c++, or the one CXX names)"
    return None


def import_triton() -> tuple[types.ModuleType, types.ModuleType]:
    """``(triton, triton.language)``, or stand-ins where Triton is not installed.

    The stand-ins let a module that defines kernels be imported anyway (``@triton.jit``
    leaves the function a plain, never-called Python function; ``tl.constexpr`` is a
    placeholder annotation), so that ``import fastcascade`` works on every platform and
    only asking for ``backend="triton"`` fails.
    """
    if triton_available():
        return importlib.import_module("triton"), importlib.import_module("triton.language")
    triton_stub = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn else (lambda f: f))
    language_stub = types.SimpleNamespace(constexpr=object())
    return triton_stub, language_stub


# -- choosing ---------------------------------------------------------------------------
def available(backend: str, tensor: torch.Tensor) -> bool:
    """Whether ``backend`` can run an op on ``tensor``'s device here."""
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available() and (on_cuda(tensor) or interpreter_on())
    if not on_cuda(tensor):
        return False
    if backend == "cudnn":
        return cudnn_available()
    if backend == "cupy":
        return cupy_available()
    if backend == "cuda":
        return cuda_extension_missing() is None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _why_unavailable(backend: str, tensor: torch.Tensor) -> str:
    if backend == "triton" and triton_available():
        return (
            f"Triton kernels need a CUDA tensor (got one on {tensor.device}), or "
            "TRITON_INTERPRET=1 set before fastcascade is imported to run them in "
            "Triton's CPU interpreter"
        )
    if backend == "cuda" and not on_cuda(tensor):
        return (
            f"backend 'cuda' needs a CUDA tensor (an NVIDIA GPU), got one on {tensor.device}; "
            f"it also needs {_INSTALL['cuda']}"
        )
    if backend != "triton" and not on_cuda(tensor):
        return f"backend {backend!r} needs a CUDA tensor, got one on {tensor.device}"
    if backend == "cuda":
        return (
            f"backend 'cuda' compiles csrc/ on first use and needs {cuda_extension_missing()}; "
            f"in all: {_INSTALL['cuda']}"
        )
    return f"backend {backend!r} is not installed; install it with: {_INSTALL[backend]}"


def resolve(
    backend: str,
    tensor: torch.Tensor,
    candidates: tuple[str, ...] = ("triton", "torch"),
) -> str:
    """The backend an op runs on ``tensor`` with.

    ``backend`` is ``"auto"`` or one of ``candidates`` (the backends the op implements,
    in order of preference). ``"auto"`` returns the first candidate available for a CUDA
    tensor, and ``"torch"`` for any other tensor: the interpreter is never chosen
    automatically (it is for tests, and slow). A named backend that cannot run raises
    :class:`BackendUnavailableError` with the install command.

    >>> resolve("torch", torch.zeros(1), candidates=("triton", "torch"))
    'torch'
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor to choose a backend for, got {type(tensor)}")
    if backend == "auto":
        if not on_cuda(tensor) or interpreter_on():
            return "torch"
        for name in candidates:
            if available(name, tensor):
                return name
        return "torch"
    if backend not in candidates:
        raise ValueError(f"backend must be 'auto' or one of {candidates}, got {backend!r}")
    if not available(backend, tensor):
        raise BackendUnavailableError(_why_unavailable(backend, tensor))
    return backend


def summary() -> dict[str, object]:
    """What this environment offers, for ``fastcascade env`` and benchmark records
    (``cuda_ext``: whether ``csrc/`` can be compiled here, see
    :func:`cuda_extension_missing`; it is built at its first use, not here).

    Initialises CUDA if a CUDA device is present.
    """
    cuda = torch.cuda.is_available()
    return {
        "triton": triton_available(),
        "triton_interpret": interpreter_on(),
        "cuda": cuda,
        "cuda_capability": cuda_capability() if cuda else None,
        "cudnn": cudnn_available(),
        "cupy": cupy_available(),
        "cuda_ext": cuda_extension_missing() is None,
        "autotune": autotune_enabled(),
    }


# -- what "auto" picks per op -------------------------------------------------------------
#: The ops ``auto_choices`` describes, in pipeline order.
OPS: tuple[str, ...] = ("conv-BN-ReLU", "dilation", "stitching", "morphology", "warp")


def auto_choices(cuda: bool | None = None) -> dict[str, tuple[str, str]]:
    """``{op: (backend, why)}``: what ``backend="auto"`` picks for each op of :data:`OPS`
    on this machine's default device (a CUDA GPU where ``cuda``, by default where one is
    present; else the CPU), and why, from the probes above.

    The rules are those of each op's public function (``conv_bn_relu/dispatch.py``,
    ``dilate.py``, ``stitch.py``, ``morphology.py``, ``warp.py``); the tests check them
    against those functions. Asking about a GPU initialises CUDA.

    >>> auto_choices(cuda=False)["morphology"][0]
    'scipy'
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        why = "no CUDA device"
        return {
            "conv-BN-ReLU": ("torch", f"{why}: PyTorch's conv3d, BatchNorm and ReLU"),
            "dilation": ("torch", f"{why}: exact row decomposition in PyTorch"),
            "stitching": ("torch", f"{why}: slice-add loop (faster than index_add_ on a CPU)"),
            "morphology": ("scipy", f"{why}: SciPy labelling on the host"),
            "warp": ("torch", f"{why}: grid_sample"),
        }
    interpret = interpreter_on()
    triton = triton_available() and not interpret
    if interpret:
        no_triton = "TRITON_INTERPRET=1: the interpreter is never picked by auto"
    else:
        no_triton = "Triton not installed"

    if triton and cudnn_available():
        from .conv_bn_relu import configs  # the committed per-shape table

        providers = [entry["provider"] for entry in configs.CONFIGS.values()]
        counts = ", ".join(f"{providers.count(p)} {p}" for p in ("triton", "cudnn"))
        tuned = f"tuned on {configs.TUNED_ON}" if configs.TUNED_ON else "not yet tuned"
        conv = (
            "triton|cudnn",
            f"per layer shape from the committed table ({counts}; {tuned}), "
            "cudnn for shapes not in it",
        )
    elif triton:
        conv = ("triton", "Triton kernel (this PyTorch has no cuDNN)")
    elif cudnn_available():
        conv = ("cudnn", f"cuDNN's fused conv + ReLU, BatchNorm folded ({no_triton})")
    else:
        conv = ("torch", f"PyTorch ({no_triton}, no cuDNN)")

    if triton:
        dilation = ("triton", "two Triton kernels on bit-packed rows (torch where the ball's "
                    "z half-width exceeds the kernels' limit)")  # fmt: skip
        stitching = ("triton", "Triton atomic adds and a fused finalize")
        warp = ("triton", "one fused Triton pass")
    else:
        dilation = ("torch", f"row decomposition on the GPU ({no_triton})")
        stitching = ("torch", f"index_add_ on the GPU ({no_triton})")
        warp = ("torch", f"grid_sample ({no_triton})")
    if cupy_available():
        morphology = ("cupy", "CuPy labelling on the GPU ('cuda' is used only when named)")
    else:
        morphology = ("torch", "PyTorch labelling on the GPU (CuPy not installed; 'cuda' is "
                      "used only when named)")  # fmt: skip
    return {
        "conv-BN-ReLU": conv,
        "dilation": dilation,
        "stitching": stitching,
        "morphology": morphology,
        "warp": warp,
    }
