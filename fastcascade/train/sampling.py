"""Training sub-volumes: centres drawn uniformly from a mask, fixed-size crops around them.

A centre is a voxel drawn uniformly at random from the voxels of a mask (C1, the body,
for stage 1; C2, the candidate region, for stage 2) with the sampler's own
``torch.Generator``. The image crop is the network's input size around it; the label and
region crops are the network's output region, i.e. the central ``output_size`` voxels of
the input crop (the same box for ``padding="same"``). Where a crop leaves the volume the
image is padded with air (-1024 HU), labels with 0 and the region with False, so padded
voxels never count in the loss.

Fields of view that cut organs. A scan often ends inside an organ (case E's kidneys and
pancreas at its lowest slice). Near such a face the labels say "organ up to the last
slice, then nothing", and a reference segmentation made by a model is least reliable
there; learning from those voxels teaches the network that an organ ends where a scan
does. The rule: a face of the volume is *cut* when labelled foreground (a class id > 0)
touches it, and the ``margin`` voxels next to a cut face (the slices at index distance
``0 .. margin - 1`` from it) are left out of the loss; centres may still be drawn there
and the image there is still seen as context. ``cut_distance`` gives each voxel its
distance to the nearest cut face, ``cut_border_mask`` the voxels that count; a source
whose draws move the scan's content (``anatomy.SynthSource`` deforms its label maps)
hands the deformed distance along in ``Volume.cut_distance``.

All sizes and coordinates are voxels of the working grid, axes ``(x, y, z)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..config import AIR_HU

Box = tuple[int, int, int]

#: ``cut_distance`` where no face is cut: voxels, finite so that it can be interpolated.
NO_CUT = 1.0e4


def cut_faces(labels: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The faces of ``labels`` (``(x, y, z)`` class ids) that labelled foreground touches,
    as ``(axis, side)`` pairs, side 0 the face at index 0 and side 1 the face at the end.

    >>> labels = torch.zeros(4, 4, 4, dtype=torch.uint8)
    >>> labels[1:3, 1:3, 0:2] = 1  # an organ running out of the bottom slice
    >>> cut_faces(labels)
    ((2, 0),)
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (x, y, z), got shape {tuple(labels.shape)}")
    fg = labels > 0
    return tuple(
        (axis, side)
        for axis in range(3)
        for side in (0, 1)
        if bool(fg.select(axis, 0 if side == 0 else -1).any())
    )


def cut_distance(labels: torch.Tensor) -> torch.Tensor:
    """Per voxel, the index distance (voxels) to the nearest cut face of ``labels``
    (``cut_faces``): 0 on the face's own slice, ``NO_CUT`` where no face is cut.

    Returns float32 ``(x, y, z)`` on ``labels``' device.

    >>> labels = torch.zeros(1, 1, 4, dtype=torch.uint8)
    >>> labels[0, 0, 3] = 5  # the top face is cut
    >>> cut_distance(labels).flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
    """
    out = torch.full(labels.shape, NO_CUT, dtype=torch.float32, device=labels.device)
    for axis, side in cut_faces(labels):
        n = labels.shape[axis]
        index = torch.arange(n, dtype=torch.float32, device=labels.device)
        dist = index if side == 0 else (n - 1) - index
        view = [1, 1, 1]
        view[axis] = n
        out = torch.minimum(out, dist.view(view))
    return out


def cut_border_mask(distance: torch.Tensor, margin: int) -> torch.Tensor:
    """The voxels that count in the loss: bool, True where ``distance`` (``cut_distance``,
    voxels) is at least ``margin`` voxels; all True for ``margin`` 0.

    >>> labels = torch.zeros(1, 1, 5, dtype=torch.uint8)
    >>> labels[0, 0, :2] = 1  # cut at the bottom
    >>> cut_border_mask(cut_distance(labels), 2).flatten().tolist()
    [False, False, True, True, True]
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an integer >= 0 voxels, got {margin!r}")
    return distance >= margin


def crop(volume: torch.Tensor, start: Sequence[int], size: Sequence[int], fill=0) -> torch.Tensor:
    """The box ``[start, start + size)`` of the last three axes of ``volume``, padded with
    ``fill`` where it leaves the volume.

    ``volume``: ``(..., x, y, z)`` any dtype; ``start`` may be negative. Returns a new
    contiguous tensor ``(..., *size)`` of ``volume``'s dtype and device.

    >>> crop(torch.arange(4.0).view(1, 1, 4), (0, 0, -1), (1, 1, 3), fill=-1.0)
    tensor([[[-1.,  0.,  1.]]])
    """
    if len(start) != 3 or len(size) != 3:
        raise ValueError(f"start and size must have three entries (x, y, z), got {start}, {size}")
    if volume.dim() < 3:
        raise ValueError(f"volume must be (..., x, y, z), got shape {tuple(volume.shape)}")
    out = torch.full((*volume.shape[:-3], *size), fill, dtype=volume.dtype, device=volume.device)
    src, dst = [], []
    for s0, n, extent in zip(start, size, volume.shape[-3:], strict=True):
        lo, hi = max(s0, 0), min(s0 + n, extent)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    out[(..., *dst)] = volume[(..., *src)]
    return out


