"""One stage's network passes: as few as memory allows, each as large as it allows.

:func:`run_stage` runs a stage either on tiles of the model's trained input size
(``options.inference == "tiles"``, :mod:`fastcascade.tiling`) or on **slabs**: network
inputs as large as the memory budget allows over the stage's region.

Geometry (per axis; a U-Net of ``L`` levels pools ``L - 1`` times, period ``P = 2^(L-1)``):

- **Valid padding** (the paper's network): the output is the input less a constant
  ``margin`` on each side, and the network commutes with shifts by multiples of ``P``. A
  pass's *phase* is its first output voxel modulo ``P``; today's tiles start their lattice
  at voxel 0, so phase 0 is theirs. Slab outputs equal those of small tiles at the same
  phase up to floating-point summation order. The paper's 132→44 tiles step by 44 ≡ 4
  (mod 8), so neighbouring tiles alternate phase and agree with a slab only on every
  other tile.
- **Same padding** (the default model): the output sits on the input, and a voxel
  depends on the input within :func:`receptive_margin` voxels. A pass at phase ``d``
  equals one pass over the whole scan padded with air to a window starting at the
  largest position ≤ 0 that is ≡ ``d`` (mod ``P``) (the frame); a slab reads its region
  plus that margin, clipped to the frame, so only the frame's edges (the scan's own,
  less than ``P`` voxels out) are padded, and keeps the region.
- **Overlap** (the paper's 4x): four passes over the same region at phases
  ``(0, 0, 0)``, ``(h, 0, 0)``, ``(0, h, 0)``, ``(h, h, 0)`` with ``h = P / 2``: where
  overlapping tiles gave a valid network new predictions only through new pooling
  phases, each voxel now gets exactly these four, averaged in fp32 (weights: constant,
  or each pass's Gaussian map over its output, :func:`~fastcascade.ops.stitch.tile_weight`).

Planning: the stage's boxes are the bounding box of its mask (``skip_empty``; the whole
grid otherwise), or, where the mask falls apart into parts separated by empty planes
along an axis, one box per part when their slabs read fewer input voxels in total. Each
box is cut into equal regions, one more along the axis where that saves most memory,
until one pass fits the budget (:func:`pass_bytes`; without a budget, until no
activation exceeds :data:`MAX_ELEMENTS`); every region is computed at every phase, its
accumulators finalised, and the next region follows, so regions never overlap and each
voxel keeps one prediction per phase (what a slab computes beyond its region, its
margins and lattice rounding, is cropped; ``voxels_computed`` counts it). On a GPU
out-of-memory error (that error only) the failing region is halved along its longest
axis (the one whose halving shrinks the slab most) and retried; results are unchanged.

Host syncs: one read per stage with ``skip_empty`` (the mask's three 2D projections,
from which boxes and empty regions are decided on the host), none without.

>>> import torch
>>> from fastcascade.model import UNet3D
>>> from fastcascade.options import InferenceOptions
>>> net = UNet3D(num_classes=3, base_channels=2, levels=2).eval()
>>> image, mask = torch.zeros(20, 16, 12), torch.ones(20, 16, 12, dtype=torch.bool)
>>> out = run_stage(net, image, mask, tile=(24, 24, 24), num_classes=3, pad_value=-1.0,
...                 options=InferenceOptions(inference="slabs"), overlap=True,
...                 probabilities=False)
>>> out.passes, out.labels.shape
(4, torch.Size([20, 16, 12]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import tiling
from .config import Architecture
from .ops.stitch import finalize, tile_weight
from .options import InferenceOptions, auto_share, resolve_memory_budget
from .tiling import StageOutput, make_grid, overlap_step

__all__ = [
    "MAX_ELEMENTS",
    "Geometry",
    "Plan",
    "SlabPass",
    "StageOutput",
    "forward_memory",
    "region_bytes",
    "overlap_phases",
    "pass_bytes",
    "plan_stage",
    "receptive_margin",
    "run_slabs",
    "run_stage",
]

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (first voxel, end) per axis

#: Without a memory budget a slab is cut only where one of its activations would exceed
#: this many elements: the 32-bit indexing limit of cuDNN and many PyTorch kernels.
MAX_ELEMENTS = 2**31 - 1


def run_stage(
    network: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    tile: Sequence[int],
    num_classes: int,
    pad_value: float,
    options: InferenceOptions,
    overlap: bool,
    probabilities: bool,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutput:
    """Run one stage's network over ``image`` and return labels inside ``mask``.

    ``image``: the windowed volume ``(X, Y, Z)`` float32, ``mask``: bool ``(X, Y, Z)``,
    both on the network's device; ``tile``: the model's trained input size (voxels);
    ``pad_value``: the windowed value of air, padded outside the scan; ``overlap``:
    this stage uses the 4x overlap. Reads ``options.inference``, ``skip_empty``,
    ``memory_budget``, ``precision`` (activation size), ``weights`` (with overlap), and
    for tiles ``batch_size`` and ``overlap_step``. ``progress(done, total)`` follows
    each batch of tiles or each slab pass.
    """
    budget = options.memory_budget_for(image.device)
    with torch.inference_mode():
        if options.inference == "tiles":
            out_size = network.output_size(tuple(tile))
            step = overlap_step(out_size, options.overlap_step) if overlap else None
            grid = make_grid(tuple(image.shape), tuple(tile), out_size, step)
            return tiling.run_stage(
                network,
                image,
                mask,
                grid,
                num_classes,
                pad_value,
                skip_empty=options.skip_empty,
                weight_mode=options.weights if overlap else "constant",
                batch_size=options.batch_size,
                probabilities=probabilities,
                memory_budget=budget,
                progress=progress,
            )
        dtype = options.autocast_dtype_for(image.device)
        return run_slabs(
            network,
            image,
            mask,
            num_classes=num_classes,
            pad_value=pad_value,
            phases=overlap_phases(Geometry.of(network).period) if overlap else ((0, 0, 0),),
            weights=options.weights if overlap else "constant",
            skip_empty=options.skip_empty,
            memory_budget=budget,
            element_size=4 if dtype is None else torch.finfo(dtype).bits // 8,
            probabilities=probabilities,
            progress=progress,
        )


# --- geometry -----------------------------------------------------------------------------


def receptive_margin(levels: int) -> int:
    """Voxels a ``"same"``-padded U-Net's output depends on, each side, at a fixed phase.

    Following the input interval a voxel depends on through the network: a 3x3x3
    convolution at level ``l`` (voxels of ``2^l``) widens it by ``2^l`` per side, a
    phase-aligned 2x2x2 pooling by nothing beyond its own cell, an up-convolution back to
    level ``l`` by ``2^l`` (its output voxel is either half of the coarse one). Two
    convolutions per encoder level, one up-convolution and two convolutions per decoder
    level: ``2(2^L - 1) + 3(2^(L-1) - 1)``, 51 for 4 levels.

    >>> receptive_margin(4), receptive_margin(2)
    (51, 9)
    """
    return 2 * (2**levels - 1) + 3 * (2 ** (levels - 1) - 1)


@dataclass(frozen=True)
class Geometry:
    """Where a network's output voxels sit relative to its input, per axis (voxels).

    ``period``: ``P = 2^(levels - 1)``; valid input sizes are ``min_input + k·P``.
    ``margin``: valid padding: the constant ``(input - output) / 2``; same padding: the
    receptive margin (the output is as large as the input).
    """

    padding: str
    period: int
    margin: int
    min_input: int

    @classmethod
    def of(cls, network: torch.nn.Module) -> Geometry:
        """From a :class:`~fastcascade.model.UNet3D` (or a compiled one)."""
        arch: Architecture = network.architecture
        period = 2 ** (arch.levels - 1)
        n0 = network.valid_input_size(1)
        if arch.padding == "valid":
            margin = (n0 - network.output_size((n0,))[0]) // 2
        else:
            margin = receptive_margin(arch.levels)
        geometry = cls(arch.padding, period, margin, n0)
        # The next valid size is a period on, and the valid margin does not change.
        assert network.output_size((n0 + period,)) == (geometry.output_size(n0 + period),)
        return geometry

    def input_size(self, n: int) -> int:
        """The smallest valid input size ≥ ``n``."""
        return self.min_input + self.period * max(0, -(-(n - self.min_input) // self.period))

    def output_size(self, n: int) -> int:
        return n - 2 * self.margin if self.padding == "valid" else n


def overlap_phases(period: int) -> tuple[tuple[int, int, int], ...]:
    """The paper's 4x overlap as phases (x, y, z): (0,0,0), (h,0,0), (0,h,0), (h,h,0)."""
    h = period // 2
    return ((0, 0, 0), (h, 0, 0), (0, h, 0), (h, h, 0))


