"""The tile grid over a candidate mask, and one stage run tile by tile.

A stage's network maps an input tile of ``in_size`` voxels to an output tile of
``out_size`` voxels centred in it (``margin = (in - out) / 2`` per side; 0 for a
``"same"``-padded network). Output tiles sit on a regular lattice of ``step`` voxels:
``step == out`` gives non-overlapping tiles (stage 1 and the original stage 2), a step of
half a tile along x and y with a full step along z has every inner voxel seen 4x (the
paper's overlapping stage 2). The lattice starts at the volume's first voxel and ends with
the first tile that reaches its last voxel, so voxels within a tile of the borders may be
seen fewer times, as in nnU-Net and MONAI (starting the lattice before the volume would
cover them evenly at up to twice the tiles on a scan two tiles wide). The volume is padded
with air so every tile has full context.

Tile skipping: a tile whose output region holds no candidate voxel is not computed. The
decision runs on the mask's device with pooling, and costs one host sync per stage (the
number of tiles to run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops.stitch import accumulate, finalize, tile_weight
from .options import resolve_memory_budget


@dataclass(frozen=True)
class TileGrid:
    """A lattice of output tiles covering a volume of ``shape`` voxels.

    ``counts[a]`` is the number of tiles along axis ``a``, the first at voxel 0; the
    accumulator spans ``extent[a] = (counts[a] - 1) * step[a] + out_size[a]`` voxels.
    """

    shape: tuple[int, int, int]
    in_size: tuple[int, int, int]
    out_size: tuple[int, int, int]
    step: tuple[int, int, int]
    counts: tuple[int, int, int]

    @property
    def margin(self) -> tuple[int, ...]:
        return tuple((i - o) // 2 for i, o in zip(self.in_size, self.out_size, strict=True))

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(
            (c - 1) * s + o for c, s, o in zip(self.counts, self.step, self.out_size, strict=True)
        )

    @property
    def num_tiles(self) -> int:
        return math.prod(self.counts)

    def origins(self) -> torch.Tensor:
        """All tiles' output origins relative to the accumulator, long ``(T, 3)``, C order."""
        axes = [torch.arange(c) * s for c, s in zip(self.counts, self.step, strict=True)]
        return torch.cartesian_prod(*axes).reshape(-1, 3)


def make_grid(
    shape: tuple[int, ...],
    in_size: tuple[int, ...],
    out_size: tuple[int, ...],
    step: tuple[int, ...] | None = None,
) -> TileGrid:
    """Lattice of output tiles of ``out_size`` every ``step`` voxels covering ``shape``."""
    step = tuple(out_size) if step is None else tuple(int(s) for s in step)
    if any(s < 1 or s > o for s, o in zip(step, out_size, strict=True)):
        raise ValueError(f"tile step must be within 1..{tuple(out_size)} voxels, got {step}")
    counts = tuple(
        max(1, math.ceil((n - o) / s) + 1) for n, o, s in zip(shape, out_size, step, strict=True)
    )
    return TileGrid(tuple(shape), tuple(in_size), tuple(out_size), step, counts)


