"""Body mask C1: HU threshold, hole filling per axial slice, largest 3D component.

Four implementations of hole filling and connected-component labelling, one result:

``scipy``  ``scipy.ndimage`` on the host: the CPU path and the reference. For a CUDA
           tensor it costs one round trip of the boolean mask (one byte per voxel each
           way); nothing moves for a CPU tensor.
``cupy``   ``cupyx.scipy.ndimage.label`` on the tensor's GPU, shared with PyTorch through
           DLPack (no copy, PyTorch's current stream); needs ``fastcascade[gpu]``.
``torch``  labelling in PyTorch ops on the tensor's device (below), for a GPU without
           CuPy. It runs on the CPU too, slower than SciPy there
           (``benchmarks/bench_morphology.py`` times both), so that the tests prove it.
``cuda``   fastcascade's own CUDA kernels (``csrc/ccl.cu``, :mod:`fastcascade.ops.ccl`):
           block-based union-find on the tensor's GPU, compiled on first use; CUDA
           tensors only, no host sync. Asked for by name only: it has not run on a GPU
           yet, and ``"auto"`` will take it once a GPU run has checked it and timed it
           against CuPy.

``backend="auto"`` takes ``scipy`` for a CPU tensor, and for a CUDA tensor ``cupy`` where
CuPy is installed, else ``torch``: on a GPU nothing leaves the device.

The PyTorch labelling gives every voxel of a component the component's smallest C-order
index. Each round takes the minimum over every run of the mask along each connected axis
(one ``scatter_reduce`` over run ids computed once, so a label crosses a whole run at
once), then jumps each label to the label of the voxel it names (a voxel of the same
component, whose label is never larger). Labels only decrease and stay inside their
component, so the loop ends, and when a round changes nothing every run, hence every
component, holds one label: its minimum. Rounds run in groups of
:data:`ROUNDS_PER_CHECK`; after each group one host sync asks whether its last round
changed anything. The number of rounds grows with the longest chain of runs a component
needs (a handful on abdominal scans; the tests and ``benchmarks/bench_morphology.py``
record the host reads): a few syncs on this path, none with ``scipy`` (whose round trip
is one transfer each way), and CuPy reads its component count internally, twice. The
``cuda`` kernels and the steps after them read nothing back.

Exactness: every backend returns exactly what the SciPy reference returns (bit-exact
masks); the tests also compare them with plain-Python flood fill and labelling.

Connectivity: a hole is a background region of one axial slice that is not 4-connected
(in-plane edge neighbours, SciPy's default 2D structure) to the slice's border; body
components are 6-connected in 3D (face neighbours, SciPy's default 3D structure). Among
largest components of equal size, the one whose first voxel comes first in C order wins
(SciPy's lowest label).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from . import _backend, ccl
from ._checks import check_mask

#: The ``backend`` values every function here takes.
BACKENDS = ("auto", "scipy", "cupy", "torch", "cuda")

#: Labelling rounds between two convergence checks (one host sync each) of the PyTorch path.
ROUNDS_PER_CHECK = 4

# In-plane 4-connectivity inside a 3D array: neighbours along x and y only, never along z,
# so that labelling the background of a volume labels each axial slice on its own.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)
_IN_PLANE_AXES = (0, 1)
_ALL_AXES = (0, 1, 2)


def resolve_backend(backend: str, tensor: torch.Tensor, op: str = "body_mask") -> str:
    """The backend the functions here run ``tensor`` with for ``backend`` (see the module
    docstring); a named backend that cannot run raises, naming what to install."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not _backend.on_cuda(tensor):
            return "scipy"
        return "cupy" if _backend.available("cupy", tensor) else "torch"
    if backend in ("cupy", "cuda"):
        return _backend.resolve(backend, tensor, candidates=(backend,))  # raises if unusable
    return backend


def _check_image(image_hu: torch.Tensor, op: str) -> None:
    if not isinstance(image_hu, torch.Tensor):
        raise TypeError(f"{op}: image_hu must be a torch.Tensor, got {type(image_hu).__name__}")
    if image_hu.dtype == torch.bool or image_hu.is_complex():
        raise TypeError(
            f"{op}: image_hu must hold real HU values (float or integer), got {image_hu.dtype}"
        )
    if image_hu.dim() != 3:
        raise ValueError(f"{op}: image_hu must be 3D (x, y, z), got shape {tuple(image_hu.shape)}")


def _to_host(mask: torch.Tensor) -> np.ndarray:
    return mask.detach().cpu().numpy()


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


# --- SciPy implementation on host arrays (the CPU path) -----------------------------------