# --- memory -------------------------------------------------------------------------------


def forward_memory(
    arch: Architecture, input_size: Sequence[int], element_size: int = 4
) -> tuple[int, int]:
    """Peak bytes of one inference-mode forward pass at batch 1, and its largest tensor's
    element count, from the architecture (``UNet3D.forward``'s tensor lifetimes).

    The peak is the maximum over the layers of ``element_size`` × elements held: the
    encoder outputs kept for the skips; the block's input, which its caller holds through
    both of the block's convolutions (in the decoder the concatenation, and the
    up-convolved tensor beside it); the block's first output while the second is
    computed; and twice the layer's output (the convolution's and BatchNorm's outputs
    coexist before ReLU on the CPU path; the fused GPU path holds one, so this errs high
    there). Sizes follow the architecture: a valid
    convolution loses 2 voxels per axis, pooling halves, an up-convolution doubles. After
    the network: its logits, an fp32 copy and the fp32 softmax, ``K·out·(element_size +
    8)``; plus the fp32 input window. Not counted: weights, cuDNN workspaces.

    >>> from fastcascade.config import Architecture
    >>> peak, largest = forward_memory(Architecture(base_channels=2, levels=2), (24,) * 3)
    >>> peak, largest
    (451776, 32000)
    """
    c, levels, k = arch.base_channels, arch.levels, arch.num_classes
    shrink = 2 if arch.padding == "valid" else 0
    peak = largest = held = 0

    def note(*elements):
        nonlocal peak, largest
        peak = max(peak, held + sum(elements))
        largest = max(largest, *elements)

    size = tuple(int(n) for n in input_size)
    channels = arch.in_channels
    x = channels * math.prod(size)
    skips = []
    for level in range(levels):
        inner = []  # the block's input, then its first convolution's output
        for width in (c * 2**level, 2 * c * 2**level):
            size = tuple(n - shrink for n in size)
            y = width * math.prod(size)
            note(x, *inner, y, y)
            inner.append(y)
        x, channels = inner[-1], 2 * c * 2**level
        if level < levels - 1:
            held += x
            skips.append(channels)
            size = tuple(n // 2 for n in size)
            x = channels * math.prod(size)
            note(x)
    for skip in reversed(skips):
        size = tuple(2 * n for n in size)
        up = channels * math.prod(size)
        note(x, up)
        cat = (channels + skip) * math.prod(size)
        note(up, cat)
        inner = []
        for _ in range(2):
            size = tuple(n - shrink for n in size)
            y = skip * math.prod(size)
            note(up, cat, *inner, y, y)
            inner.append(y)
        x, channels = inner[-1], skip
    logits = k * math.prod(size)
    note(x, logits)
    after = logits * (element_size + 8)
    return max(element_size * peak, after) + 4 * math.prod(input_size), largest


def pass_bytes(
    arch: Architecture,
    input_size: Sequence[int],
    region_size: Sequence[int],
    element_size: int = 4,
) -> int:
    """Bytes one slab pass needs: :func:`forward_memory` of its input plus the stitching
    of its region, ``(8K + 13) · region voxels``: the fp32 accumulator (``K`` classes),
    weight sum and weighted copy of one pass (``4(2K + 1)``), and the argmax (int64) and
    labels (uint8) of :func:`~fastcascade.ops.stitch.finalize` (9). This is what
    ``memory_budget`` bounds for slabs."""
    peak, _ = forward_memory(arch, input_size, element_size)
    return peak + (8 * arch.num_classes + 13) * math.prod(region_size)


# --- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlabPass:
    """One network pass: its input window, its output, and the region it contributes.

    All in grid voxels ``(x, y, z)``; ``start`` may lie outside the grid (air is padded).
    """

    phase: tuple[int, int, int]
    start: tuple[int, int, int]  # first input voxel
    size: tuple[int, int, int]  # input size (valid for the network)
    origin: tuple[int, int, int]  # first output voxel; ≡ phase (mod period)
    out_size: tuple[int, int, int]
    region: Box  # the part of the output this pass adds into the stage's result

    def keep(self) -> tuple[slice, slice, slice]:
        """The region as slices of this pass's output."""
        lo, hi = self.region
        return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.origin, strict=True))


