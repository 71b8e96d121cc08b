"""Evaluation against hand computations and independent oracles (set arithmetic, the exact
Wilcoxon distribution enumerated by hand, SciPy's Euclidean distance transform)."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import wilcoxon

from fastcascade.config import CLASS_NAMES
from fastcascade.evaluate import (
    candidate_recall_fpr,
    compare_stages,
    confusion_matrix,
    dice,
    markdown_table,
    summarize,
)

# ----------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------

# pred / ref on a 2x3x1 grid, voxels a..f; per class, counted by hand:
#   0: P={a}, R={a,d}        -> 2·1/(1+2)
#   1: P={b,c}, R={b}        -> 2·1/(2+1)
#   2: P={d,e,f}, R={c,e,f}  -> 2·2/(3+3)
#   3: absent from both      -> NaN
PRED = np.array([0, 1, 1, 2, 2, 2]).reshape(2, 3, 1)
REF = np.array([0, 1, 2, 0, 2, 2]).reshape(2, 3, 1)
BY_HAND = [2 * 1 / (1 + 2), 2 * 1 / (2 + 1), 2 * 2 / (3 + 3), math.nan]


@pytest.mark.parametrize(
    "kind", ["numpy-int64", "torch-uint8", "torch-int32", "mixed"], ids=lambda k: k
)
def test_dice_by_hand(kind):
    pred, ref = PRED, REF
    if kind == "torch-uint8":
        pred, ref = torch.from_numpy(PRED).to(torch.uint8), torch.from_numpy(REF).to(torch.uint8)
    elif kind == "torch-int32":
        pred, ref = torch.from_numpy(PRED).int(), torch.from_numpy(REF).int()
    elif kind == "mixed":
        pred = torch.from_numpy(PRED)
    got = dice(pred, ref, 4)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, BY_HAND, rtol=1e-12, equal_nan=True)


def test_dice_present_in_one_map_only_is_zero_and_perfect_is_one():
    ref = np.zeros((3, 3, 3), np.uint8)
    ref[1, 1, 1] = 2
    pred = ref.copy()
    pred[0, 0, 0] = 1  # false positive of class 1, class 2 exact
    got = dice(pred, ref, 3)
    assert got[1] == 0.0 and got[2] == 1.0
    assert got[0] == pytest.approx(2 * 25 / (25 + 26))


def test_dice_against_set_arithmetic_on_random_maps():
    rng = np.random.default_rng(0)
    k = len(CLASS_NAMES)
    pred = rng.integers(0, k - 1, size=(9, 8, 7))  # the last class never appears
    ref = np.where(rng.random(pred.shape) < 0.7, pred, rng.integers(0, k - 1, pred.shape))
    got = dice(torch.from_numpy(pred), torch.from_numpy(ref), k)
    for c in range(k):
        a = set(zip(*np.nonzero(pred == c), strict=True))
        b = set(zip(*np.nonzero(ref == c), strict=True))
        want = 2 * len(a & b) / (len(a) + len(b)) if a or b else math.nan
        np.testing.assert_allclose(got[c], want, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[-1]) and not np.isnan(got[:-1]).any()


def test_confusion_matrix_counts():
    cm = confusion_matrix(PRED, REF, 3)
    # rows: predicted, columns: reference
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 2]]


def test_dice_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        dice(PRED, REF[:1], 4)
    with pytest.raises(TypeError, match="integer class ids"):
        dice(PRED.astype(float), REF, 4)
    with pytest.raises(ValueError, match=r"class ids must lie in 0..1"):
        dice(PRED, REF, 2)
    with pytest.raises(ValueError, match="class ids must lie"):
        dice(-PRED, REF, 4)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        dice(PRED.tolist(), REF, 4)


# ----------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------


def test_summarize_is_nan_aware_by_hand():
    m = np.array(
        [
            [0.99, 0.5, np.nan, 0.9],
            [0.98, 0.7, np.nan, np.nan],
            [0.97, np.nan, np.nan, np.nan],
            [0.96, 0.9, np.nan, np.nan],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" warnings
        s = summarize(m, ["background", "liver", "spleen", "kidney_right"])
    assert list(s) == ["background", "liver", "spleen", "kidney_right"]
    liver = s["liver"]
    assert liver["n"] == 3
    assert liver["mean"] == pytest.approx(0.7)
    assert liver["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
    assert liver["median"] == pytest.approx(0.7)
    assert (liver["min"], liver["max"]) == (0.5, 0.9)
    assert s["spleen"]["n"] == 0 and all(math.isnan(s["spleen"][k]) for k in ("mean", "std", "max"))
    one = s["kidney_right"]
    assert one["n"] == 1 and one["mean"] == 0.9 and math.isnan(one["std"])
    assert s["background"]["median"] == pytest.approx(0.975)


def test_summarize_checks_names():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        summarize(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(cases, classes\)"):
        summarize(np.zeros(3), ["a", "b", "c"])


def test_markdown_table():
    m = np.array([[0.5, np.nan, 0.25], [0.7, np.nan, np.nan]])
    table = markdown_table(summarize(m, ["liver", "spleen", "aorta"]))
    lines = table.splitlines()
    assert lines[0] == "| class | n | mean ± std | median | min | max |"
    assert lines[2] == "| liver | 2 | 0.600 ± 0.141 | 0.600 | 0.500 | 0.700 |"
    assert lines[3] == "| spleen | 0 | n/a | n/a | n/a | n/a |"
    assert lines[4] == "| aorta | 1 | 0.250 | 0.250 | 0.250 | 0.250 |"


# ----------------------------------------------------------------------------------------
# Wilcoxon signed-rank test
# ----------------------------------------------------------------------------------------


def exact_two_sided_p(diffs):
    """Enumerate all 2^n sign assignments of the ranks (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    w_plus = ranks[np.asarray(diffs) > 0].sum()
    n = len(diffs)
    total = n * (n + 1) // 2
    stat = min(w_plus, total - w_plus)
    sums = [sum(s) for m in range(n + 1) for s in itertools.combinations(range(1, n + 1), m)]
    return min(1.0, 2 * sum(x <= stat for x in sums) / 2**n)


@pytest.mark.parametrize(
    "diffs,p_by_hand",
    [
        ([0.01, 0.02, 0.03, 0.04, 0.05], 2 / 2**5),  # all improve: W- = 0
        ([0.01, 0.02, -0.03, 0.04], 2 * 5 / 16),  # W- = 3: {}, {1}, {2}, {3}, {1,2}
        ([-0.05, 0.01, -0.02, 0.03, -0.04, 0.06], None),  # enumerated below
    ],
    ids=["n5-all-up", "n4-one-down", "n6-mixed"],
)
def test_compare_stages_exact_p(diffs, p_by_hand):
    rng = np.random.default_rng(1)
    stage1 = rng.uniform(0.5, 0.9, size=(len(diffs), 1))
    stage2 = stage1 + np.array(diffs)[:, None]
    want = exact_two_sided_p(diffs)
    if p_by_hand is not None:
        assert want == pytest.approx(p_by_hand)
    got = compare_stages(stage1, stage2)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(want, rel=1e-9)


def test_compare_stages_nan_handling_and_scipy_agreement():
    rng = np.random.default_rng(2)
    s1 = rng.uniform(0.6, 0.9, size=(12, 4))
    s2 = s1 + rng.normal(0.02, 0.03, size=s1.shape)
    s1[:, 1] = np.nan  # class absent everywhere
    s2[:, 2] = s1[:, 2]  # identical stages: no differing pairs
    s2[0, 2] = s1[0, 2] + 0.1  # one differing pair is still too few
    s1[3, 3] = np.nan  # one case without this class
    got = compare_stages(s1, s2)
    assert np.isnan(got[1]) and np.isnan(got[2])
    assert got[0] == pytest.approx(wilcoxon(s2[:, 0], s1[:, 0]).pvalue)
    keep = np.arange(12) != 3
    assert got[3] == pytest.approx(wilcoxon(s2[keep, 3], s1[keep, 3]).pvalue)
    assert 0 < got[0] <= 1 and 0 < got[3] <= 1
    with pytest.raises(ValueError, match="one shape"):
        compare_stages(s1, s2[:5])


# ----------------------------------------------------------------------------------------
# Candidate region recall / false-positive rate
# ----------------------------------------------------------------------------------------


def test_candidate_recall_fpr_on_a_line_by_hand():
    ref = np.zeros((9, 1, 1), np.uint8)
    ref[3:6] = 4  # reference organ: x = 3, 4, 5
    stage1 = np.zeros((9, 1, 1), np.int64)
    stage1[4] = 1  # stage 1 found its centre only
    rows = candidate_recall_fpr(torch.from_numpy(ref), stage1, [0, 1, 2, 3])
    assert [r["radius"] for r in rows] == [0, 1, 2, 3]
    # C2 = x in [4 - r, 4 + r]; 3 foreground and 6 background voxels
    assert [r["recall"] for r in rows] == pytest.approx([1 / 3, 1.0, 1.0, 1.0])
    assert [r["fpr"] for r in rows] == pytest.approx([0.0, 0.0, 2 / 6, 4 / 6])
    assert [r["candidate_fraction"] for r in rows] == pytest.approx([1 / 9, 3 / 9, 5 / 9, 7 / 9])


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.0)], ids=["isotropic", "anisotropic"]
)
def test_candidate_recall_fpr_against_distance_transform(spacing):
    shape = (16, 14, 12)
    ref = np.zeros(shape, np.uint8)
    ref[4:11, 3:9, 3:8] = 1
    ref[10:14, 9:12, 6:10] = 2
    # stage 1: the reference eroded and with a stray false positive and a missed organ part
    stage1 = ndimage.binary_erosion(ref > 0, iterations=1).astype(np.uint8)
    stage1[13, 2, 1] = 3
    stage1[10:14, 9:12, 8:10] = 0
    radii = [0, 1, 3]
    rows = candidate_recall_fpr(ref, torch.from_numpy(stage1), radii, spacing)
    # Oracle: C2 = voxels within r x finest spacing (mm) of the stage-1 foreground.
    dist = ndimage.distance_transform_edt(stage1 == 0, sampling=spacing)
    for r, row in zip(radii, rows, strict=True):
        c2 = dist <= r * min(spacing) * (1 + 1e-9)
        fg = ref > 0
        assert row["recall"] == pytest.approx((c2 & fg).sum() / fg.sum())
        assert row["fpr"] == pytest.approx((c2 & ~fg).sum() / (~fg).sum())
        assert row["candidate_fraction"] == pytest.approx(c2.mean())
    recalls = [r["recall"] for r in rows]
    assert recalls[0] < recalls[1] < recalls[2] and rows[0]["fpr"] < rows[2]["fpr"]


def test_candidate_recall_fpr_without_reference_foreground():
    ref = np.zeros((4, 4, 4), np.int32)
    stage1 = np.zeros_like(ref)
    stage1[1, 1, 1] = 1
    (row,) = candidate_recall_fpr(ref, stage1, [1])
    assert math.isnan(row["recall"]) and row["fpr"] == pytest.approx(7 / 64)
    with pytest.raises(ValueError, match="one shape"):
        candidate_recall_fpr(ref, stage1[:2], [1])
