"""Slab passes against independent oracles: a plain loop of small tiles at one pooling
phase (valid networks), one pass over the whole padded scan (same padding), a brute-force
count of the phases each voxel gets, and live-tensor bytes for the memory estimate."""

import itertools
import math
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastcascade.passes as passes
from fastcascade.diagnostics import SyncCounter
from fastcascade.model import UNet3D
from fastcascade.ops.stitch import tile_weight
from fastcascade.options import InferenceOptions
from fastcascade.passes import (
    Geometry,
    forward_memory,
    overlap_phases,
    pass_bytes,
    plan_stage,
    region_bytes,
    run_slabs,
    run_stage,
)
from fastcascade.tiling import make_grid, overlap_step
from fastcascade.tiling import run_stage as run_tiles

K = 4
AIR = -1.0
#: Probabilities: slabs and tiles sum the same products in another order (other conv
#: sizes pick other blockings), a few fp32 ulp; labels may differ only where the top two
#: classes are closer than EPS.
ATOL, EPS = 2e-5, 1e-4


def network(padding, levels, channels=3, seed=0):
    torch.manual_seed(seed)
    net = UNet3D(num_classes=K, base_channels=channels, levels=levels, padding=padding)
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            # He initialisation keeps the deepest level's effect on the output visible.
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm3d):  # eval-mode statistics that matter
            torch.nn.init.uniform_(module.running_mean, -0.2, 0.2)
            torch.nn.init.uniform_(module.running_var, 0.5, 1.5)
    torch.nn.init.normal_(net.classifier.bias, 0.0, 0.5)
    return net.eval()


def volume(shape, seed=1, density=None):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(shape, generator=g) * 2 - 1
    mask = torch.ones(shape, dtype=torch.bool)
    if density is not None:
        mask = torch.rand(shape, generator=g) < density
    return image, mask


def blobs(shape, centres, radius):
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij"))
    mask = torch.zeros(shape, dtype=torch.bool)
    for c in centres:
        d = grid - torch.tensor(c).view(3, 1, 1, 1)
        mask |= (d**2).sum(0) <= radius**2
    return mask


def tiles_at_phase(net, image, phase, tile_in):
    """Oracle: softmax of small tiles whose outputs start ≡ ``phase`` (mod P), stepped by
    their output size (a multiple of P), each written into the grid by a slice loop."""
    g = Geometry.of(net)
    out = g.output_size(tile_in)
    assert out % g.period == 0
    pad = g.margin + g.period + out
    padded = F.pad(image[None], [pad] * 6, value=AIR)[0]
    probs = torch.full((K, *image.shape), float("nan"))
    starts = [
        range(d - g.period if d else 0, n, out) for d, n in zip(phase, image.shape, strict=True)
    ]
    with torch.inference_mode():
        for o in itertools.product(*starts):
            src = tuple(slice(a - g.margin + pad, a - g.margin + pad + tile_in) for a in o)
            p = torch.softmax(net(padded[src][None, None]), 1)[0]
            dst = tuple(
                slice(max(a, 0), min(a + out, n)) for a, n in zip(o, image.shape, strict=True)
            )
            local = tuple(slice(d.start - a, d.stop - a) for d, a in zip(dst, o, strict=True))
            probs[(slice(None), *dst)] = p[(slice(None), *local)]
    return probs


def whole_pass(net, image, phase):
    """Oracle for same padding: one pass over the scan padded with air to the phase's
    frame (from the largest position ≤ 0 that is ≡ phase mod P to a valid size)."""
    g = Geometry.of(net)
    lo = [(g.period - d) % g.period for d in phase]
    hi = [g.input_size(n + a) - n - a for n, a in zip(image.shape, lo, strict=True)]
    pads = [v for a in reversed(range(3)) for v in (lo[a], hi[a])]
    padded = F.pad(image[None], pads, value=AIR)[0]
    with torch.inference_mode():
        p = torch.softmax(net(padded[None, None]), 1)[0]
    return p[(slice(None), *(slice(a, a + n) for a, n in zip(lo, image.shape, strict=True)))]