def overlap_step(out_size: tuple[int, ...], fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Lattice step in voxels for step ``fractions`` of the output tile per axis."""
    return tuple(max(1, round(o * f)) for o, f in zip(out_size, fractions, strict=True))


def active_tiles(grid: TileGrid, mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``(T,)`` on the mask's device: which tiles' output regions touch ``mask``.

    ``mask=None`` selects every tile (the original's approach).
    """
    if mask is None:
        return torch.ones(grid.num_tiles, dtype=torch.bool)
    m = _place(mask.to(torch.float16 if mask.is_cuda else torch.float32), grid, 0.0, out=True)
    # Any-pooling in two passes: blocks of g = gcd(step, out) voxels, then each tile's
    # out/g consecutive blocks every step/g blocks.
    g = [math.gcd(s, o) for s, o in zip(grid.step, grid.out_size, strict=True)]
    blocks = F.max_pool3d(m[None, None], kernel_size=g, stride=g)
    kernel = [o // gi for o, gi in zip(grid.out_size, g, strict=True)]
    stride = [s // gi for s, gi in zip(grid.step, g, strict=True)]
    tiles = F.max_pool3d(blocks, kernel_size=kernel, stride=stride)[0, 0]
    assert tuple(tiles.shape) == grid.counts, (tiles.shape, grid.counts)
    return tiles.reshape(-1) > 0


def _place(volume: torch.Tensor, grid: TileGrid, fill: float, out: bool) -> torch.Tensor:
    """``volume`` (…, X, Y, Z) padded with ``fill`` onto the accumulator frame (``out``)
    or onto the input frame, which adds the margin on each side."""
    pads = []
    for a in reversed(range(3)):
        lo = 0 if out else grid.margin[a]
        hi = grid.extent[a] - volume.shape[-3 + a]
        hi += 0 if out else grid.in_size[a] - grid.out_size[a] - grid.margin[a]
        pads += [lo, hi]
    if volume.dim() == 3:
        return F.pad(volume[None], pads, value=fill)[0]
    return F.pad(volume, pads, value=fill)


@dataclass
class StageOutput:
    """One stage's result and what it cost.

    ``tiles_computed`` / ``tiles_total``: network passes run / those a run without
    skipping would make (a pass is one tile, or one slab for ``inference="slabs"``).
    ``voxels_computed``: output voxels the network computed over all passes, against
    ``voxels_grid``, the voxels of the stage's grid (their ratio is the overhead of
    overlap, halos and padding). ``inference``: ``"tiles"`` or ``"slabs"``.
    ``memory_budget``: the bytes the stage was given (``"auto"`` resolved; ``None``: no
    limit).
    """

    labels: torch.Tensor  # uint8 (X, Y, Z), background outside the mask
    probabilities: torch.Tensor | None  # float32 (C, X, Y, Z)
    tiles_computed: int
    tiles_total: int
    voxels_computed: int
    voxels_grid: int
    inference: str = "tiles"
    memory_budget: int | None = None

    @property
    def passes(self) -> int:
        """Network passes run (tiles or slabs)."""
        return self.tiles_computed

    def report(self) -> dict[str, int | str | None]:
        """What the stage cost, as plain values: ``inference``, ``passes`` (run),
        ``passes_planned`` (without skipping), ``voxels_computed``, ``voxels_grid``,
        ``memory_budget``."""
        return {
            "inference": self.inference,
            "passes": self.tiles_computed,
            "passes_planned": self.tiles_total,
            "voxels_computed": self.voxels_computed,
            "voxels_grid": self.voxels_grid,
            "memory_budget": self.memory_budget,
        }


def run_stage(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    mask: torch.Tensor,
    grid: TileGrid,
    num_classes: int,
    pad_value: float,
    *,
    skip_empty: bool = True,
    weight_mode: str = "constant",
    batch_size: int = 2,
    probabilities: bool = False,
    parts: int = 1,
    memory_budget: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutput:
    """Run ``network`` over the tiles of ``grid`` and stitch softmax probabilities.

    ``image`` is the normalised volume (X, Y, Z) float32, ``mask`` the candidate region
    (bool, same shape); both on the device the network runs on. Labels are the argmax
    of the weighted accumulation, background outside ``mask``.

    Memory: the fp32 accumulator is ``num_classes`` volumes of the lattice's extent;
    ``parts > 1`` stitches the volume in that many parts along x, each with its own
    accumulator (tiles straddling two parts run twice); ``memory_budget`` (bytes, or
    ``"auto"``: :func:`~fastcascade.options.resolve_memory_budget`) picks enough parts for
    the accumulators to take at most half of it. On a GPU out-of-memory error (that error
    only) a failing batch of tiles is split in halves, and at one tile per batch the stage
    restarts with twice the parts; results are the same either way.
    (The slab passes of :mod:`fastcascade.passes` are another thing: network inputs as
    large as memory allows.)
    """
    device = image.device
    memory_budget = resolve_memory_budget(memory_budget, device)
    if memory_budget is not None:
        acc_bytes = 4 * (num_classes + 1) * math.prod(grid.extent)
        parts = max(parts, min(grid.counts[0], math.ceil(2 * acc_bytes / memory_budget)))
    padded = _place(image, grid, pad_value, out=False)
    selected = active_tiles(grid, mask if skip_empty else None).to(device)
    origins = grid.origins().to(device)[selected]  # one host sync: the tile count
    weight = tile_weight(grid.out_size, weight_mode, device=device)
    run = _TileRunner(network, padded, grid, weight, batch_size, progress, origins.shape[0])
    while True:
        try:
            probs, labels = _stitch_parts(
                run, origins, mask, grid, num_classes, parts, probabilities
            )
            computed = run.done * math.prod(grid.out_size)
            return StageOutput(
                labels,
                probs,
                run.done,
                grid.num_tiles,
                computed,
                math.prod(grid.shape),
                memory_budget=memory_budget,
            )
        except torch.cuda.OutOfMemoryError:
            if parts >= grid.counts[0]:
                raise
            parts = min(2 * parts, grid.counts[0])
            run.restart()


class _TileRunner:
    """Gathers input tiles, runs the network and accumulates, halving batches on OOM."""

    def __init__(self, network, padded, grid, weight, batch_size, progress, total):
        self.network, self.padded, self.grid, self.weight = network, padded, grid, weight
        self.batch_size, self.progress, self.total = batch_size, progress, total
        self.offsets = [torch.arange(n, device=padded.device) for n in grid.in_size]
        self.done = 0

    def restart(self):
        self.done = 0

    def probabilities(self, o: torch.Tensor) -> torch.Tensor:
        # The input tile of output origin o starts at o in the padded input frame; one
        # advanced index gathers the whole batch.
        ix = (o[:, 0, None] + self.offsets[0])[:, :, None, None]
        iy = (o[:, 1, None] + self.offsets[1])[:, None, :, None]
        iz = (o[:, 2, None] + self.offsets[2])[:, None, None, :]
        tiles = self.padded[ix, iy, iz][:, None]
        return torch.softmax(self.network(tiles).float(), dim=1)

    def accumulate(self, acc, weight_sum, origins, shift):
        start = 0
        while start < origins.shape[0]:
            o = origins[start : start + self.batch_size]
            try:
                probs = self.probabilities(o)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                continue
            accumulate(acc, weight_sum, probs, o - shift, self.weight)
            start += o.shape[0]
            self.done += o.shape[0]
            if self.progress is not None:
                self.progress(min(self.done, self.total), self.total)


def _stitch_parts(run, origins, mask, grid, num_classes, parts, probabilities):
    device = mask.device
    rows, step, out = grid.counts[0], grid.step[0], grid.out_size[0]
    per = -(-rows // parts)
    labels = torch.zeros(grid.shape, dtype=torch.uint8, device=device)
    probs = None
    if probabilities:
        probs = torch.empty((num_classes, *grid.shape), dtype=torch.float32, device=device)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        own_lo, own_hi = r0 * step, (r1 * step if r1 < rows else grid.extent[0])
        # Rows whose tiles reach into [own_lo, own_hi).
        first_row = max(0, (own_lo - out) // step + 1)
        a, b = first_row * step, (r1 - 1) * step + out
        part = origins
        if parts > 1:
            part = origins[(origins[:, 0] >= a) & (origins[:, 0] < r1 * step)]
        acc = torch.zeros((num_classes, b - a, *grid.extent[1:]), device=device)
        weight_sum = torch.zeros((b - a, *grid.extent[1:]), device=device)
        run.accumulate(acc, weight_sum, part, torch.tensor([a, 0, 0], device=device))
        v0, v1 = own_lo, min(own_hi, grid.shape[0])  # this part's volume voxels
        if v0 >= v1:
            continue
        local = (slice(v0 - a, v1 - a), *(slice(0, n) for n in grid.shape[1:]))
        vol = slice(v0, v1)
        p, lab = finalize(
            acc[(slice(None), *local)],
            weight_sum[local],
            mask=mask[vol],
            probabilities=probabilities,
        )
        labels[vol] = lab
        if probs is not None:
            probs[:, vol] = p
    return probs, labels
