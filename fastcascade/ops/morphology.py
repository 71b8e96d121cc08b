"""Body mask C1: HU threshold, hole filling per axial slice, largest 3D component.

The threshold runs on the tensor's device. Hole filling and connected-component labelling
have one implementation, SciPy's (``scipy.ndimage``), so those steps do one documented
round trip: the boolean mask goes to the host once, the result comes back once (one byte
per voxel each way; nothing moves for a CPU tensor).

Exactness: every function here returns exactly what its SciPy reference returns (bit-exact
masks); the tests also compare both with plain-Python flood fill and labelling.

Connectivity: a hole is a background region of one axial slice that is not 4-connected
(in-plane edge neighbours, SciPy's default 2D structure) to the slice's border; body
components are 6-connected in 3D (face neighbours, SciPy's default 3D structure).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ._checks import check_mask

_BACKENDS = ("auto", "scipy")

# In-plane 4-connectivity inside a 3D array: neighbours along x and y only, never along z,
# so that labelling the background of a volume labels each axial slice on its own.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def _check_backend(backend: str, op: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(
            f"{op}: backend must be one of {_BACKENDS}, got {backend!r} (hole filling and "
            "connected components exist only as SciPy code for now)"
        )


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
    return _to_device(_largest_component_np(_to_host(mask)), mask.device)


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
    that slice's x/y border. One host round trip (SciPy); ``backend``: ``"auto"`` or
    ``"scipy"`` (the same thing for now).

    >>> m = torch.ones(5, 5, 2, dtype=torch.bool)
    >>> m[2, 2, :] = False
    >>> bool(fill_holes_2d(m).all())
    True
    """
    _check_backend(backend, "fill_holes_2d")
    check_mask(mask, "fill_holes_2d")
    return _to_device(_fill_holes_2d_np(_to_host(mask)), mask.device)


def largest_component(mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Keep the largest 6-connected component of a boolean volume.

    ``mask``: bool ``(x, y, z)`` on any device. Returns bool ``(x, y, z)`` on the same
    device; all False when ``mask`` is empty. Ties between components of equal size go to
    the component whose first voxel comes first in C order (lowest index along x, then y,
    then z), which is SciPy's lowest label. One host round trip (SciPy); ``backend``:
    ``"auto"`` or ``"scipy"``.

    >>> m = torch.zeros(6, 1, 1, dtype=torch.bool)
    >>> m[0], m[2:4] = True, True
    >>> largest_component(m).flatten().tolist()
    [False, False, True, True, False, False]
    """
    _check_backend(backend, "largest_component")
    check_mask(mask, "largest_component")
    return _to_device(_largest_component_np(_to_host(mask)), mask.device)


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
    the device; steps 2 and 3 share one host round trip of the boolean mask (SciPy).
    ``backend``: ``"auto"`` or ``"scipy"``.

    >>> ct = torch.full((8, 8, 4), -1000.0)
    >>> ct[2:6, 2:6, :] = 40.0
    >>> ct[3:5, 3:5, :] = -900.0  # air inside the body: filled
    >>> int(body_mask(ct).sum())
    64
    """
    _check_backend(backend, "body_mask")
    _check_image(image_hu, "body_mask")
    above = _to_host(image_hu > float(threshold))
    return _to_device(_largest_component_np(_fill_holes_2d_np(above)), image_hu.device)