class Patch(NamedTuple):
    """One training sub-volume.

    ``image_hu``: float32 ``input_size`` (HU); ``labels``: uint8 ``output_size``;
    ``region``: bool ``output_size`` (the part of C inside the output box); ``centre``:
    the drawn voxel ``(x, y, z)`` in the volume's coordinates.
    """

    image_hu: torch.Tensor
    labels: torch.Tensor
    region: torch.Tensor
    centre: Box


#: ``transform(image (C, x, y, z) float32, labels (x, y, z) uint8) -> (image, labels)``,
#: applied to a context crop (e.g. ``augment.Augmenter`` with its generator bound).
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SubvolumeSampler:
    """Draws training sub-volumes from a volume and a mask.

    ``input_size``: the network's input ``(x, y, z)``; ``output_size``: its output
    (``UNet3D.output_size(input_size)``; default: equal to ``input_size``, i.e.
    ``padding="same"``). ``context``: voxels added on every side of the crop that a
    ``transform`` (augmentation) sees, so that rotated or warped content comes from the
    scan rather than from padding. ``seed`` seeds the sampler's own generator.

    ``state_dict()`` / ``load_state_dict()`` hold the generator state and the number of
    patches drawn (plain tensors and ints, ``torch.load(weights_only=True)``-safe).

    >>> s = SubvolumeSampler((4, 4, 4), seed=0)
    >>> p = s.sample(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8, dtype=torch.uint8),
    ...              torch.ones(8, 8, 8, dtype=torch.bool))
    >>> tuple(p.image_hu.shape), tuple(p.labels.shape), s.drawn
    ((4, 4, 4), (4, 4, 4), 1)
    """

    def __init__(
        self,
        input_size: Sequence[int],
        output_size: Sequence[int] | None = None,
        seed: int = 0,
        context: int = 0,
    ):
        self.input_size = _size3(input_size, "input_size")
        self.output_size = _size3(output_size or input_size, "output_size")
        if any(
            o > i or (i - o) % 2 for i, o in zip(self.input_size, self.output_size, strict=True)
        ):
            raise ValueError(
                f"output_size {self.output_size} must be centred in input_size "
                f"{self.input_size} (not larger, an even difference per axis)"
            )
        if context < 0:
            raise ValueError(f"context must be >= 0 voxels, got {context}")
        self.context = int(context)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.drawn = 0

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": self.drawn, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.drawn = int(state["drawn"])
        self.generator.set_state(state["generator"])

    # -- sampling -------------------------------------------------------------------
    def draw_centre(self, mask: torch.Tensor) -> Box:
        """A voxel of ``mask`` (bool ``(x, y, z)``), uniformly at random."""
        if mask.dtype != torch.bool or mask.dim() != 3:
            raise ValueError(
                f"mask must be a bool (x, y, z) tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        flat = mask.reshape(-1).nonzero().squeeze(1)
        if flat.numel() == 0:
            raise ValueError("cannot draw a sub-volume centre: the mask is empty")
        k = int(torch.randint(flat.numel(), (1,), generator=self.generator))
        index = int(flat[k])
        _, ny, nz = mask.shape
        self.drawn += 1
        return (index // (ny * nz), (index // nz) % ny, index % nz)

    def sample(
        self,
        image_hu: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        region: torch.Tensor | None = None,
        transform: Transform | None = None,
    ) -> Patch:
        """Draw a centre from ``mask`` and crop ``image_hu``, ``labels`` and ``region``.

        ``image_hu``: float32 ``(x, y, z)`` HU; ``labels``: uint8 ``(x, y, z)``;
        ``mask``: bool ``(x, y, z)`` where centres may lie; ``region``: bool, the voxels
        the loss counts (default: ``mask``). With a ``transform`` the crop is taken with
        ``context`` voxels of margin, transformed -- the region travelling as a second
        image channel, linearly interpolated and thresholded at 0.5 -- and cut back to
        the input size.
        """
        if image_hu.shape != labels.shape or image_hu.shape != mask.shape:
            raise ValueError(
                f"image_hu, labels and mask must share one shape (x, y, z), got "
                f"{tuple(image_hu.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
            )
        region = mask if region is None else region
        centre = self.draw_centre(mask)
        start = tuple(c - n // 2 for c, n in zip(centre, self.input_size, strict=True))
        inner = tuple((i - o) // 2 for i, o in zip(self.input_size, self.output_size, strict=True))
        if transform is None:
            out_start = tuple(s + m for s, m in zip(start, inner, strict=True))
            return Patch(
                crop(image_hu, start, self.input_size, AIR_HU),
                crop(labels, out_start, self.output_size, 0),
                crop(region, out_start, self.output_size, False),
                centre,
            )
        c = self.context
        big_start = tuple(s - c for s in start)
        big_size = tuple(n + 2 * c for n in self.input_size)
        image = torch.stack(
            [
                crop(image_hu.float(), big_start, big_size, AIR_HU),
                crop(region, big_start, big_size, False).float(),
            ]
        )
        image, warped_labels = transform(image, crop(labels, big_start, big_size, 0))
        in_start = (c, c, c)
        out_start = tuple(c + m for m in inner)
        return Patch(
            crop(image[0], in_start, self.input_size, AIR_HU),
            crop(warped_labels.to(torch.uint8), out_start, self.output_size, 0),
            crop(image[1], out_start, self.output_size, 0.0) > 0.5,
            centre,
        )


def _size3(size: Sequence[int], name: str) -> Box:
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"{name} must be three positive voxel counts (x, y, z), got {size}")
    return size
