"""The paper's class-weighted cross-entropy against hand computations and F.cross_entropy."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fastcascade.train.loss import class_weights, weighted_cross_entropy


def _example(seed=0, n=2, k=4, shape=(3, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, *shape, generator=g, dtype=torch.float64).float() * 3
    target = torch.randint(0, k, (n, *shape), generator=g)
    region = torch.rand(n, *shape, generator=g) < 0.7
    return logits, target, region


def _hand_loss(logits, target, region):
    """Eq. 3-4 with explicit loops, math.exp and math.log."""
    n, k = logits.shape[:2]
    spatial = list(itertools.product(*(range(s) for s in logits.shape[2:])))
    voxels = [(b, idx) for b in range(n) for idx in spatial if region[(b, *idx)]]
    n_c = len(voxels)
    counts = [sum(1 for b, idx in voxels if int(target[(b, *idx)]) == c) for c in range(k)]
    lam = [(1 - counts[c] / n_c) / (k - 1) for c in range(k)]
    total = 0.0
    for b, idx in voxels:
        z = [float(logits[(b, c, *idx)]) for c in range(k)]
        y = int(target[(b, *idx)])
        p = math.exp(z[y]) / sum(math.exp(v) for v in z)
        total += lam[y] * math.log(p)
    return -total / n_c, lam


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_matches_hand_computation(seed):
    logits, target, region = _example(seed)
    want, lam = _hand_loss(logits, target, region)
    got = weighted_cross_entropy(logits, target, region)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert class_weights(target, region, logits.shape[1]).tolist() == pytest.approx(lam, rel=1e-6)


def test_matches_weighted_f_cross_entropy():
    """Independent oracle: PyTorch's weighted CE summed over C, divided by |C|."""
    logits, target, region = _example(3, n=2, k=5, shape=(4, 3, 5))
    lam = class_weights(target, region, 5)
    per_voxel = F.cross_entropy(logits, target, weight=lam, reduction="none")
    want = per_voxel[region].sum() / region.sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, target, region), want)


def test_tiny_example_values():
    # three background voxels and one liver voxel, uniform logits: λ = (1/4, 3/4),
    # L = -(3·¼·log ½ + ¾·log ½) / 4 = (3/8)·log 2
    logits = torch.zeros(1, 2, 1, 1, 4)
    target = torch.tensor([[[[0, 0, 0, 1]]]])
    region = torch.ones_like(target, dtype=torch.bool)
    assert class_weights(target, region, 2).tolist() == [0.25, 0.75]
    assert float(weighted_cross_entropy(logits, target, region)) == pytest.approx(
        3 / 8 * math.log(2)
    )


@pytest.mark.parametrize("k", [2, 4, 11], ids=lambda k: f"K{k}")
def test_weights_sum_to_one_when_all_classes_present(k):
    g = torch.Generator().manual_seed(k)
    target = torch.cat([torch.arange(k), torch.randint(0, k, (50,), generator=g)]).view(1, -1, 1, 1)
    region = torch.ones_like(target, dtype=torch.bool)
    w = class_weights(target, region, k)
    assert w.shape == (k,)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (w > 0).all()
    # rarer classes weigh more
    counts = torch.bincount(target.view(-1), minlength=k)
    order = torch.argsort(counts)
    assert (w[order].diff() <= 1e-7).all()


def test_counts_run_over_the_whole_batch():
    # batch item 0 is all class 0, item 1 all class 1: per-batch counts give λ = (½, ½)
    target = torch.tensor([0, 0, 1, 1]).view(2, 2, 1, 1)
    region = torch.ones_like(target, dtype=torch.bool)
    assert class_weights(target, region, 2).tolist() == [0.5, 0.5]


def test_outside_region_affects_neither_loss_nor_gradient():
    logits, target, region = _example(4, k=3)
    logits.requires_grad_(True)
    loss = weighted_cross_entropy(logits, target, region)
    loss.backward()
    grad = logits.grad.clone()

    g = torch.Generator().manual_seed(9)
    outside = ~region
    logits2 = logits.detach().clone()
    logits2[outside.unsqueeze(1).expand_as(logits2)] = 1e4 * torch.rand(
        int(outside.sum()) * 3, generator=g
    )
    target2 = target.clone()
    target2[outside] = (target2[outside] + 1) % 3
    logits2.requires_grad_(True)
    loss2 = weighted_cross_entropy(logits2, target2, region)
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert torch.equal(logits2.grad, grad)
    assert (grad.permute(1, 0, 2, 3, 4)[:, outside] == 0).all()
    assert (grad.permute(1, 0, 2, 3, 4)[:, region] != 0).any()


def test_labels_outside_region_may_be_out_of_range():
    logits, target, region = _example(5, k=3)
    target2 = target.clone()
    target2[~region] = 200  # e.g. an "ignore" id: never read
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target2, region),
        weighted_cross_entropy(logits, target, region),
    )


def test_empty_region_returns_zero_with_zero_gradient():
    logits, target, _ = _example(6)
    logits.requires_grad_(True)
    region = torch.zeros_like(target, dtype=torch.bool)
    loss = weighted_cross_entropy(logits, target, region)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.equal(class_weights(target, region, 4), torch.zeros(4))


def test_single_class_in_region_gives_zero_loss():
    # λ_k = (1 - N_k/N_C)/(K-1) = 0 for the only class present: the paper's weighting
    logits, _, region = _example(7)
    target = torch.full(region.shape, 2)
    assert float(weighted_cross_entropy(logits, target, region)) == 0.0


def test_numerically_stable_for_large_logits():
    logits, target, region = _example(8)
    big = logits * 1e4
    loss = weighted_cross_entropy(big, target, region)
    assert torch.isfinite(loss)
    ref = F.cross_entropy(
        big.double(), target, weight=class_weights(target, region, 4).double(), reduction="none"
    )
    torch.testing.assert_close(
        loss.double(), ref[region].sum() / region.sum(), rtol=1e-5, atol=1e-3
    )


def test_half_precision_logits_computed_in_float32():
    logits, target, region = _example(10)
    got = weighted_cross_entropy(logits.half(), target, region)
    assert got.dtype == torch.float32
    want = weighted_cross_entropy(logits.half().float(), target, region)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "case, error",
    [
        ("float_target", TypeError),
        ("int_region", TypeError),
        ("shape_mismatch", ValueError),
        ("class_out_of_range", ValueError),
        ("logits_4d", ValueError),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_rejects_bad_input(case, error):
    logits, target, region = _example(11)
    if case == "float_target":
        target = target.float()
    elif case == "int_region":
        region = region.int()
    elif case == "shape_mismatch":
        region = region[:, :-1]
    elif case == "class_out_of_range":
        target = target.clone()
        target[region] = 4
    elif case == "logits_4d":
        logits = logits[:, :, 0]
    with pytest.raises(error):
        weighted_cross_entropy(logits, target, region)
