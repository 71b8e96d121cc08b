"""Tile lattice, tile skipping and one stage run, against brute-force oracles."""

import itertools

import pytest
import torch

from fastcascade.tiling import active_tiles, make_grid, run_stage


def coverage(grid):
    """How often each voxel of the volume is inside an output tile (brute force)."""
    count = torch.zeros(grid.shape, dtype=torch.int32)
    for o in grid.origins().tolist():
        count[tuple(slice(a, a + s) for a, s in zip(o, grid.out_size, strict=True))] += 1
    return count


@pytest.mark.parametrize(
    "shape,out,step,times",
    [
        ((20, 17, 9), (8, 8, 4), None, 1),
        ((5, 5, 5), (8, 8, 8), None, 1),  # a volume smaller than one tile
        ((21, 19, 13), (8, 8, 4), (4, 4, 4), 4),  # the paper's 4x overlap
        ((16, 16, 16), (8, 8, 8), (4, 4, 4), 8),
    ],
    ids=["tiles", "smaller-than-tile", "overlap-4x", "overlap-8x"],
)
def test_every_voxel_covered(shape, out, step, times):
    grid = make_grid(shape, out, out, step)
    count = coverage(grid)
    assert (count >= 1).all()
    # Inner voxels (a tile away from the low border, inside the last full step) are seen
    # `times` times; none more often.
    step = step or out
    inner = tuple(
        slice(o - s, (c - 1) * s) if o > s else slice(None)
        for o, s, c in zip(out, step, grid.counts, strict=True)
    )
    assert (count[inner] == times).all() and count.max() == times
    # The lattice ends with the first tile reaching the last voxel.
    for n, o, s, c in zip(shape, out, step, grid.counts, strict=True):
        assert (c - 1) * s + o >= n and (c == 1 or (c - 2) * s + o < n)


def brute_force_active(grid, mask):
    active = []
    for o in grid.origins().tolist():
        sl = tuple(slice(a, a + s) for a, s in zip(o, grid.out_size, strict=True))
        active.append(bool(mask[sl].any()))
    return torch.tensor(active)


@pytest.mark.parametrize("step", [None, (3, 3, 6), (2, 4, 6)], ids=["tiles", "half", "mixed"])
@pytest.mark.parametrize("density", [0.0, 0.002, 0.05, 1.0], ids=lambda d: f"density{d}")
def test_active_tiles_match_brute_force(step, density):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand((23, 19, 14), generator=g) < density
    grid = make_grid(mask.shape, (10, 10, 8), (6, 6, 6), step)
    torch.testing.assert_close(active_tiles(grid, mask), brute_force_active(grid, mask))


class Pointwise(torch.nn.Module):
    """A 'network' whose logits depend on each voxel alone, cropped like a valid U-Net."""

    def __init__(self, classes, margin):
        super().__init__()
        self.classes, self.margin = classes, margin
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        m = self.margin
        if m:
            x = x[:, :, m:-m, m:-m, m:-m]
        k = torch.arange(self.classes, dtype=x.dtype).view(1, -1, 1, 1, 1)
        return torch.sin(3.0 * x * (k + 1)) + 0.1 * k


@pytest.mark.parametrize(
    "step,weights",
    [(None, "constant"), ((3, 3, 6), "constant"), ((3, 3, 6), "gaussian")],
    ids=["tiles", "overlap", "overlap-gaussian"],
)
@pytest.mark.parametrize("margin", [0, 2], ids=["same", "valid"])
def test_run_stage_reconstructs_pointwise_network(step, weights, margin):
    g = torch.Generator().manual_seed(0)
    image = torch.rand((17, 13, 11), generator=g) * 2 - 1
    mask = torch.zeros(image.shape, dtype=torch.bool)
    mask[3:12, 2:9, 1:10] = True
    net = Pointwise(4, margin)
    out = (6, 6, 6)
    grid = make_grid(image.shape, tuple(o + 2 * margin for o in out), out, step)
    result = run_stage(
        net,
        image,
        mask,
        grid,
        4,
        pad_value=-1.0,
        weight_mode=weights,
        batch_size=3,
        probabilities=True,
    )
    want = torch.softmax(
        net(
            image[None, None]
            if not margin
            else torch.nn.functional.pad(image, [margin] * 6)[None, None]
        ),
        1,
    )[0]
    expected_labels = want.argmax(0).to(torch.uint8) * mask
    assert torch.equal(result.labels, expected_labels)
    inside = mask.expand_as(want)
    torch.testing.assert_close(result.probabilities[inside], want[inside], rtol=1e-6, atol=1e-6)
    assert result.tiles_computed == int(brute_force_active(grid, mask).sum())
    assert result.tiles_total == grid.num_tiles
    assert result.voxels_computed == result.tiles_computed * 6**3
    assert result.voxels_grid == 17 * 13 * 11 and result.inference == "tiles"