def assert_agree(result, want, mask):
    """Probabilities within ATOL inside ``mask``, background outside; labels equal except
    where ``want``'s top two are within EPS (returns how many of those differ)."""
    inside = mask.expand_as(want)
    got = result.probabilities
    assert not got.isnan().any()
    torch.testing.assert_close(got[inside], want[inside], rtol=0, atol=ATOL)
    assert (got[0][~mask] == 1).all() and (got[1:][:, ~mask] == 0).all()
    top2 = want.topk(2, dim=0).values
    close = (top2[0] - top2[1]) < EPS
    labels = (want.argmax(0).to(torch.uint8)) * mask
    differ = result.labels != labels
    assert not (differ & ~close).any()
    return int(differ.sum())


def averaged(maps):
    return sum(maps) / len(maps)


def budget_for(net, mask, parts, skip=True):
    """A budget that cuts the smallest box of ``mask``'s plan into ``parts`` along x
    (``None``: no budget)."""
    if parts is None:
        return None
    plan = plan_stage(net, mask, skip_empty=skip)
    lo, hi = min(plan.regions, key=lambda r: math.prod(b - a for a, b in zip(*r, strict=True)))
    x = -(-(hi[0] - lo[0]) // parts)
    return region_bytes(net, mask.shape, (x, hi[1] - lo[1], hi[2] - lo[2]))


# --- options and the tile path ------------------------------------------------------------


def test_inference_option_is_checked():
    assert InferenceOptions().inference == "slabs"
    assert InferenceOptions(inference="tiles").inference == "tiles"
    with pytest.raises(ValueError, match="inference must be one of"):
        InferenceOptions(inference="slab")


@pytest.mark.parametrize(
    "padding,tile", [("same", (16, 16, 16)), ("valid", (24, 24, 24))], ids=["same", "valid"]
)
@pytest.mark.parametrize(
    "overlap,weights,budget",
    [(False, "constant", None), (True, "constant", None), (True, "gaussian", 60_000)],
    ids=["tiles", "overlap", "overlap-gaussian-budget"],
)
def test_tiles_are_todays_tile_path_bit_for_bit(padding, tile, overlap, weights, budget):
    net = network(padding, 2, channels=2)
    image, mask = volume((15, 13, 10), density=0.3)
    options = InferenceOptions(inference="tiles", weights=weights, memory_budget=budget)
    got = run_stage(
        net,
        image,
        mask,
        tile=tile,
        num_classes=K,
        pad_value=AIR,
        options=options,
        overlap=overlap,
        probabilities=True,
    )
    # As cascade._stage calls it.
    out_size = net.output_size(tile)
    step = overlap_step(out_size, options.overlap_step) if overlap else None
    with torch.inference_mode():
        want = run_tiles(
            net,
            image,
            mask,
            make_grid(tuple(image.shape), tile, out_size, step),
            K,
            pad_value=AIR,
            skip_empty=options.skip_empty,
            weight_mode=weights if overlap else "constant",
            batch_size=options.batch_size,
            probabilities=True,
            memory_budget=budget,
        )
    assert torch.equal(got.labels, want.labels)
    assert torch.equal(got.probabilities, want.probabilities)
    assert (got.tiles_computed, got.tiles_total) == (want.tiles_computed, want.tiles_total)
    assert got.voxels_computed == got.tiles_computed * torch.Size(out_size).numel()


# --- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("levels", [2, 3, 4])
def test_geometry_matches_the_network(padding, levels):
    net = UNet3D(num_classes=3, base_channels=2, levels=levels, padding=padding)
    g = Geometry.of(net)
    assert g.period == 2 ** (levels - 1)
    for n in range(1, 130):
        size = g.input_size(n)
        assert size >= n and net.output_size((size,)) == (g.output_size(size),)
        for smaller in range(max(n, 1), size):
            with pytest.raises(ValueError):
                net.output_size((smaller,))


@pytest.mark.parametrize("levels", [2, 3])
def test_receptive_margin_bounds_a_voxels_influence(levels):
    net = network("same", levels, channels=2)
    g = Geometry.of(net)
    n = 2 * g.margin + 2 * g.period + 2
    image, _ = volume((n, n, n))
    centre = n // 2 - (n // 2) % g.period  # phase-aligned: every pooling cell the same
    with torch.inference_mode():
        base = net(image[None, None])
        image[centre, centre, centre] += 1.0
        moved = net(image[None, None])
    changed = ((moved - base).abs().amax(1)[0] > 0).nonzero()
    reach = (changed - centre).abs().max()
    assert 0 < reach <= g.margin


# --- valid networks: slabs equal phase-aligned small tiles --------------------------------


def valid_case(levels):
    # Oracle tiles of 16 (2 levels) or 20 (3 levels) output voxels, multiples of P.
    return network("valid", levels, channels=2), {2: 32, 3: 60}[levels]


@pytest.mark.parametrize("levels", [2, 3], ids=["levels2", "levels3"])
@pytest.mark.parametrize("budget", [None, 2], ids=["one-slab", "budget"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "every-slab"])
def test_valid_slab_equals_phase_aligned_tiles(levels, budget, skip):
    net, tile_in = valid_case(levels)
    shape = (27, 19, 13)
    image, _ = volume(shape)
    mask = blobs(shape, [(6, 6, 5), (22, 14, 9)], 4)
    want = tiles_at_phase(net, image, (0, 0, 0), tile_in)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    got = run_slabs(
        net,
        image,
        mask,
        num_classes=K,
        pad_value=AIR,
        skip_empty=skip,
        memory_budget=budget_for(net, mask, budget, skip),
        probabilities=True,
    )
    assert assert_agree(got, want, mask) <= 2
    assert got.passes == len(calls) and got.inference == "slabs"
    # Skipping: one box per blob where their halos cost less than one box (2 levels).
    boxes = 2 if skip and levels == 2 else 1
    assert got.passes == boxes if budget is None else got.passes > boxes


@pytest.mark.parametrize("phase", overlap_phases(4), ids=lambda p: "phase" + "".join(map(str, p)))
def test_each_phase_pass_equals_tiles_at_that_phase(phase):
    net, tile_in = valid_case(3)
    image, mask = volume((19, 15, 9), density=0.5)
    got = run_slabs(
        net, image, mask, num_classes=K, pad_value=AIR, phases=(phase,), probabilities=True
    )
    assert_agree(got, tiles_at_phase(net, image, phase, tile_in), mask)
    if any(phase):  # a phase shift is a different prediction, not the same one moved
        other = tiles_at_phase(net, image, (0, 0, 0), tile_in)
        assert (got.probabilities - other).abs().max() > 100 * ATOL


@pytest.mark.parametrize("weights", ["constant", "gaussian"])
def test_overlap_is_the_four_phases_averaged(weights):
    net, tile_in = valid_case(2)
    image, _ = volume((21, 15, 10))
    mask = blobs(image.shape, [(6, 6, 5), (15, 9, 6)], 5)
    budget = budget_for(net, mask, 2)  # several regions: their phase passes meet
    got = run_slabs(
        net,
        image,
        mask,
        num_classes=K,
        pad_value=AIR,
        phases=overlap_phases(2),
        weights=weights,
        memory_budget=budget,
        probabilities=True,
    )
    maps = [tiles_at_phase(net, image, d, tile_in) for d in overlap_phases(2)]
    if weights == "constant":
        assert_agree(got, averaged(maps), mask)
    else:  # each phase weighted by its pass's Gaussian map over the pass's output
        acc = torch.zeros_like(maps[0])
        total = torch.zeros(image.shape)
        for p in plan_stage(net, mask, phases=overlap_phases(2), memory_budget=budget).passes():
            w = tile_weight(p.out_size, "gaussian")[p.keep()]
            where = tuple(slice(a, b) for a, b in zip(*p.region, strict=True))
            acc[(slice(None), *where)] += (
                w * maps[overlap_phases(2).index(p.phase)][(slice(None), *where)]
            )
            total[where] += w
        assert_agree(got, torch.where(total > 0, acc / total, maps[0]), mask)
    assert got.passes % 4 == 0 and got.passes > 4


def test_todays_tiles_alternate_phase_for_four_levels():
    """The paper's 4-level network: outputs of 12 = 4 (mod 8) voxels, so every other tile
    along an axis is at phase 4 and agrees with a phase-0 slab only by chance."""
    net = network("valid", 4, channels=4)
    image, mask = volume((24, 12, 12))
    grid = make_grid(image.shape, (100,) * 3, (12,) * 3)
    with torch.inference_mode():
        tiles = run_tiles(net, image, mask, grid, K, AIR, probabilities=True)
    slab = run_slabs(net, image, mask, num_classes=K, pad_value=AIR, probabilities=True)
    diff = (tiles.probabilities - slab.probabilities).abs().amax(0)
    assert diff[:12].max() <= ATOL  # tile 0, phase 0
    assert diff[12:].max() > 100 * ATOL  # tile 1, phase 4
    assert slab.passes == 1 and tiles.passes == 2


# --- the plan: every voxel gets exactly the intended phases -------------------------------


@pytest.mark.parametrize(
    "padding,levels,budget",
    [("valid", 2, 3), ("valid", 3, 2), ("same", 2, 3), ("same", 3, None)],
    ids=["valid2", "valid3", "same2", "same3"],
)
@pytest.mark.parametrize("density", [0.002, 0.3, 1.0], ids=lambda d: f"density{d}")
def test_every_mask_voxel_gets_each_phase_once(padding, levels, budget, density):
    net = network(padding, levels, channels=2)
    g = Geometry.of(net)
    phases = overlap_phases(g.period)
    _, mask = volume((37, 29, 17), seed=5, density=density)
    budget = budget_for(net, mask, budget)
    plan = plan_stage(net, mask, phases=phases, memory_budget=budget)
    seen = torch.zeros((len(phases), *mask.shape), dtype=torch.int32)
    for p in plan.passes():
        (lo, hi), i = p.region, phases.index(p.phase)
        assert all((o - d) % g.period == 0 for o, d in zip(p.origin, p.phase, strict=True))
        assert all(
            o <= a and b <= o + n for o, a, b, n in zip(p.origin, lo, hi, p.out_size, strict=True)
        )
        assert net.output_size(p.size) == p.out_size
        if padding == "valid":
            assert all(o == s + g.margin for o, s in zip(p.origin, p.start, strict=True))
        if budget is not None:
            assert (
                pass_bytes(net.architecture, p.size, [b - a for a, b in zip(lo, hi, strict=True)])
                <= budget
            )
        seen[(i, *(slice(a, b) for a, b in zip(lo, hi, strict=True)))] += 1
    assert seen.max() <= 1  # regions never overlap, so nothing is computed twice
    assert (seen[:, mask] == 1).all()


def test_separated_parts_get_their_own_boxes_when_cheaper():
    net = network("valid", 2, channels=2)
    far = blobs((60, 20, 16), [(6, 8, 8), (52, 10, 6)], 3)
    near = blobs((60, 20, 16), [(20, 8, 8), (29, 10, 6)], 3)
    assert len(plan_stage(net, far).regions) == 2
    assert len(plan_stage(net, near).regions) == 1  # two halos would cost more
    assert plan_stage(net, torch.zeros_like(far)).regions == []


def test_a_whole_scan_of_the_default_model_is_one_pass():
    net = UNet3D(num_classes=11, base_channels=6, levels=4, padding="same")
    mask = torch.ones((170, 140, 110), dtype=torch.bool)
    assert len(plan_stage(net, mask, skip_empty=False).regions) == 1
    assert len(plan_stage(net, mask, phases=overlap_phases(8)).passes()) == 4


# --- same padding: slabs equal one pass over the whole scan -------------------------------


@pytest.mark.parametrize(
    "levels,shape,budget",
    [
        (2, (41, 30, 23), None),
        (2, (41, 30, 23), 2),
        (2, (41, 30, 23), 3),
        (3, (121, 24, 22), 3),
    ],
    ids=["one-slab", "budget", "small-budget", "levels3-budget"],
)
@pytest.mark.parametrize("phase", [(0, 0, 0), "h"], ids=["phase0", "phase-hh0"])
def test_same_padding_slabs_equal_a_whole_scan_pass(levels, shape, budget, phase):
    net = network("same", levels)
    g = Geometry.of(net)
    phase = (g.period // 2, g.period // 2, 0) if phase == "h" else phase
    image, _ = volume(shape)
    mask = blobs(shape, [(10, 10, 10), (shape[0] - 8, 20, 12)], 7)
    got = run_slabs(
        net,
        image,
        mask,
        num_classes=K,
        pad_value=AIR,
        phases=(phase,),
        memory_budget=budget_for(net, mask, budget),
        probabilities=True,
    )
    assert assert_agree(got, whole_pass(net, image, phase), mask) <= 2
    if budget is not None:  # the budget did cut the boxes
        assert got.passes > len(plan_stage(net, mask).regions)


# --- memory -------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive during a forward pass (storages counted once)."""

    def __init__(self):
        super().__init__()
        self.refs, self.bytes, self.live, self.peak, self.largest = {}, {}, 0, 0, 0

    def _drop(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.bytes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.bytes[key] = t.untyped_storage().nbytes()
                    self.live += self.bytes[key]
                    self.largest = max(self.largest, self.bytes[key])
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize(
    "padding,levels,size",
    [("valid", 2, (40, 34, 30)), ("valid", 3, (60, 52, 48)), ("same", 2, (32, 30, 18))],
    ids=["valid2", "valid3", "same2"],
)
def test_forward_memory_bounds_the_live_tensors(padding, levels, size):
    net = network(padding, levels)
    with torch.inference_mode():
        with LiveBytes() as live:
            x = torch.zeros((1, 1, *size))
            torch.softmax(net(x).float(), dim=1)
    estimate, largest = forward_memory(net.architecture, size)
    assert live.peak <= estimate <= 1.3 * live.peak
    assert 4 * largest == live.largest


def test_a_budget_below_one_minimal_slab_names_the_minimum():
    net = network("valid", 3, channels=2)
    _, mask = volume((20, 20, 12))
    with pytest.raises(ValueError, match="below one minimal slab") as error:
        plan_stage(net, mask, memory_budget=1000)
    minimum = int(re.search(r"at least (\d+) bytes", str(error.value)).group(1))
    assert plan_stage(net, mask, memory_budget=minimum).regions  # enough, just
    with pytest.raises(ValueError, match=str(minimum)):
        plan_stage(net, mask, memory_budget=minimum - 1)


def test_an_automatic_budget_is_a_share_of_the_free_memory(monkeypatch):
    """``"auto"`` plans what the resolved number of bytes plans: a share of the memory
    free now (faked here), on the CPU and on a CUDA device; too little names the share."""
    import fastcascade.options as options

    net = network("valid", 2, channels=2)
    image, mask = volume((40, 20, 12))
    fixed = budget_for(net, mask, 2)
    monkeypatch.setattr(options, "available_memory", lambda: int(fixed / options.AUTO_SHARE["cpu"]))
    assert options.resolve_memory_budget("auto", "cpu") == pytest.approx(fixed, abs=1)
    assert InferenceOptions().memory_budget == "auto"
    assert InferenceOptions().memory_budget_for("cpu") == pytest.approx(fixed, abs=1)
    auto = plan_stage(net, mask, memory_budget="auto")
    assert (
        len(auto.regions) == 2
        and auto.regions == plan_stage(net, mask, memory_budget=fixed).regions
    )
    out = run_stage(
        net,
        image,
        mask,
        tile=(24, 24, 24),
        num_classes=K,
        pad_value=AIR,
        options=InferenceOptions(),
        overlap=False,
        probabilities=False,
    )
    assert out.memory_budget == auto.planner.budget and out.report()["passes"] == 2
    monkeypatch.setattr(options, "cuda_free_memory", lambda device: 10 * 2**30)
    assert options.resolve_memory_budget("auto", "cuda:1") == int(0.8 * 10 * 2**30)
    assert options.resolve_memory_budget(None, "cuda") is None  # no limit stays
    monkeypatch.setattr(options, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"below one minimal slab.*'auto': 50% of the memory"):
        plan_stage(net, mask, memory_budget="auto")
    monkeypatch.setattr(options, "available_memory", lambda: None)  # nothing known
    assert options.resolve_memory_budget("auto", "cpu") is None


class FakeAllocator:
    """A device whose allocations over ``limit`` bytes fail like a full GPU."""

    def __init__(self, limit):
        self.limit, self.failures = limit, 0

    def check(self, nbytes):
        if nbytes > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"fake allocator: {nbytes} > {self.limit} bytes")


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_out_of_memory_halves_the_slab_with_the_same_labels(padding):
    net = network(padding, 2, channels=2)
    image, _ = volume((48, 16, 12))  # long enough for halving to shrink a same-padded slab
    mask = blobs(image.shape, [(12, 8, 6), (34, 8, 6)], 7)
    kwargs = dict(num_classes=K, pad_value=AIR, phases=overlap_phases(2), probabilities=True)
    want = run_slabs(net, image, mask, **kwargs)
    largest = max(torch.Size(p.size).numel() for p in plan_stage(net, mask).passes())
    memory = FakeAllocator(limit=4 * largest * 9 // 10)  # the planned slab does not fit
    net.register_forward_pre_hook(lambda _, args: memory.check(args[0].numel() * 4))
    got = run_slabs(net, image, mask, **kwargs)
    assert memory.failures >= 1 and got.passes > want.passes
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.probabilities, want.probabilities, rtol=0, atol=ATOL)


def test_other_runtime_errors_are_not_swallowed():
    net = network("valid", 2, channels=2)
    image, mask = volume((10, 10, 10))

    def broken(*_):
        raise RuntimeError("not a memory problem")

    net.register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        run_slabs(net, image, mask, num_classes=K, pad_value=AIR)


# --- what a stage reports and reads -------------------------------------------------------


def test_counts_and_an_empty_mask():
    net = network("valid", 2, channels=2)
    image, _ = volume((20, 18, 12))
    empty = torch.zeros(image.shape, dtype=torch.bool)
    out = run_slabs(net, image, empty, num_classes=K, pad_value=AIR, probabilities=True)
    assert out.passes == 0 and out.tiles_total == 1 and out.voxels_computed == 0
    assert not out.labels.any() and (out.probabilities[0] == 1).all()
    mask = blobs(image.shape, [(5, 5, 5)], 3)
    out = run_slabs(net, image, mask, num_classes=K, pad_value=AIR, phases=overlap_phases(2))
    assert out.passes == 4 and out.tiles_total == 4 and out.voxels_grid == 20 * 18 * 12
    plan = plan_stage(net, mask, phases=overlap_phases(2))
    assert out.voxels_computed == sum(torch.Size(p.out_size).numel() for p in plan.passes())


def test_a_scan_smaller_than_the_network_input_is_padded():
    net = network("valid", 3, channels=2)
    image, mask = volume((5, 4, 3))
    got = run_slabs(net, image, mask, num_classes=K, pad_value=AIR, probabilities=True)
    assert got.passes == 1
    assert_agree(got, tiles_at_phase(net, image, (0, 0, 0), 48), mask)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "every-slab"])
def test_one_host_read_per_stage_at_most(monkeypatch, skip):
    net = network("valid", 2, channels=2)
    image, _ = volume((30, 20, 14))
    mask = blobs(image.shape, [(6, 6, 6), (24, 14, 8)], 4)
    reads = []
    real = passes._to_host
    monkeypatch.setattr(passes, "_to_host", lambda t: reads.append(t.numel()) or real(t))
    options = InferenceOptions(inference="slabs", skip_empty=skip)
    with SyncCounter() as counter:
        run_stage(
            net,
            image,
            mask,
            tile=(24,) * 3,
            num_classes=K,
            pad_value=AIR,
            options=options,
            overlap=True,
            probabilities=False,
        )
    assert counter.syncs == 0, counter.by_op
    assert len(reads) == (1 if skip else 0)
    if skip:  # the three projections, not the volume
        assert reads[0] == 30 * 20 + 30 * 14 + 20 * 14
