"""Stitching's Triton kernels (``fastcascade/ops/stitch.py``) against the slice-add loop,
``accumulate_ref`` and ``normalise then argmax``: Triton's interpreter on the CPU, and
``-m gpu`` on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from launch_guard import record_launches

from fastcascade.ops import _backend
from fastcascade.ops import stitch as stitch_module
from fastcascade.ops.stitch import (
    _finalize_triton,
    accumulate,
    accumulate_ref,
    finalize,
    finalize_ref,
    tile_weight,
)

needs_interpreter = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="needs Triton with TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def slice_add_oracle(base_acc, base_ws, tiles, origins, weight):
    """The plain slice-add loop in float64 NumPy, independent of the code under test."""
    acc, ws = base_acc.double().numpy().copy(), base_ws.double().numpy().copy()
    size = tiles.shape[2:]
    w = np.ones(size) if weight is None else weight.double().numpy()
    for tile, (x, y, z) in zip(tiles.double().numpy(), origins.tolist(), strict=True):
        region = (slice(x, x + size[0]), slice(y, y + size[1]), slice(z, z + size[2]))
        acc[(slice(None), *region)] += tile * w
        ws[region] += w
    return acc, ws


def random_origins(spatial, tile, count, seed):
    """``count`` origins that fit, the two extreme corners (tiles touching every border)
    and one repeated origin among them."""
    g = torch.Generator().manual_seed(seed)
    hi = [n - t for n, t in zip(spatial, tile, strict=True)]
    corners = [[0, 0, 0], hi]
    rest = [[int(torch.randint(0, h + 1, (1,), generator=g)) for h in hi] for _ in range(count)]
    rows = corners + rest
    rows.append(rows[2] if count else rows[1])
    return torch.tensor(rows, dtype=torch.int64)


# (acc spatial shape, tile, random origins besides the corners and the repeat, classes)
ACCUMULATE_CASES = {
    "one-tile-filling-acc": ((5, 4, 3), (5, 4, 3), -1, 3),
    "odd-overlapping": ((11, 9, 7), (5, 4, 3), 4, 5),
    "thin-z-one-class": ((9, 6, 1), (4, 3, 1), 3, 1),
    "tile-longer-than-a-block-row": ((7, 5, 70), (3, 2, 66), 2, 2),
}


def _case(name, seed):
    spatial, tile, count, channels = ACCUMULATE_CASES[name]
    if count < 0:
        origins = torch.zeros(1, 3, dtype=torch.int64)  # B = 1
    else:
        origins = random_origins(spatial, tile, count, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tiles = torch.rand(len(origins), channels, *tile, generator=g)
    base_acc = torch.rand(channels, *spatial, generator=g)  # accumulate adds to what is there
    base_ws = torch.rand(*spatial, generator=g)
    return tiles, origins, base_acc, base_ws


@needs_interpreter
@pytest.mark.parametrize("weight_mode", ["none", "constant", "gaussian"])
@pytest.mark.parametrize("case", list(ACCUMULATE_CASES))
def test_triton_accumulate_equals_loop_and_oracle(case, weight_mode):
    tiles, origins, base_acc, base_ws = _case(case, seed=10)
    size = tuple(tiles.shape[2:])
    weight = None if weight_mode == "none" else tile_weight(size, weight_mode)
    got_acc, got_ws = base_acc.clone(), base_ws.clone()
    accumulate(got_acc, got_ws, tiles, origins, weight, backend="triton")
    ref_acc, ref_ws = base_acc.clone(), base_ws.clone()
    accumulate_ref(ref_acc, ref_ws, tiles, origins, weight)
    # Atomics may add in another order than the loop: a few ulp.
    torch.testing.assert_close(got_acc, ref_acc, rtol=4e-7, atol=1e-7)
    torch.testing.assert_close(got_ws, ref_ws, rtol=4e-7, atol=1e-7)
    oracle_acc, oracle_ws = slice_add_oracle(base_acc, base_ws, tiles, origins, weight)
    np.testing.assert_allclose(got_acc.numpy(), oracle_acc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_ws.numpy(), oracle_ws, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got_acc, base_acc)


@needs_interpreter
def test_triton_accumulate_float16_tiles_and_programs_smaller_than_a_tile(monkeypatch):
    # 8 voxels per program: rows split across programs, z rows across blocks.
    monkeypatch.setattr(stitch_module, "INTERPRETER_VOXELS", 8)
    tiles, origins, base_acc, base_ws = _case("odd-overlapping", seed=20)
    tiles = tiles.half()
    weight = tile_weight(tuple(tiles.shape[2:]), "gaussian")
    got_acc, got_ws = base_acc.clone(), base_ws.clone()
    accumulate(got_acc, got_ws, tiles, origins, weight, backend="triton")
    oracle_acc, oracle_ws = slice_add_oracle(base_acc, base_ws, tiles, origins, weight)
    np.testing.assert_allclose(got_acc.numpy(), oracle_acc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_ws.numpy(), oracle_ws, rtol=1e-6, atol=1e-7)


@needs_interpreter
def test_triton_accumulate_strided_views_leave_the_rest_alone():
    """``acc`` a view into a padded buffer, tiles a permuted view: only the view changes
    (the buffer's other voxels are NaN and stay NaN)."""
    buffer = torch.full((4, 13, 11, 9), float("nan"))
    wbuffer = torch.full((13, 11, 9), float("nan"))
    acc, ws = buffer[1:, 2:12, 1:10, :7], wbuffer[2:12, 1:10, :7]  # (3, 10, 9, 7)
    acc.zero_()
    ws.zero_()
    g = torch.Generator().manual_seed(30)
    raw = torch.rand(5, 4, 3, 4, 3, generator=g)  # (B, z, C, y, x)
    tiles = raw.permute(0, 2, 4, 3, 1)  # (B, C, x, y, z) = (5, 3, 3, 4, 4), not contiguous
    assert not tiles.is_contiguous()
    origins = random_origins((10, 9, 7), (3, 4, 4), 2, seed=31).to(torch.int32)
    weight = tile_weight((3, 4, 4), "gaussian")
    accumulate(acc, ws, tiles, origins, weight, backend="triton")
    oracle_acc, oracle_ws = slice_add_oracle(
        torch.zeros(3, 10, 9, 7), torch.zeros(10, 9, 7), tiles, origins, weight
    )
    np.testing.assert_allclose(acc.numpy(), oracle_acc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ws.numpy(), oracle_ws, rtol=1e-6, atol=1e-7)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[1:, 2:12, 1:10, :7] = False
    assert buffer[outside].isnan().all()
    assert wbuffer.isnan().sum() == wbuffer.numel() - ws.numel()


def _accumulated(seed, channels=5, spatial=(9, 7, 5), tile=(4, 4, 3)):
    """An accumulator of softmax tiles with uncovered (weight 0) voxels at its far end."""
    g = torch.Generator().manual_seed(seed)
    origins = torch.tensor([[0, 0, 0], [3, 2, 1], [1, 3, 2], [3, 2, 1]])
    tiles = torch.softmax(3.0 * torch.randn(4, channels, *tile, generator=g), dim=1)
    acc, ws = torch.zeros(channels, *spatial), torch.zeros(spatial)
    accumulate_ref(acc, ws, tiles, origins, tile_weight(tile, "gaussian"))
    assert (ws == 0).any() and (ws > 0).any()
    return acc, ws


MASKS = {
    "no-mask": None,
    "random": lambda shape, g: torch.rand(shape, generator=g) > 0.4,
    "empty": lambda shape, g: torch.zeros(shape, dtype=torch.bool),
    "full": lambda shape, g: torch.ones(shape, dtype=torch.bool),
}


@needs_interpreter
@pytest.mark.parametrize("probabilities", [True, False], ids=["probs", "labels-only"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_fused_finalize_equals_normalise_then_argmax(mask_kind, probabilities):
    acc, ws = _accumulated(seed=40)
    g = torch.Generator().manual_seed(41)
    mask = None if MASKS[mask_kind] is None else MASKS[mask_kind](ws.shape, g)
    out = torch.full_like(acc, float("nan")) if probabilities else None
    poison = torch.full(ws.shape, 0xAB, dtype=torch.uint8)  # no class has this label
    labels = _finalize_triton(acc, ws, mask, out, labels=poison)
    # The oracle: normalise, then argmax, then background where invalid.
    valid = ws > 0 if mask is None else (ws > 0) & mask
    normalised = acc / ws
    expected = torch.where(valid, normalised.argmax(0), 0).to(torch.uint8)
    assert labels is poison and torch.equal(labels, expected)
    ref_probs, ref_labels = finalize_ref(acc, ws, mask=mask, probabilities=probabilities)
    assert torch.equal(labels, ref_labels)
    if probabilities:
        torch.testing.assert_close(out, ref_probs, rtol=1.2e-7, atol=0)  # within an ulp
        assert (out[0, ~valid] == 1).all() and (out[1:, ~valid] == 0).all()
    public_probs, public_labels = finalize(
        acc, ws, mask=mask, probabilities=probabilities, backend="triton"
    )
    assert torch.equal(public_labels, ref_labels)
    assert (public_probs is None) == (not probabilities)


@needs_interpreter
def test_fused_finalize_ties_nan_and_infinities_follow_torch_argmax():
    values = {
        "tie-first-two": [5.0, 5.0, 1.0, 0.0],
        "tie-last-two": [1.0, 2.0, 7.0, 7.0],
        "all-equal": [3.0, 3.0, 3.0, 3.0],
        "all-minus-inf": [float("-inf")] * 4,
        "plus-inf-late": [1.0, 2.0, 3.0, float("inf")],
        "nan-after-max": [9.0, float("nan"), 1.0, float("nan")],
        "nan-first": [float("nan"), 9.0, 9.0, 1.0],
        "negative": [-3.0, -1.0, -1.0, -2.0],
    }
    acc = torch.tensor(list(values.values())).T.reshape(4, len(values), 1, 1)
    ws = torch.ones(len(values), 1, 1)
    _, labels = finalize(acc, ws, probabilities=False, backend="triton")
    expected = acc.argmax(0).to(torch.uint8)
    assert labels.flatten().tolist() == expected.flatten().tolist() == [0, 2, 0, 0, 3, 1, 0, 1]


@needs_interpreter
def test_fused_finalize_strided_views_as_the_stages_pass_them():
    """tiling.py finalises a slice of a padded accumulator; passes.py writes into a region
    of the scan-sized probability volume through ``out``: only that region is written."""
    acc_full, ws_full = _accumulated(seed=50, spatial=(11, 9, 6))
    acc, ws = acc_full[:, 1:10, :8, 1:], ws_full[1:10, :8, 1:]  # views, not contiguous
    mask = (torch.rand(5, 9, 8, generator=torch.Generator().manual_seed(51)) > 0.3).permute(1, 2, 0)
    assert not (acc.is_contiguous() or ws.is_contiguous() or mask.is_contiguous())
    volume = torch.full((5, 12, 10, 7), float("nan"))
    out = volume[:, 2:11, 1:9, 2:7]
    probs, labels = finalize(acc, ws, mask=mask, out=out, backend="triton")
    ref_probs, ref_labels = finalize_ref(acc, ws, mask=mask)
    assert probs is out and torch.equal(labels, ref_labels)
    torch.testing.assert_close(out, ref_probs, rtol=1.2e-7, atol=0)
    outside = torch.ones_like(volume, dtype=torch.bool)
    outside[:, 2:11, 1:9, 2:7] = False
    assert volume[outside].isnan().all()


@needs_interpreter
def test_fused_finalize_float16_out_and_small_programs(monkeypatch):
    monkeypatch.setattr(stitch_module, "INTERPRETER_VOXELS", 32)  # 10 programs
    acc, ws = _accumulated(seed=60, channels=19)
    out = torch.full(acc.shape, float("nan"), dtype=torch.float16)
    probs, labels = finalize(acc, ws, out=out, backend="triton")
    ref_probs, ref_labels = finalize_ref(acc, ws)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(probs, ref_probs.half())  # one rounding of the same fp32 quotient


@needs_interpreter
def test_triton_zero_sized_volumes_and_batches():
    acc, ws = torch.zeros(3, 0, 4, 5), torch.zeros(0, 4, 5)
    probs, labels = finalize(acc, ws, backend="triton")
    assert probs.shape == (3, 0, 4, 5) and labels.shape == (0, 4, 5)
    acc, ws = torch.zeros(2, 4, 4, 4), torch.zeros(4, 4, 4)
    accumulate(acc, ws, torch.ones(0, 2, 2, 2, 2), torch.zeros(0, 3, dtype=torch.long),
               backend="triton")  # fmt: skip
    assert not acc.any() and not ws.any()
    no_classes = torch.zeros(0, 4, 4, 4)
    accumulate(no_classes, ws, torch.ones(1, 0, 2, 2, 2), torch.zeros(1, 3, dtype=torch.long),
               backend="triton")  # fmt: skip
    assert ws.sum() == 8  # no classes, but the tile's weight still counts


ZERO_ORIGIN = torch.zeros(1, 3, dtype=torch.int64)


def test_named_triton_without_gpu_or_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    acc, ws = torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3)
    with pytest.raises(_backend.BackendUnavailableError, match="CUDA tensor"):
        finalize(acc, ws, backend="triton")
    with pytest.raises(_backend.BackendUnavailableError, match="CUDA tensor"):
        accumulate(acc, ws, torch.ones(1, 2, 2, 2, 2), ZERO_ORIGIN, backend="triton")


def test_auto_asks_resolve_for_triton_off_the_cpu(monkeypatch):
    """On a device tensor (here "meta", which needs no GPU) "auto" goes through
    ``_backend.resolve`` with Triton first and runs what it picks; on the CPU the loop."""
    calls = []

    def fake_resolve(backend, tensor, candidates):
        calls.append((backend, tensor.device.type, candidates))
        return "triton"

    launched = []
    monkeypatch.setattr(_backend, "resolve", fake_resolve)
    monkeypatch.setattr(stitch_module, "_accumulate_triton", lambda *a: launched.append("acc"))
    monkeypatch.setattr(stitch_module, "_finalize_triton", lambda *a: launched.append("fin"))
    acc, ws = torch.zeros(2, 4, 4, 4, device="meta"), torch.zeros(4, 4, 4, device="meta")
    accumulate(acc, ws, torch.ones(1, 2, 2, 2, 2, device="meta"), ZERO_ORIGIN)
    finalize(acc, ws, probabilities=False)
    assert launched == ["acc", "fin"]
    assert calls == [("auto", "meta", ("triton", "torch"))] * 2
    cpu_acc, cpu_ws = torch.zeros(2, 4, 4, 4), torch.zeros(4, 4, 4)
    accumulate(cpu_acc, cpu_ws, torch.ones(1, 2, 2, 2, 2), ZERO_ORIGIN)
    assert len(calls) == 2 and cpu_ws.sum() == 8  # the CPU's "auto" is the slice-add loop


# -- GPU (opt-in: pytest -m gpu, with TRITON_INTERPRET=0) ------------------------------------------
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if _backend.interpreter_on():
        pytest.skip("run GPU tests with TRITON_INTERPRET=0 (the interpreter is on)")


def top_two_margin(probs: torch.Tensor) -> torch.Tensor:
    top = probs.topk(2, dim=0).values
    return top[0] - top[1]


@pytest.mark.gpu
@pytest.mark.parametrize("weight_mode", ["constant", "gaussian"])
def test_gpu_triton_stitching_equals_the_loop(weight_mode):
    """Tiles of 44x44x28 (8 classes) overlapping into 8x160x150x120: labels as the loop's
    except where its top-two margin is below EPS; probabilities within a few ulp."""
    _needs_cuda()
    eps = 1e-5
    g = torch.Generator(device="cuda").manual_seed(0)
    spatial, tile = (160, 150, 120), (44, 44, 28)
    axes = [torch.arange(0, n - t + 1, t // 2) for n, t in zip(spatial, tile, strict=True)]
    origins = torch.cartesian_prod(*axes).cuda()
    logits = 3.0 * torch.randn(len(origins), 8, *tile, generator=g, device="cuda")
    tiles = torch.softmax(logits, dim=1)
    weight = tile_weight(tile, weight_mode, device="cuda")
    results = {}
    for name, fn in {
        "loop": accumulate_ref,
        "triton": lambda *a: accumulate(*a, backend="triton"),
        "auto": lambda *a: accumulate(*a, backend="auto"),
    }.items():
        acc = torch.zeros(8, *spatial, device="cuda")
        ws = torch.zeros(spatial, device="cuda")
        fn(acc, ws, tiles, origins, weight)
        results[name] = (acc, ws)
    ref_acc, ref_ws = results["loop"]
    ref_probs, ref_labels = finalize(ref_acc, ref_ws, backend="torch")
    close = top_two_margin(ref_probs) < eps
    for name in ("triton", "auto"):
        acc, ws = results[name]
        torch.testing.assert_close(ws, ref_ws, rtol=1e-6, atol=1e-6)
        probs, labels = finalize(acc, ws, backend="triton")
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-6)
        differ = labels != ref_labels
        print(f"{name}: {int(close.sum())} voxels with margin < {eps}, {int(differ.sum())} differ")
        assert not (differ & ~close).any()


@pytest.mark.gpu
def test_gpu_fused_finalize_equals_torch_with_mask_and_views():
    _needs_cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    acc_full = torch.rand(11, 130, 97, 151, generator=g, device="cuda")
    ws_full = torch.rand(130, 97, 151, generator=g, device="cuda")
    ws_full[:, :, :9] = 0.0  # uncovered voxels
    acc, ws = acc_full[:, 1:129, :, 2:], ws_full[1:129, :, 2:]
    mask = torch.rand(128, 97, 149, generator=g, device="cuda") > 0.3
    for probabilities in (True, False):
        ref_probs, ref_labels = finalize(acc, ws, mask=mask, probabilities=probabilities,
                                         backend="torch")  # fmt: skip
        out = torch.full_like(acc, float("nan")) if probabilities else None
        probs, labels = finalize(acc, ws, mask=mask, probabilities=probabilities, out=out,
                                 backend="triton")  # fmt: skip
        assert torch.equal(labels, ref_labels)
        if probabilities:
            assert torch.equal(probs, ref_probs)  # IEEE division on both sides


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets_past_two_to_the_31():
    _needs_cuda()
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    acc = torch.zeros(8, 700, 700, 600, device="cuda")  # 2.35e9 elements
    ws = torch.zeros(700, 700, 600, device="cuda")
    tiles = torch.zeros(1, 8, 4, 4, 4, device="cuda")
    tiles[0, 7] = 1.0  # the last class wins in the last tile
    accumulate(acc, ws, tiles, torch.tensor([[696, 696, 596]], device="cuda"), backend="triton")
    _, labels = finalize(acc, ws, probabilities=False, backend="triton")
    assert float(acc[7, -4:, -4:, -4:].sum()) == 64.0 and float(acc.sum()) == 64.0
    assert (labels[-4:, -4:, -4:] == 7).all() and int(labels.sum()) == 7 * 64


@needs_interpreter
def test_kernels_launch_inside_the_accumulators_device_guard(monkeypatch):
    launches = record_launches(monkeypatch, stitch_module, "_accumulate_kernel", "_finalize_kernel")
    g = torch.Generator().manual_seed(5)
    acc, ws = torch.zeros(3, 6, 5, 4), torch.zeros(6, 5, 4)
    tiles = torch.rand(2, 3, 4, 3, 4, generator=g)
    origins = torch.tensor([[0, 0, 0], [2, 2, 0]])
    accumulate(acc, ws, tiles, origins, backend="triton")
    probs, labels = finalize(acc, ws, backend="triton")
    assert [len(held) for held in launches] == [1, 1]
    assert all(held[-1] is acc for held in launches)
    want_acc, want_ws = acc.clone().zero_(), ws.clone().zero_()
    accumulate_ref(want_acc, want_ws, tiles, origins)
    torch.testing.assert_close(acc, want_acc)
    want_probs, want_labels = finalize_ref(want_acc, want_ws)
    assert torch.equal(labels, want_labels)
    torch.testing.assert_close(probs, want_probs)