def test_skipping_gives_the_same_labels_as_every_tile():
    g = torch.Generator().manual_seed(1)
    image = torch.rand((20, 20, 12), generator=g)
    mask = torch.zeros(image.shape, dtype=torch.bool)
    mask[2, 3, 4] = mask[15, 17, 10] = True
    grid = make_grid(image.shape, (8, 8, 6), (8, 8, 6))
    full = run_stage(Pointwise(3, 0), image, mask, grid, 3, -1.0, skip_empty=False)
    net = Pointwise(3, 0)
    sparse = run_stage(net, image, mask, grid, 3, -1.0, skip_empty=True)
    assert torch.equal(full.labels, sparse.labels)
    assert full.tiles_computed == grid.num_tiles == 18
    assert sparse.tiles_computed == net.calls == 2


def test_bad_step():
    with pytest.raises(ValueError, match="step"):
        make_grid((10, 10, 10), (4, 4, 4), (4, 4, 4), (5, 4, 4))


def test_origins_in_c_order():
    grid = make_grid((9, 9, 9), (4, 4, 4), (4, 4, 4))
    want = list(itertools.product(range(0, 12, 4), repeat=3))
    assert [tuple(o) for o in grid.origins().tolist()] == want


def overlap_case():
    g = torch.Generator().manual_seed(4)
    image = torch.rand((30, 14, 9), generator=g) * 2 - 1
    mask = torch.rand(image.shape, generator=g) < 0.3
    grid = make_grid(image.shape, (10, 10, 10), (6, 6, 6), (3, 3, 6))
    return image, mask, grid


@pytest.mark.parametrize("parts", [2, 3, 7, 12], ids=lambda s: f"parts{s}")
def test_stitching_in_parts_gives_the_same_result(parts):
    image, mask, grid = overlap_case()
    net = Pointwise(3, 2)
    whole = run_stage(net, image, mask, grid, 3, -1.0, probabilities=True)
    sliced = run_stage(net, image, mask, grid, 3, -1.0, probabilities=True, parts=parts)
    assert torch.equal(whole.labels, sliced.labels)
    torch.testing.assert_close(whole.probabilities, sliced.probabilities, rtol=1e-6, atol=1e-7)


class FakeAllocator:
    """A device whose allocations over ``limit`` bytes fail like a full GPU."""

    def __init__(self, limit):
        self.limit, self.failures = limit, 0

    def check(self, nbytes):
        if nbytes > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"fake allocator: {nbytes} > {self.limit} bytes")


def test_out_of_memory_falls_back_to_smaller_batches_and_parts(monkeypatch):
    import fastcascade.tiling as tiling

    image, mask, grid = overlap_case()
    want = run_stage(Pointwise(3, 2), image, mask, grid, 3, -1.0, probabilities=True)
    # The whole accumulator (3 x 36 x 18 x 12 fp32 = 93 kB) and batches over 2 tiles fail.
    memory = FakeAllocator(limit=40_000)
    batches = FakeAllocator(limit=2 * 10**3 * 4)
    real_zeros = torch.zeros

    def zeros(*size, **kw):
        out = real_zeros(*size, **kw)
        memory.check(out.numel() * out.element_size())
        return out

    class Net(Pointwise):
        def forward(self, x):
            batches.check(x.numel() * x.element_size())
            return super().forward(x)

    monkeypatch.setattr(tiling.torch, "zeros", zeros)
    got = run_stage(Net(3, 2), image, mask, grid, 3, -1.0, probabilities=True, batch_size=8)
    monkeypatch.undo()
    assert memory.failures >= 1 and batches.failures >= 1  # sliced, and batches split
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.probabilities, want.probabilities, rtol=1e-6, atol=1e-7)


def test_other_runtime_errors_are_not_swallowed():
    image, mask, grid = overlap_case()

    class Broken(Pointwise):
        def forward(self, x):
            raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        run_stage(Broken(3, 2), image, mask, grid, 3, -1.0)


def test_memory_budget_picks_parts():
    image, mask, grid = overlap_case()
    net = Pointwise(3, 2)
    whole = run_stage(net, image, mask, grid, 3, -1.0)
    calls = net.calls
    tight = run_stage(net, image, mask, grid, 3, -1.0, memory_budget=20_000)
    assert torch.equal(whole.labels, tight.labels)
    assert net.calls - calls > calls  # parts recompute straddling tiles: the budget was used
