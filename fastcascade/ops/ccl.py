"""Connected-component labelling on the GPU: the CUDA kernels of ``csrc/ccl.cu``.

``label(mask)`` numbers the components of a boolean CUDA volume: every voxel gets
1 + the smallest C-order index of its component (int32), 0 outside the mask, the same
numbers as the PyTorch labelling of :mod:`fastcascade.ops.morphology`. Face neighbours
are joined along x, y and z (6-connectivity, SciPy's default 3D structure), or along x and
y only (``in_plane=True``: each axial slice on its own, 4-connectivity);
``invert=True`` labels the False voxels (the background, for hole filling) without a
negated copy of the mask.

The kernels (``csrc/ccl.cu``, block-based union-find after Oliveira & Lotufo 2010 and
Playne & Hawick 2018) label each tile of :data:`TILES` voxels in shared memory, join the
tiles across their faces in global memory, then point every voxel at its root: three
launches on PyTorch's current stream, no host synchronisation. ``csrc/ccl_binding.cpp``
binds them with pybind11; both are compiled on first use by
``torch.utils.cpp_extension.load`` (tens of seconds, once: the build is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), so installing
fastcascade needs no compiler. :mod:`fastcascade.ops._backend` says whether this machine
can build it (``backend="cuda"`` of the morphology ops).

The op is registered with ``torch.library`` as ``fastcascade::label_components``, with a
fake function (an int32 tensor of the mask's shape), so that it composes with
``torch.compile``.

Proven without a GPU (``tests/test_ops_ccl.py``): ``ccl.cu`` compiles for sm_90 without
spills; the binding passes a syntax check against PyTorch's headers; the kernels'
per-thread steps, built for the host and run thread by thread in shuffled orders, and a
Python model of the same kernels run with interleaved threads, both number SciPy's
components exactly. The kernels have not run on a GPU yet.
"""

from __future__ import annotations

import functools
import types

import torch

from . import _backend
from ._checks import check_mask

#: Voxels one CUDA block labels in shared memory, (x, y, z), by mode: ``in_plane`` → tile.
#: z is the contiguous axis, so a tile spans many z for coalesced reads; in-plane labelling
#: joins nothing along z, so its tiles are wider in x and y. Not tuned on a GPU yet.
TILES: dict[bool, tuple[int, int, int]] = {False: (4, 4, 32), True: (8, 8, 16)}

#: The sources ``csrc/`` compiles into the extension, in that folder.
SOURCES = ("ccl.cu", "ccl_binding.cpp")

#: The name of the compiled module (and of its build folder).
EXTENSION_NAME = "fastcascade_ccl"


@functools.cache
def extension() -> types.ModuleType:
    """The compiled module, built from :data:`SOURCES` on the first call (then cached by
    PyTorch on disk and here in memory). Raises ``BackendUnavailableError`` naming what is
    missing where it cannot be built."""
    missing = _backend.cuda_extension_missing()
    if missing is not None:
        raise _backend.BackendUnavailableError(f"compiling csrc/ needs {missing}")
    from torch.utils.cpp_extension import load

    folder = _backend.csrc_dir()
    return load(
        name=EXTENSION_NAME,
        sources=[str(folder / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
    )


@torch.library.custom_op("fastcascade::label_components", mutates_args=())
def label_components(mask: torch.Tensor, in_plane: bool, invert: bool) -> torch.Tensor:
    """The registered op behind :func:`label` (no argument checks of its own beyond the
    extension's)."""
    tile = TILES[in_plane]
    return extension().label(mask, in_plane, invert, *tile)


@label_components.register_fake
def _label_components_fake(mask: torch.Tensor, in_plane: bool, invert: bool) -> torch.Tensor:
    return torch.empty_like(mask, dtype=torch.int32, memory_format=torch.contiguous_format)


def label(mask: torch.Tensor, in_plane: bool = False, invert: bool = False) -> torch.Tensor:
    """int32 labels ``(x, y, z)`` of the components of a bool CUDA volume.

    ``mask``: bool ``(x, y, z)`` on a CUDA device, fewer than 2³¹ − 1 voxels (a
    non-contiguous tensor is copied first). Returns int32 ``(x, y, z)`` on the same device:
    1 + the smallest C-order index of the voxel's component, 0 where the voxel is not
    labelled. ``in_plane``: join x and y neighbours only (each z slice on its own);
    ``invert``: label the False voxels.

    >>> labels = label(mask.cuda())  # doctest: +SKIP
    """
    check_mask(mask, "label")
    _backend.resolve("cuda", mask, candidates=("cuda",))  # raises, naming what is missing
    return label_components(mask.contiguous(), bool(in_plane), bool(invert))