class _Planner:
    """Slab windows and region sizes for one stage's grid and network."""

    def __init__(self, geometry, arch, shape, phases, element_size, budget):
        self.g, self.arch, self.shape, self.phases = geometry, arch, tuple(shape), phases
        self.element_size, self.budget = element_size, budget

    def slab(self, lo, hi, phase) -> SlabPass:
        g, p, m = self.g, self.g.period, self.g.margin
        start, size, origin = [], [], []
        for a in range(3):
            if g.padding == "valid":
                o = lo[a] - (lo[a] - phase[a]) % p
                n = g.input_size(hi[a] - o + 2 * m)
                s = o - m
            else:
                f0 = -((p - phase[a]) % p)  # the frame: ≤ 0, ≡ phase (mod p)
                f1 = f0 + g.input_size(self.shape[a] - f0)
                s = f0 + p * ((max(lo[a] - m, f0) - f0) // p)
                n = g.input_size(min(hi[a] + m, f1) - s)
                o = s
            start.append(s)
            size.append(n)
            origin.append(o)
        out = tuple(g.output_size(n) for n in size)
        return SlabPass(tuple(phase), tuple(start), tuple(size), tuple(origin), out, (lo, hi))

    def worst_input(self, region) -> tuple[int, ...]:
        """Input size of a region's slab at its worst phase and alignment (an upper
        bound of :meth:`slab`'s, used to size regions before their position is known)."""
        g, p, m = self.g, self.g.period, self.g.margin
        if g.padding == "valid":
            return tuple(g.input_size(r + p - 1 + 2 * m) for r in region)
        return tuple(
            min(g.input_size(r + 2 * m + p - 1), g.input_size(n + p - 1))
            for r, n in zip(region, self.shape, strict=True)
        )

    def fits(self, region) -> bool:
        size = self.worst_input(region)
        if forward_memory(self.arch, size, self.element_size)[1] > MAX_ELEMENTS:
            return False
        return self.budget is None or self.bytes(region) <= self.budget

    def bytes(self, region) -> int:
        return pass_bytes(self.arch, self.worst_input(region), region, self.element_size)

    def check_budget(self) -> None:
        if self.budget is None or self.fits((1, 1, 1)):
            return
        size, need = self.worst_input((1, 1, 1)), self.bytes((1, 1, 1))
        raise ValueError(
            f"memory_budget of {self.budget} bytes is below one minimal slab: a pass of "
            f"this network needs an input of {size} voxels and about {need} bytes "
            f"(activations and accumulators, fastcascade.passes.pass_bytes); give at "
            f"least {need} bytes or None"
        )

    def region_size(self, lengths) -> list[int]:
        """Cut the box into one more part along the axis where that saves most memory
        (ties: the longest slab), until a pass over one part fits."""
        parts = [1, 1, 1]

        def size(k):
            return [-(-n // c) for n, c in zip(lengths, k, strict=True)]

        while not self.fits(size(parts)):
            options = []
            for a in range(3):
                if size(parts)[a] > 1:
                    k = list(parts)
                    k[a] += 1
                    options.append((self.bytes(size(k)), -self.worst_input(size(parts))[a], k))
            parts = min(options)[2]
        return size(parts)

    def split(self, box: Box) -> tuple[Box, Box]:
        """A region in two halves along the axis where that saves most memory (out of
        memory: "halve the slab along its longest axis", where the longest axis is the
        one whose halving shrinks it; near the scan's edges a same-padded slab may not)."""
        lo, hi = box
        lengths = [b - a for a, b in zip(lo, hi, strict=True)]
        inputs = self.worst_input(lengths)

        def halved(a):
            r = list(lengths)
            r[a] = -(-r[a] // 2)
            return self.bytes(r), -inputs[a]

        axis = min((a for a in range(3) if lengths[a] > 1), key=halved)
        cut = lo[axis] + -(-lengths[axis] // 2)
        first_hi, second_lo = list(hi), list(lo)
        first_hi[axis] = second_lo[axis] = cut
        return (lo, tuple(first_hi)), (tuple(second_lo), hi)

    def regions(self, box: Box) -> list[Box]:
        lo, hi = box
        r = self.region_size([b - a for a, b in zip(lo, hi, strict=True)])
        cuts = [
            [(s, min(s + n, b)) for s in range(a, b, n)] for a, b, n in zip(lo, hi, r, strict=True)
        ]
        return [
            ((x[0], y[0], z[0]), (x[1], y[1], z[1]))
            for x in cuts[0]
            for y in cuts[1]
            for z in cuts[2]
        ]

    def input_voxels(self, box: Box) -> int:
        return math.prod(self.worst_input([b - a for a, b in zip(*box, strict=True)]))


def region_bytes(
    network: torch.nn.Module,
    shape: Sequence[int],
    region: Sequence[int] = (1, 1, 1),
    element_size: int = 4,
) -> int:
    """The ``memory_budget`` a pass over a region of ``region`` voxels needs on a grid of
    ``shape`` at any position and phase (:func:`pass_bytes` of its largest input); the
    default region of one voxel gives the smallest budget a slab stage accepts."""
    planner = _Planner(Geometry.of(network), network.architecture, shape, (), element_size, None)
    return planner.bytes(tuple(region))


def _occupied(proj, box: Box) -> tuple[np.ndarray, ...]:
    """Per axis, which planes of ``box`` may hold a mask voxel, from the mask's 2D
    projections (a superset: a plane is kept if both projections it meets are set)."""
    (x0, y0, z0), (x1, y1, z1) = box
    xy, xz, yz = proj[0][x0:x1, y0:y1], proj[1][x0:x1, z0:z1], proj[2][y0:y1, z0:z1]
    return xy.any(1) & xz.any(1), xy.any(0) & yz.any(1), xz.any(0) & yz.any(0)


def _tighten(proj, box: Box) -> Box | None:
    while True:
        occ = _occupied(proj, box)
        if not all(o.any() for o in occ):
            return None
        lo = tuple(a + int(np.argmax(o)) for a, o in zip(box[0], occ, strict=True))
        hi = tuple(a + len(o) - int(np.argmax(o[::-1])) for a, o in zip(box[0], occ, strict=True))
        if (lo, hi) == box:
            return box
        box = (lo, hi)


def _runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _boxes(proj, box: Box, planner: _Planner) -> tuple[list[Box], int]:
    """Boxes covering the mask inside ``box`` and the input voxels of their slabs: one
    box, or one per part separated by empty planes when that reads fewer voxels."""
    box = _tighten(proj, box)
    if box is None:
        return [], 0
    best = [box], planner.input_voxels(box)
    splits = []
    for axis, occ in enumerate(_occupied(proj, box)):
        runs = _runs(occ)
        if len(runs) > 1:
            parts = []
            for a, b in runs:
                lo, hi = list(box[0]), list(box[1])
                lo[axis], hi[axis] = box[0][axis] + a, box[0][axis] + b
                parts.append((tuple(lo), tuple(hi)))
            splits.append((sum(planner.input_voxels(p) for p in parts), parts))
    if splits:
        # The axis whose parts read least; each part may split again along any axis.
        parts = min(splits, key=lambda s: s[0])[1]
        found = [_boxes(proj, p, planner) for p in parts]
        total = sum(cost for _, cost in found)
        if total < best[1]:
            best = [b for boxes, _ in found for b in boxes], total
    return best


def _to_host(t: torch.Tensor) -> np.ndarray:
    """The one host read of a stage with skipping."""
    return t.cpu().numpy()


def _projections(mask: torch.Tensor):
    nx, ny, nz = mask.shape
    flat = _to_host(
        torch.cat([mask.any(2).reshape(-1), mask.any(1).reshape(-1), mask.any(0).reshape(-1)])
    )
    return (
        flat[: nx * ny].reshape(nx, ny),
        flat[nx * ny : nx * (ny + nz)].reshape(nx, nz),
        flat[nx * (ny + nz) :].reshape(ny, nz),
    )


@dataclass
class Plan:
    """A stage's regions (each run at every phase) and its passes without skipping."""

    regions: list[Box]
    phases: tuple[tuple[int, int, int], ...]
    total: int
    planner: _Planner

    def passes(self) -> list[SlabPass]:
        return [self.planner.slab(lo, hi, d) for lo, hi in self.regions for d in self.phases]


def plan_stage(
    network: torch.nn.Module,
    mask: torch.Tensor,
    *,
    phases: Sequence[Sequence[int]] = ((0, 0, 0),),
    skip_empty: bool = True,
    memory_budget: int | str | None = None,
    element_size: int = 4,
) -> Plan:
    """The slab passes of one stage over ``mask``'s grid (see the module's docstring).

    ``memory_budget``: bytes, ``None`` (no limit) or ``"auto"``
    (:func:`~fastcascade.options.resolve_memory_budget`). Raises ``ValueError`` when it
    is below one minimal slab, naming the minimum.
    """
    planner = _Planner(
        Geometry.of(network),
        network.architecture,
        tuple(mask.shape),
        tuple(tuple(int(v) for v in d) for d in phases),
        element_size,
        resolve_memory_budget(memory_budget, mask.device),
    )
    try:
        planner.check_budget()
    except ValueError as e:
        if memory_budget != "auto":
            raise
        raise ValueError(
            f"{e}. The budget was 'auto': {auto_share(mask.device):.0%} of the memory free "
            f"on {mask.device} when the stage started; free memory, or give memory_budget "
            f"in bytes"
        ) from None
    whole = ((0, 0, 0), tuple(mask.shape))
    total = len(planner.regions(whole)) * len(planner.phases)
    if not skip_empty:
        return Plan(planner.regions(whole), planner.phases, total, planner)
    proj = _projections(mask)
    regions = [
        r
        for box in _boxes(proj, whole, planner)[0]
        for r in planner.regions(box)
        if all(o.any() for o in _occupied(proj, r))
    ]
    return Plan(regions, planner.phases, total, planner)


# --- running ------------------------------------------------------------------------------


def _window(image: torch.Tensor, start, size, pad_value: float) -> torch.Tensor:
    """``image[start : start + size]`` with ``pad_value`` where it lies outside."""
    src = tuple(
        slice(max(s, 0), max(min(s + n, d), 0))
        for s, n, d in zip(start, size, image.shape, strict=True)
    )
    x = image[src]
    pads = []
    for a in reversed(range(3)):
        lo = min(max(0, -start[a]), size[a])
        pads += [lo, size[a] - lo - x.shape[a]]
    return F.pad(x[None], pads, value=pad_value)[0]


def run_slabs(
    network: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_classes: int,
    pad_value: float,
    phases: Sequence[Sequence[int]] = ((0, 0, 0),),
    weights: str = "constant",
    skip_empty: bool = True,
    memory_budget: int | str | None = None,
    element_size: int = 4,
    probabilities: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutput:
    """Slab passes of ``network`` at ``phases`` over ``mask``'s region of ``image``.

    ``image``: ``(X, Y, Z)`` float32 on the network's device; ``mask``: bool, same shape
    and device. Every voxel of a computed region gets one prediction per phase, averaged
    in fp32 with ``weights`` (``"constant"``, or ``"gaussian"``: each pass's
    :func:`~fastcascade.ops.stitch.tile_weight` over its output). Labels are background
    outside ``mask``; ``probabilities`` (``(C, X, Y, Z)`` float32) background there too.
    """
    with torch.inference_mode():
        device = image.device
        plan = plan_stage(
            network,
            mask,
            phases=phases,
            skip_empty=skip_empty,
            memory_budget=memory_budget,
            element_size=element_size,
        )
        labels = torch.zeros(mask.shape, dtype=torch.uint8, device=device)
        probs = None
        if probabilities:
            probs = torch.zeros((num_classes, *mask.shape), dtype=torch.float32, device=device)
            probs[0] = 1.0
        done = computed = 0
        total = len(plan.regions) * len(plan.phases)
        pending = list(reversed(plan.regions))
        while pending:
            lo, hi = pending.pop()
            try:
                passes = _run_region(
                    network,
                    image,
                    mask,
                    plan,
                    (lo, hi),
                    num_classes,
                    pad_value,
                    weights,
                    labels,
                    probs,
                )
            except torch.cuda.OutOfMemoryError:
                if all(b - a == 1 for a, b in zip(lo, hi, strict=True)):
                    raise
                first, second = plan.planner.split((lo, hi))
                pending += [second, first]
                total += len(plan.phases)
                continue
            done += len(passes)
            computed += sum(math.prod(p.out_size) for p in passes)
            if progress is not None:
                progress(done, total)
        return StageOutput(
            labels,
            probs,
            done,
            plan.total,
            computed,
            math.prod(mask.shape),
            inference="slabs",
            memory_budget=plan.planner.budget,
        )


def _run_region(
    network, image, mask, plan, region, num_classes, pad_value, weights, labels, probs
) -> list[SlabPass]:
    lo, hi = region
    device = image.device
    shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    acc = torch.zeros((num_classes, *shape), dtype=torch.float32, device=device)
    weight_sum = torch.zeros(shape, dtype=torch.float32, device=device)
    passes = [plan.planner.slab(lo, hi, d) for d in plan.phases]
    for p in passes:
        x = _window(image, p.start, p.size, pad_value)
        out = torch.softmax(network(x[None, None]).float(), dim=1)[0]
        keep = p.keep()
        if weights == "constant":
            acc += out[(slice(None), *keep)]
            weight_sum += 1.0
        else:
            w = tile_weight(p.out_size, weights, device=device)[keep]
            acc.addcmul_(out[(slice(None), *keep)], w)
            weight_sum += w
    where = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    view = None if probs is None else probs[(slice(None), *where)]
    _, lab = finalize(acc, weight_sum, mask=mask[where], probabilities=probs is not None, out=view)
    labels[where] = lab
    return passes
