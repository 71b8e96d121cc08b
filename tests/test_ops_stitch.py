"""Stitching: an identity network must give its input back; scatter == slice-add loop.

The Triton kernels take part as the ``"triton"`` accumulator (Triton's interpreter on the
CPU); their own cases are in ``test_ops_stitch_triton.py``.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastcascade.diagnostics import SyncCounter
from fastcascade.ops import _backend
from fastcascade.ops.stitch import (
    WEIGHT_FLOOR,
    accumulate,
    accumulate_ref,
    finalize,
    finalize_ref,
    tile_weight,
)

ACCUMULATORS = {
    "auto": lambda *a: accumulate(*a, backend="auto"),
    "scatter": lambda *a: accumulate(*a, backend="torch"),
    "loop": accumulate_ref,
    "triton": lambda *a: accumulate(*a, backend="triton"),
}
INTERPRETER = _backend.triton_available() and _backend.interpreter_on()


def accumulators(*names):
    """``names`` as parameters; ``"triton"`` skips without Triton's interpreter."""
    needs = pytest.mark.skipif(not INTERPRETER, reason="needs Triton with TRITON_INTERPRET=1")
    return [pytest.param(n, marks=needs) if n == "triton" else n for n in names]


def random_probabilities(shape, seed) -> torch.Tensor:
    """Softmax over classes with the winning logit raised by 1: top-two margin >= ~1e-2."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(shape, generator=g)
    logits.scatter_add_(0, logits.argmax(0, keepdim=True), torch.ones(1, *shape[1:]))
    return torch.softmax(logits, dim=0)


def grid_origins(acc_spatial, tile, step) -> torch.Tensor:
    axes = [range(0, n - t + 1, s) for n, t, s in zip(acc_spatial, tile, step, strict=True)]
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int64)


def cut_tiles(volume: torch.Tensor, origins: torch.Tensor, tile) -> torch.Tensor:
    return torch.stack(
        [
            volume[:, x : x + tile[0], y : y + tile[1], z : z + tile[2]]
            for x, y, z in origins.tolist()
        ]
    )


def run_identity_network(probs, tile, step, weight, accumulate_fn, batch=3):
    channels, *spatial = probs.shape
    acc = torch.zeros(channels, *spatial)
    weight_sum = torch.zeros(*spatial)
    origins = grid_origins(spatial, tile, step)
    for start in range(0, len(origins), batch):  # the last batch is partial
        o = origins[start : start + batch]
        accumulate_fn(acc, weight_sum, cut_tiles(probs, o, tile), o, weight)
    return acc, weight_sum


# (acc spatial shape, tile, step, weight mode): the accumulator is padded by half a tile in
# x and y, so with half-tile steps every voxel of the inner volume is seen 4 times.
LAYOUTS = {
    "no-overlap": ((8, 10, 6), (4, 5, 3), (4, 5, 3), "constant"),
    "half-step-xy-4x": ((12, 12, 6), (4, 6, 3), (2, 3, 3), "constant"),
    "half-step-xy-gaussian": ((12, 12, 6), (4, 6, 3), (2, 3, 3), "gaussian"),
    "odd-tile-uneven-overlap-gaussian": ((11, 9, 7), (5, 5, 3), (3, 2, 2), "gaussian"),
}


@pytest.mark.parametrize("accumulator", accumulators(*ACCUMULATORS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_identity_network_reconstructs_its_input(layout, accumulator):
    spatial, tile, step, mode = LAYOUTS[layout]
    probs = random_probabilities((11, *spatial), seed=0)
    weight = tile_weight(tile, mode)
    acc, weight_sum = run_identity_network(probs, tile, step, weight, ACCUMULATORS[accumulator])
    assert (weight_sum > 0).all()  # the layouts cover the whole accumulator
    if layout == "half-step-xy-4x":
        assert torch.equal(weight_sum[2:-2, 3:-3], torch.full_like(weight_sum[2:-2, 3:-3], 4.0))

    out = torch.full_like(acc, float("nan"))
    backend = "triton" if accumulator == "triton" else "auto"
    got, labels = finalize(acc, weight_sum, out=out, backend=backend)
    assert got is out
    assert labels.dtype == torch.uint8
    assert torch.equal(labels, probs.argmax(0).to(torch.uint8))
    torch.testing.assert_close(got, probs, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scatter_equals_slice_add_loop(layout):
    spatial, tile, step, mode = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    base = torch.rand(3, *spatial, generator=g)  # accumulate adds to what is there
    results = []
    for fn in (accumulate_ref, lambda *a: accumulate(*a, backend="torch")):
        acc, weight_sum = base.clone(), base[0].clone()
        origins = grid_origins(spatial, tile, step)
        tiles = torch.randn(len(origins), 3, *tile, generator=torch.Generator().manual_seed(2))
        fn(acc, weight_sum, tiles, origins, tile_weight(tile, mode))
        results.append((acc, weight_sum))
    (acc_ref, ws_ref), (acc_fast, ws_fast) = results
    torch.testing.assert_close(acc_fast, acc_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ws_fast, ws_ref, rtol=1e-6, atol=1e-7)
    assert not torch.equal(acc_ref, base)


@pytest.mark.parametrize("accumulator", accumulators(*ACCUMULATORS))
def test_random_origins_half_tiles_and_no_weight(accumulator):
    g = torch.Generator().manual_seed(3)
    tiles = torch.rand(5, 4, 3, 4, 2, generator=g).to(torch.float16)
    origins = torch.tensor(
        [[0, 0, 0], [4, 3, 5], [2, 1, 1], [4, 3, 5], [1, 5, 3]], dtype=torch.int32
    )
    acc, weight_sum = torch.zeros(4, 7, 9, 7), torch.zeros(7, 9, 7)
    ACCUMULATORS[accumulator](acc, weight_sum, tiles, origins, None)
    # Oracle: NumPy float64 slice adds (float16 tiles are exact in float32 and float64).
    acc_np = np.zeros((4, 7, 9, 7))
    ws_np = np.zeros((7, 9, 7))
    for tile, (x, y, z) in zip(tiles.double().numpy(), origins.tolist(), strict=True):
        acc_np[:, x : x + 3, y : y + 4, z : z + 2] += tile
        ws_np[x : x + 3, y : y + 4, z : z + 2] += 1.0
    np.testing.assert_allclose(acc.numpy(), acc_np, rtol=1e-6)
    np.testing.assert_array_equal(weight_sum.numpy(), ws_np)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_finalize_uncovered_and_masked_voxels_are_background(with_mask):
    probs = random_probabilities((5, 6, 6, 4), seed=4)
    acc, weight_sum = torch.zeros(5, 6, 6, 4), torch.zeros(6, 6, 4)
    accumulate(acc, weight_sum, probs[None, :, :4, :4, :], torch.tensor([[0, 0, 0]]))
    covered = torch.zeros(6, 6, 4, dtype=torch.bool)
    covered[:4, :4, :] = True
    mask = None
    valid = covered
    if with_mask:
        mask = torch.rand(6, 6, 4, generator=torch.Generator().manual_seed(5)) > 0.3
        valid = covered & mask

    out = torch.full_like(acc, float("nan"))
    got, labels = finalize(acc, weight_sum, mask=mask, out=out)
    ref_probs, ref_labels = finalize_ref(acc, weight_sum, mask=mask)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(got, ref_probs, rtol=0, atol=0)

    assert torch.equal(labels[valid], probs.argmax(0)[valid].to(torch.uint8))
    assert (labels[~valid] == 0).all()
    torch.testing.assert_close(got[:, valid], probs[:, valid], rtol=1e-6, atol=0)
    assert (got[0, ~valid] == 1).all() and (got[1:, ~valid] == 0).all()


def test_finalize_labels_only_ties_and_float16_out():
    acc = torch.zeros(3, 2, 1, 1)
    acc[:, 0] = torch.tensor([2.0, 5.0, 5.0]).view(3, 1, 1)  # tie: lowest class wins
    acc[:, 1] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    weight_sum = torch.tensor([10.0, 3.0]).view(2, 1, 1)
    probs, labels = finalize(acc, weight_sum, probabilities=False)
    assert probs is None
    assert labels.flatten().tolist() == [1, 0]
    assert torch.equal(labels, finalize_ref(acc, weight_sum, probabilities=False)[1])
    half = torch.full((3, 2, 1, 1), float("nan"), dtype=torch.float16)
    probs, _ = finalize(acc, weight_sum, out=half)
    assert probs.dtype == torch.float16
    torch.testing.assert_close(probs.float(), finalize_ref(acc, weight_sum)[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize("size", [(5, 7, 3), (8, 6, 4), (1, 2, 9)], ids=["odd", "even", "thin"])
def test_gaussian_weight_matches_filtered_delta(size):
    """nnU-Net's construction: a delta at size // 2 blurred by scipy, normalised to max 1."""
    w = tile_weight(size, "gaussian", sigma_scale=0.125)
    assert w.dtype == torch.float32 and tuple(w.shape) == size
    delta = np.zeros(size)
    delta[tuple(n // 2 for n in size)] = 1.0
    blurred = ndimage.gaussian_filter(delta, [n * 0.125 for n in size], mode="constant")
    oracle = blurred / blurred.max()
    inside = oracle > 1e-5  # scipy truncates its kernel at 4 sigma
    np.testing.assert_allclose(w.numpy()[inside], oracle[inside], rtol=1e-5)
    assert w[tuple(n // 2 for n in size)] == 1.0 and w.max() == 1.0
    assert w.min() >= WEIGHT_FLOOR


def test_gaussian_weight_is_floored_and_constant_weight_is_ones():
    w = tile_weight((16, 16, 16), "gaussian")
    assert w[0, 0, 0] == pytest.approx(WEIGHT_FLOOR)  # exp(-24) lies below the floor
    assert w[8, 8, 0] == pytest.approx(np.exp(-8.0), rel=1e-6)
    assert torch.equal(tile_weight((3, 4, 5)), torch.ones(3, 4, 5))


@pytest.mark.parametrize("accumulator", accumulators(*ACCUMULATORS))
@pytest.mark.parametrize(
    "case",
    [
        "negative-origin",
        "origin-past-end",
        "float-origins",
        "origins-shape",
        "channel-mismatch",
        "acc-float64",
        "weight-sum-shape",
        "weight-shape",
        "tiles-4d",
    ],
)
def test_accumulate_rejects_bad_inputs_without_writing(case, accumulator):
    acc, weight_sum = torch.zeros(2, 6, 6, 6), torch.zeros(6, 6, 6)
    tiles = torch.ones(2, 2, 3, 3, 3)
    origins = torch.tensor([[0, 0, 0], [1, 1, 1]])
    weight = None
    error = ValueError
    if case == "negative-origin":
        origins[1, 2] = -1
    elif case == "origin-past-end":
        origins[1] = torch.tensor([3, 4, 0])  # y: 4 + 3 > 6
    elif case == "float-origins":
        origins, error = origins.float(), TypeError
    elif case == "origins-shape":
        origins = origins[:, :2]
    elif case == "channel-mismatch":
        tiles = torch.ones(2, 3, 3, 3, 3)
    elif case == "acc-float64":
        acc = acc.double()
    elif case == "weight-sum-shape":
        weight_sum = torch.zeros(6, 6, 5)
    elif case == "weight-shape":
        weight = torch.ones(3, 3, 2)
    elif case == "tiles-4d":
        tiles = tiles[0]
    before = acc.clone(), weight_sum.clone()
    with pytest.raises(error):
        ACCUMULATORS[accumulator](acc, weight_sum, tiles, origins, weight)
    assert torch.equal(acc, before[0]) and torch.equal(weight_sum, before[1])


#: What each bad input's error says (the test id → a regular expression).
BAD_INPUT_MESSAGES = {
    "weight-sum-shape": "weight_sum must be float32",
    "acc-float64": "acc must be float32",
    "too-many-classes-for-uint8": "1 <= C <= 256",
    "float-mask": "mask must be None or a bool tensor",
    "mask-shape": "mask must be \\(3, 3, 3\\)",
    "out-shape": "out must be a floating",
    "finalize-unknown-backend": "finalize: backend must be one of",
    "accumulate-unknown-backend": "accumulate: backend must be one of",
    "weight-2d-size": "size must have 3 entries",
    "weight-zero-size": "size must be >= 1 voxel",
    "weight-float-size": "size must be 3 integers",
    "weight-unknown-mode": "mode must be one of",
    "weight-zero-sigma": "sigma_scale must be finite and > 0",
}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: finalize(torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 2)), ValueError),
        (
            lambda: finalize(torch.zeros(2, 3, 3, 3, dtype=torch.float64), torch.zeros(3, 3, 3)),
            ValueError,
        ),
        (lambda: finalize(torch.zeros(257, 1, 1, 1), torch.zeros(1, 1, 1)), ValueError),
        (
            lambda: finalize(
                torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3), mask=torch.ones(3, 3, 3)
            ),
            TypeError,
        ),
        (
            lambda: finalize(
                torch.zeros(2, 3, 3, 3),
                torch.zeros(3, 3, 3),
                mask=torch.ones(3, 3, 2, dtype=torch.bool),
            ),
            ValueError,
        ),
        (
            lambda: finalize(
                torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3), out=torch.zeros(2, 3, 3, 2)
            ),
            ValueError,
        ),
        (
            lambda: finalize(torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3), backend="cupy"),
            ValueError,
        ),
        (
            lambda: accumulate(
                torch.zeros(1, 2, 2, 2),
                torch.zeros(2, 2, 2),
                torch.zeros(0, 1, 1, 1, 1),
                torch.zeros(0, 3, dtype=torch.long),
                backend="cupy",
            ),
            ValueError,
        ),
        (lambda: tile_weight((3, 3)), ValueError),
        (lambda: tile_weight((3, 3, 0)), ValueError),
        (lambda: tile_weight((3, 3, 2.5)), TypeError),
        (lambda: tile_weight((3, 3, 3), "hann"), ValueError),
        (lambda: tile_weight((3, 3, 3), "gaussian", sigma_scale=0.0), ValueError),
    ],
    ids=[
        "weight-sum-shape",
        "acc-float64",
        "too-many-classes-for-uint8",
        "float-mask",
        "mask-shape",
        "out-shape",
        "finalize-unknown-backend",
        "accumulate-unknown-backend",
        "weight-2d-size",
        "weight-zero-size",
        "weight-float-size",
        "weight-unknown-mode",
        "weight-zero-sigma",
    ],
)
def test_bad_inputs_raise(call, error, request):
    case = request.node.callspec.id
    with pytest.raises(error, match=BAD_INPUT_MESSAGES[case]):
        call()


def test_empty_batch_is_a_no_op():
    acc, weight_sum = torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3)
    for backend in ("auto", "torch") + (("triton",) if INTERPRETER else ()):
        accumulate(
            acc,
            weight_sum,
            torch.zeros(0, 2, 2, 2, 2),
            torch.zeros(0, 3, dtype=torch.long),
            backend=backend,
        )
    assert not acc.any() and not weight_sum.any()


def test_host_reads_scatter_one_bounds_check_finalize_none():
    acc, weight_sum = torch.zeros(2, 6, 6, 6), torch.zeros(6, 6, 6)
    tiles, origins = torch.rand(2, 2, 3, 3, 3), torch.tensor([[0, 0, 0], [1, 2, 3]])
    with SyncCounter() as reads:
        accumulate(acc, weight_sum, tiles, origins, tile_weight((3, 3, 3)), backend="torch")
    assert reads.syncs == 1  # the bounds check of the origins
    with SyncCounter() as reads:
        finalize(acc, weight_sum, mask=torch.rand(6, 6, 6) > 0.5)
    assert reads.syncs == 0
