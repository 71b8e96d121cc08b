"""On-the-fly augmentation: the paper's random elastic + rigid warp of image and labels.

Roth et al. (2018): a cubic B-spline elastic deformation (control points every 32 voxels,
displacements up to ±4 voxels), rotations of ±5° and translations of ±20 voxels, image
resampled trilinearly and labels by nearest neighbour (``fastcascade.ops.warp``).

Every random number comes from the ``torch.Generator`` the caller passes, so a training
run is reproducible and resumes bit-identically from a saved generator state. Each call
draws the same count of numbers whatever the outcome of the ``p`` coin, so the stream does
not drift between runs that differ only in ``p``-decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AIR_HU
from ..ops.warp import control_grid_shape, elastic_affine_warp

__all__ = ["Augmenter", "WarpParams"]


@dataclass(frozen=True)
class WarpParams:
    """One draw of the augmentation's parameters, on the generator's device.

    ``apply``: whether the warp is applied at all (probability ``p``).
    ``rotation_deg``: ``(3,)`` float32, degrees about x, y, z (composed ``Rz @ Ry @ Rx``).
    ``translation_vox``: ``(3,)`` float32, voxels along x, y, z.
    ``control_displacements``: ``(3, gx, gy, gz)`` float32, voxels, the B-spline control
    grid of ``fastcascade.ops.warp.control_grid_shape(shape, grid_spacing)``.
    """

    apply: bool
    rotation_deg: torch.Tensor
    translation_vox: torch.Tensor
    control_displacements: torch.Tensor


def _check_bound(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


class Augmenter:
    """Random elastic deformation + rotation + translation of a training volume.

    Parameters (all drawn uniformly and independently per call):

    - ``grid_spacing``: B-spline control-point spacing in voxels (paper: 32).
    - ``max_displacement``: each component of each control point's displacement is drawn
      in ``[-max_displacement, max_displacement]`` voxels (paper: 4).
    - ``max_rotation_deg``: each of the three angles in ``[-max, max]`` degrees (paper: 5).
    - ``max_translation_vox``: each translation component in ``[-max, max]`` voxels
      (paper: 20).
    - ``p``: probability of warping at all; otherwise the inputs come back unchanged (the
      same tensor objects).
    - ``fill_value`` (HU, default air) and ``label_fill`` (default background) fill what
      comes from outside the volume: augment in HU, before the intensity window.
    - ``backend``: passed to ``elastic_affine_warp`` (``"auto"``: Triton on CUDA tensors).

    Voxels are those of the working grid the volume is on; rotations act on voxel indices.

    >>> aug = Augmenter()
    >>> image = torch.full((1, 16, 16, 16), -100.0)
    >>> labels = torch.zeros(16, 16, 16, dtype=torch.uint8)
    >>> out, out_labels = aug(image, labels, torch.Generator().manual_seed(0))
    >>> out.shape, out_labels.dtype
    (torch.Size([1, 16, 16, 16]), torch.uint8)
    """

    def __init__(
        self,
        grid_spacing: float = 32,
        max_displacement: float = 4.0,
        max_rotation_deg: float = 5.0,
        max_translation_vox: float = 20.0,
        p: float = 1.0,
        *,
        fill_value: float = AIR_HU,
        label_fill: int = 0,
        backend: str = "auto",
    ):
        self.grid_spacing = _check_bound("grid_spacing", grid_spacing)
        if self.grid_spacing == 0:
            raise ValueError("grid_spacing must be > 0 voxels, got 0")
        self.max_displacement = _check_bound("max_displacement", max_displacement)
        self.max_rotation_deg = _check_bound("max_rotation_deg", max_rotation_deg)
        self.max_translation_vox = _check_bound("max_translation_vox", max_translation_vox)
        self.p = _check_bound("p", p)
        if self.p > 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.fill_value = float(fill_value)
        self.label_fill = int(label_fill)
        self.backend = backend

    def __repr__(self) -> str:
        return (
            f"Augmenter(grid_spacing={self.grid_spacing:g}, "
            f"max_displacement={self.max_displacement:g}, "
            f"max_rotation_deg={self.max_rotation_deg:g}, "
            f"max_translation_vox={self.max_translation_vox:g}, p={self.p:g})"
        )

    def sample_params(self, shape, generator: torch.Generator) -> WarpParams:
        """Draw one set of parameters for a volume of ``shape`` ``(x, y, z)`` voxels.

        Uses ``generator`` only (on its own device), always in the same order: the ``p``
        coin (1 number), rotation (3), translation (3), control displacements
        (``3 * gx * gy * gz``).

        >>> aug = Augmenter(max_rotation_deg=5.0)
        >>> params = aug.sample_params((40, 40, 40), torch.Generator().manual_seed(0))
        >>> tuple(params.control_displacements.shape), bool(params.rotation_deg.abs().max() <= 5)
        ((3, 5, 5, 5), True)
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator)}")
        grid = control_grid_shape(tuple(shape), self.grid_spacing)

        def uniform(size, bound):
            u = torch.rand(size, generator=generator, device=generator.device)
            return (2.0 * u - 1.0) * bound

        coin = torch.rand(1, generator=generator, device=generator.device)
        rotation = uniform((3,), self.max_rotation_deg)
        translation = uniform((3,), self.max_translation_vox)
        control = uniform((3, *grid), self.max_displacement)
        return WarpParams(
            apply=bool(coin.item() < self.p),
            rotation_deg=rotation,
            translation_vox=translation,
            control_displacements=control,
        )

    def __call__(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Warp ``image`` ``(C, x, y, z)`` (float, HU) and ``labels`` ``(x, y, z)`` (integer
        or ``None``) by parameters drawn from ``generator``; returns the same shapes and
        dtypes on the image's device."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(
                f"image must be a (C, x, y, z) tensor, got {getattr(image, 'shape', image)!r}"
            )
        params = self.sample_params(tuple(image.shape[1:]), generator)
        return self.apply(image, labels, params)

    def apply(
        self, image: torch.Tensor, labels: torch.Tensor | None, params: WarpParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Warp by given parameters (from ``sample_params`` for this volume's shape)."""
        if not params.apply:
            return image, labels
        device = image.device
        return elastic_affine_warp(
            image,
            labels,
            params.rotation_deg,
            params.translation_vox,
            params.control_displacements.to(device),
            grid_spacing=self.grid_spacing,
            fill_value=self.fill_value,
            label_fill=self.label_fill,
            backend=self.backend,
        )