def _fill_holes_2d_np(mask: np.ndarray) -> np.ndarray:
    """Per-slice hole filling in one labelling pass over the whole volume.

    Labels the background with in-plane connectivity; the regions that touch the x or y
    border of their slice are outside, every other background region is a hole. Equal to
    ``binary_fill_holes`` slice by slice (tested), with one SciPy call instead of one per
    slice.
    """
    labels, count = ndimage.label(~mask, structure=_IN_PLANE)
    if count == 0:
        return mask.copy()
    outside = np.zeros(count + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[face] = True
    outside[0] = True  # label 0 is the foreground itself
    return mask | ~outside[labels]


def _largest_component_np(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # np.argmax returns the first maximum: among components of equal size the lowest
    # label wins, i.e. the one whose first voxel comes first in C order (x, then y, then z).
    return labels == int(np.argmax(sizes))


def _scipy_on_host(fn, mask: torch.Tensor) -> torch.Tensor:
    return _to_device(fn(_to_host(mask)), mask.device)


# --- labelling on the tensor's device (PyTorch; CuPy) --------------------------------------


def _runs(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Flat int64 ids, in ``mask``'s own C order, of the runs of ``mask`` along ``axis``:
    one id per maximal line segment of True voxels (1, 2, ...), 0 outside ``mask``."""
    inside = mask.movedim(axis, -1).contiguous()
    starts = inside.clone()
    starts[..., 1:] &= ~inside[..., :-1]  # a run starts where a line enters the mask
    run = torch.where(inside, torch.cumsum(starts.view(-1), 0).view(inside.shape), 0)
    return run.movedim(-1, axis).contiguous().view(-1)


def _label_torch(mask: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """int64 labels of the components of contiguous ``mask`` (face neighbours along
    ``axes``): 1 + the smallest C-order index of the component, 0 outside ``mask``."""
    n = mask.numel()
    runs = [_runs(mask, axis) for axis in axes]  # the mask's runs never change
    labels = torch.where(mask.view(-1), torch.arange(1, n + 1, device=mask.device), 0)
    smallest = torch.empty(n + 1, dtype=torch.int64, device=mask.device)
    zero = labels.new_zeros(1)
    while True:
        for _ in range(ROUNDS_PER_CHECK):
            before = labels
            for run in runs:
                # Run 0 collects the background's zeros, so the background stays 0.
                smallest.scatter_reduce_(0, run, labels, "amin", include_self=False)
                labels = smallest[run]
            labels = torch.cat([zero, labels])[labels]  # jump: label L → label of voxel L-1
        # A round that changes nothing has reached the fixed point. One host sync.
        if not bool((labels != before).any()):
            return labels.view(mask.shape)


def _label_cupy(mask: torch.Tensor, structure: np.ndarray | None) -> torch.Tensor:
    """Labels of ``mask``'s components by ``cupyx.scipy.ndimage.label`` on its GPU, as an
    int32 CUDA tensor (0 outside ``mask``), computed on PyTorch's current stream."""
    import cupy
    from cupyx.scipy import ndimage as cupy_ndimage

    device = mask.device
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        image = cupy.from_dlpack(mask.contiguous().view(torch.uint8))
        labels, _ = cupy_ndimage.label(image, structure=structure)  # reads its count: a sync
        return torch.from_dlpack(labels)


def _label(mask: torch.Tensor, backend: str, in_plane: bool, invert: bool) -> torch.Tensor:
    """Labels of the components of contiguous ``mask`` (of ``~mask`` with ``invert``)."""
    if backend == "cuda":
        return ccl.label_components(mask, in_plane, invert)  # reads the mask as it is
    if invert:
        mask = ~mask
    if backend == "cupy":
        return _label_cupy(mask, _IN_PLANE if in_plane else None)
    return _label_torch(mask, _IN_PLANE_AXES if in_plane else _ALL_AXES)


def _fill_from_labels(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mask`` plus every background component (``labels`` of ``~mask``) that has no voxel
    on the x or y border of the volume."""
    border = torch.zeros_like(mask)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    labels = labels.reshape(-1).long()
    touches = torch.zeros(mask.numel() + 1, dtype=torch.int32, device=mask.device)
    touches.scatter_add_(0, labels, (border & ~mask).view(-1).to(torch.int32))
    outside = (touches[labels] > 0).view(mask.shape) & ~mask
    return ~outside


def _largest_from_labels(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The largest component of ``labels`` (0 = background); among equal sizes the one whose
    first voxel comes first in C order. All on the device, no host sync."""
    n = mask.numel()
    labels = labels.reshape(-1).long()
    sizes = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    sizes.scatter_add_(0, labels, torch.ones_like(labels))
    sizes[0] = 0
    first = torch.full((n + 1,), n, dtype=torch.int64, device=mask.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=mask.device), "amin")
    first = torch.where(sizes == sizes.max(), first, n + 1)
    first[0] = n + 1
    winner = torch.argmin(first)
    return (labels == winner).view(mask.shape) & mask


def _fill_holes_device(mask: torch.Tensor, backend: str) -> torch.Tensor:
    mask = mask.contiguous()
    if mask.numel() == 0:
        return mask.clone()
    return _fill_from_labels(mask, _label(mask, backend, in_plane=True, invert=True))


def _largest_component_device(mask: torch.Tensor, backend: str) -> torch.Tensor:
    mask = mask.contiguous()
    return _largest_from_labels(mask, _label(mask, backend, in_plane=False, invert=False))


# --- references: SciPy as documented, slice by slice -------------------------------------


def fill_holes_2d_ref(mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fill_holes_2d`: ``scipy.ndimage.binary_fill_holes`` per z slice."""
    check_mask(mask, "fill_holes_2d_ref")
    host = _to_host(mask)
    out = np.empty_like(host)
    for k in range(host.shape[2]):
        out[:, :, k] = ndimage.binary_fill_holes(host[:, :, k])
    return _to_device(out, mask.device)


def largest_component_ref(mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`largest_component`: ``scipy.ndimage.label`` and a size count."""
    check_mask(mask, "largest_component_ref")
    return _scipy_on_host(_largest_component_np, mask)


def body_mask_ref(image_hu: torch.Tensor, threshold: float = -300.0) -> torch.Tensor:
    """Reference for :func:`body_mask`: threshold, per-slice ``binary_fill_holes``, largest
    component, all in NumPy/SciPy on the host; the result returns to the input's device."""
    _check_image(image_hu, "body_mask_ref")
    above = _to_host(image_hu) > threshold
    filled = np.empty_like(above)
    for k in range(above.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(above[:, :, k])
    return _to_device(_largest_component_np(filled), image_hu.device)


# --- public functions --------------------------------------------------------------------


def fill_holes_2d(mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Fill the holes of each axial slice ``mask[:, :, k]`` of a boolean volume.

    ``mask``: bool ``(x, y, z)`` on any device. Returns bool ``(x, y, z)`` on the same
    device: ``mask`` plus every background region of a slice that is not 4-connected to
    that slice's x/y border. ``backend``: ``"auto"``, ``"scipy"``, ``"cupy"``,
    ``"torch"`` or ``"cuda"`` (see the module; all give the same mask).

    >>> m = torch.ones(5, 5, 2, dtype=torch.bool)
    >>> m[2, 2, :] = False
    >>> bool(fill_holes_2d(m).all())
    True
    """
    check_mask(mask, "fill_holes_2d")
    chosen = resolve_backend(backend, mask, "fill_holes_2d")
    if chosen == "scipy":
        return _scipy_on_host(_fill_holes_2d_np, mask)
    return _fill_holes_device(mask, chosen)


def largest_component(mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Keep the largest 6-connected component of a boolean volume.

    ``mask``: bool ``(x, y, z)`` on any device. Returns bool ``(x, y, z)`` on the same
    device; all False when ``mask`` is empty. Ties between components of equal size go to
    the component whose first voxel comes first in C order (lowest index along x, then y,
    then z), which is SciPy's lowest label. ``backend``: ``"auto"``, ``"scipy"``,
    ``"cupy"``, ``"torch"`` or ``"cuda"`` (see the module; all give the same mask).

    >>> m = torch.zeros(6, 1, 1, dtype=torch.bool)
    >>> m[0], m[2:4] = True, True
    >>> largest_component(m).flatten().tolist()
    [False, False, True, True, False, False]
    """
    check_mask(mask, "largest_component")
    chosen = resolve_backend(backend, mask, "largest_component")
    if chosen == "scipy":
        return _scipy_on_host(_largest_component_np, mask)
    return _largest_component_device(mask, chosen)


def body_mask(
    image_hu: torch.Tensor, threshold: float = -300.0, backend: str = "auto"
) -> torch.Tensor:
    """The body mask C1 of a CT volume in canonical RAS orientation.

    ``image_hu``: ``(x, y, z)`` in HU (float or integer dtype), axis 2 superior, on any
    device. Returns bool ``(x, y, z)`` on the same device:

    1. voxels strictly above ``threshold`` HU (NaN is below);
    2. holes filled per axial slice (:func:`fill_holes_2d`);
    3. the largest 6-connected 3D component (:func:`largest_component`).

    Hole filling is 2D on purpose: lungs and bowel gas that reach the first or last slice
    of the field of view are open to the volume's border along z, so a 3D fill would leave
    them out of the body, while within each axial slice the skin closes around them.

    No voxel above the threshold gives an all-False mask (no error). The threshold runs on
    the device; with ``backend="scipy"`` (the CPU default) steps 2 and 3 share one host
    round trip of the boolean mask, with ``"cupy"`` or ``"torch"`` (a GPU's default) or
    ``"cuda"`` everything stays on the device.

    >>> ct = torch.full((8, 8, 4), -1000.0)
    >>> ct[2:6, 2:6, :] = 40.0
    >>> ct[3:5, 3:5, :] = -900.0  # air inside the body: filled
    >>> int(body_mask(ct).sum())
    64
    """
    _check_image(image_hu, "body_mask")
    chosen = resolve_backend(backend, image_hu, "body_mask")
    above = image_hu > float(threshold)
    if chosen == "scipy":
        return _scipy_on_host(lambda m: _largest_component_np(_fill_holes_2d_np(m)), above)
    return _largest_component_device(_fill_holes_device(above, chosen), chosen)
