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


# ----------------------------------------------------------------------------------------
# The `fastcascade evaluate` command
# ----------------------------------------------------------------------------------------

NAMES = ("background", "liver", "spleen")
SHAPE = (4, 3, 2)  # 6 voxels per x-slab


def _labels(**slabs):
    """A SHAPE label map; ``liver=np.s_[0]`` puts class 1 at those voxels, etc."""
    out = np.zeros(SHAPE, np.uint8)
    for name, where in slabs.items():
        out[where] = NAMES.index(name)
    return out


# Three cases, Dice counted by hand (reference: liver x=0 (6 voxels), spleen x=3 (6) but
# none in case 3). Prediction and stage 1 per case, with the voxel counts behind each Dice:
#   case 1: pred liver x=0..1 (12) -> 2·6/18 = 2/3, spleen exact -> 1
#           s1   liver x=0..2 (18) -> 2·6/24 = 1/2, spleen exact -> 1
#   case 2: pred liver x=0,y=0 (2) -> 2·2/8 = 1/2, no spleen -> 0
#           s1   liver one voxel   -> 2·1/7 = 2/7, no spleen -> 0
#   case 3: pred liver exact -> 1, spleen nowhere -> NaN
#           s1   liver x=0,y<2 (4) -> 2·4/10 = 4/5
CASES = [
    {
        "ref": _labels(liver=np.s_[0], spleen=np.s_[3]),
        "pred": _labels(liver=np.s_[0:2], spleen=np.s_[3]),
        "s1": _labels(liver=np.s_[0:3], spleen=np.s_[3]),
        "zooms": (1.0, 1.0, 1.0),
    },
    {
        "ref": _labels(liver=np.s_[0], spleen=np.s_[3]),
        "pred": _labels(liver=np.s_[0, 0]),
        "s1": _labels(liver=np.s_[0, 0, 0]),
        "zooms": (0.5, 1.0, 1.0),  # r voxels of 0.5 mm: dilation along x only for r = 1
    },
    {
        "ref": _labels(liver=np.s_[0]),
        "pred": _labels(liver=np.s_[0]),
        "s1": _labels(liver=np.s_[0, 0:2]),
        "zooms": (1.0, 1.0, 2.0),
    },
]
LIVER = [2 / 3, 1 / 2, 1.0]
SPLEEN = [1.0, 0.0, math.nan]
LIVER_S1 = [1 / 2, 2 / 7, 4 / 5]
SPLEEN_S1 = [1.0, 0.0, math.nan]
# liver improves in all 3 cases by distinct amounts: exact two-sided p = 2 / 2**3;
# spleen never changes: no test
P_LIVER = 0.25
RADII = (0, 1, 2)
CASE_A_IDS = {"liver": 5, "spleen": 1}  # fastcascade.presets.CASE_A_TO_CLASSES


def _write(path, labels, zooms=(1.0, 1.0, 1.0), names=None, affine=None):
    import json

    import nibabel as nib

    affine = np.diag([*zooms, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels), affine), path)
    if names is not None:
        names_json = {str(i): n for i, n in enumerate(names)}
        path.with_name(path.name.removesuffix(".nii.gz") + ".json").write_text(
            json.dumps(names_json)
        )
    return path


@pytest.fixture
def case_files(tmp_path):
    """The three CASES as NIfTI files, references in case A's ids, and a CSV with a
    header, relative paths and one absolute path."""
    (tmp_path / "pred").mkdir()
    lines = ["prediction,reference,stage1"]
    for i, case in enumerate(CASES):
        ref = np.zeros(SHAPE, np.uint8)
        for name, file_id in CASE_A_IDS.items():
            ref[case["ref"] == NAMES.index(name)] = file_id
        ref[2, 2, 1] = 99  # background in every case; unmapped, so it maps to 0
        _write(tmp_path / f"ref{i}.nii.gz", ref, case["zooms"])
        _write(tmp_path / f"classes{i}.nii.gz", case["ref"], case["zooms"])
        _write(tmp_path / "pred" / f"p{i}.nii.gz", case["pred"], case["zooms"], NAMES)
        _write(tmp_path / f"s1_{i}.nii.gz", case["s1"], case["zooms"])
        pred = tmp_path / "pred" / f"p{i}.nii.gz" if i == 1 else f"pred/p{i}.nii.gz"
        lines.append(f"{pred},ref{i}.nii.gz,s1_{i}.nii.gz")
    (tmp_path / "cases.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def _run(capsys, *argv):
    from fastcascade.cli import main

    status = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def _row(name, values, digits=3):
    """The markdown row ``markdown_table`` should print, from hand values (statistics
    module, not numpy)."""
    import statistics

    v = [x for x in values if not math.isnan(x)]
    mean = f"{statistics.mean(v):.{digits}f}"
    if len(v) > 1:
        mean += f" ± {statistics.stdev(v):.{digits}f}"
    cells = [statistics.median(v), min(v), max(v)]
    return f"| {name} | {len(v)} | {mean} | " + " | ".join(f"{c:.{digits}f}" for c in cells) + " |"


def _c2_oracle(case, radius):
    """C2 = voxels within r x finest spacing (mm) of stage 1's foreground (SciPy EDT)."""
    dist = ndimage.distance_transform_edt(case["s1"] == 0, sampling=case["zooms"])
    c2 = dist <= radius * min(case["zooms"]) * (1 + 1e-9)
    fg = case["ref"] > 0
    return (c2 & fg).sum() / fg.sum(), (c2 & ~fg).sum() / (~fg).sum(), c2.mean()


def test_evaluate_prints_hand_computed_tables(case_files, capsys):
    status, out, err = _run(
        capsys, "--csv", case_files / "cases.csv", "--label-map", "case_a", "--radii", "0,1,2"
    )
    assert status == 0, err
    lines = out.splitlines()
    assert _row("liver", LIVER) in lines  # | liver | 3 | 0.722 ± 0.255 | 0.667 | ...
    assert _row("spleen", SPLEEN) in lines
    assert _row("liver", LIVER_S1) in lines
    assert _row("spleen", SPLEEN_S1) in lines
    assert lines.index(_row("liver", LIVER)) < lines.index(_row("liver", LIVER_S1))
    assert "| liver | 0.529 | 0.722 | 0.2500 |" in lines  # (1/2 + 2/7 + 4/5) / 3
    assert "| spleen | 0.500 | 0.500 | n/a |" in lines
    assert not any(line.startswith("| background") for line in lines)
    for r in RADII:
        got = [ln for ln in lines if ln.startswith(f"| {r} | ")]
        recall, fpr, frac = zip(*(_c2_oracle(c, r) for c in CASES), strict=True)
        cells = [np.mean(recall), np.min(recall), np.mean(fpr), np.mean(frac)]
        assert got == [f"| {r} | " + " | ".join(f"{c:.4f}" for c in cells) + " |"]


def test_evaluate_writes_the_report_as_json(case_files, capsys):
    import json

    out_path = case_files / "report.json"
    status, out, err = _run(
        capsys,
        "--csv", case_files / "cases.csv",
        "--label-map", "case_a",
        "--radii", "0,1,2",
        "--out", out_path,
    )  # fmt: skip
    assert status == 0, err
    assert f"wrote {out_path}" in out
    report = json.loads(out_path.read_text())  # strict JSON: NaN written as null
    assert not list(case_files.glob(".*tmp"))  # the temporary file was renamed
    assert report["class_names"] == list(NAMES) and report["label_map"] == "case_a"
    assert report["csv"] == str(case_files / "cases.csv")

    def nan(values):
        return [None if math.isnan(v) else pytest.approx(v) for v in values]

    cases = report["cases"]
    assert [c["prediction"] for c in cases] == [
        str(case_files / "pred" / f"p{i}.nii.gz") for i in range(3)
    ]
    assert [c["stage1"] for c in cases] == [str(case_files / f"s1_{i}.nii.gz") for i in range(3)]
    assert [c["spacing"] for c in cases] == [list(c["zooms"]) for c in CASES]
    assert [c["dice"]["liver"] for c in cases] == nan(LIVER)
    assert [c["dice"]["spleen"] for c in cases] == nan(SPLEEN)
    assert [c["dice_stage1"]["liver"] for c in cases] == nan(LIVER_S1)
    liver = report["dice"]["liver"]
    assert liver["n"] == 3 and liver["mean"] == pytest.approx(np.mean(LIVER))
    assert liver["median"] == pytest.approx(2 / 3) and liver["max"] == 1.0
    spleen = report["dice"]["spleen"]
    assert spleen["n"] == 2 and spleen["std"] == pytest.approx(math.sqrt(0.5))
    assert report["dice_stage1"]["liver"]["min"] == pytest.approx(2 / 7)
    assert report["wilcoxon_p"] == {"liver": pytest.approx(P_LIVER), "spleen": None}
    assert [c["radius"] for c in report["candidates"]] == list(RADII)
    for case, row in zip(CASES, cases, strict=True):
        for r, got in zip(RADII, row["candidates"], strict=True):
            recall, fpr, frac = _c2_oracle(case, r)
            assert (got["radius"], got["recall"], got["fpr"]) == (
                r,
                pytest.approx(recall),
                pytest.approx(fpr),
            )
            assert got["candidate_fraction"] == pytest.approx(frac)
    # case 2 (0.5 mm along x): r = 1 reaches the x neighbour only, not y or z
    assert cases[1]["candidates"][1]["recall"] == pytest.approx(1 / 12)


def test_evaluate_label_map_from_json_file_and_without_map(case_files, capsys):
    import json

    map_path = case_files / "map.json"
    map_path.write_text(json.dumps({str(v): NAMES.index(k) for k, v in CASE_A_IDS.items()}))
    status, out, err = _run(capsys, "--csv", case_files / "cases.csv", "--label-map", map_path)
    assert status == 0, err
    assert _row("liver", LIVER) in out.splitlines()
    # without a map the case-A ids (5, 99) are not classes of the prediction
    status, out, err = _run(capsys, "--csv", case_files / "cases.csv")
    assert status == 2 and out == ""
    assert "ref0.nii.gz holds class id 99" in err and "--label-map" in err


def test_evaluate_without_stage1_and_default_class_names(tmp_path, capsys):
    from fastcascade.config import CLASS_NAMES

    case = CASES[0]
    _write(tmp_path / "p.nii.gz", case["pred"])  # no JSON beside: the package's classes
    _write(tmp_path / "r.nii.gz", case["ref"])
    (tmp_path / "cases.csv").write_text("# one case\np.nii.gz , r.nii.gz\n\n")
    status, out, err = _run(capsys, "--csv", tmp_path / "cases.csv")
    assert status == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| class")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(CLASS_NAMES[1:])
    assert "| liver | 1 | 0.667 | 0.667 | 0.667 | 0.667 |" in rows
    assert "| pancreas | 0 | n/a | n/a | n/a | n/a |" in rows
    assert "stage 1" not in out and "C2" not in out


def _broken(tmp_path, kind):
    case = CASES[0]
    _write(tmp_path / "p.nii.gz", case["pred"], names=NAMES)
    _write(tmp_path / "r.nii.gz", case["ref"])
    _write(tmp_path / "small.nii.gz", case["ref"][:3])
    _write(tmp_path / "bad_ids.nii.gz", case["pred"] * 2, names=NAMES)  # id 4 of 3 classes
    (tmp_path / "junk.nii.gz").write_text("not an image")
    rows = {
        "missing-file": "p.nii.gz,nothing.nii.gz",
        "shape-mismatch": "p.nii.gz,small.nii.gz",
        "stage1-shape": "p.nii.gz,r.nii.gz,small.nii.gz",
        "one-column": "p.nii.gz",
        "four-columns": "p.nii.gz,r.nii.gz,r.nii.gz,r.nii.gz",
        "empty-cell": "p.nii.gz,,r.nii.gz",
        "only-header": "prediction,reference",
        "mixed-stage1": "p.nii.gz,r.nii.gz\np.nii.gz,r.nii.gz,r.nii.gz",
        "id-beyond-classes": "bad_ids.nii.gz,r.nii.gz",
        "not-a-nifti-name": "cases.csv,r.nii.gz",
        "not-nifti": "p.nii.gz,junk.nii.gz",
    }
    if kind != "missing-csv":
        (tmp_path / "cases.csv").write_text(rows[kind] + "\n")
    return tmp_path / "cases.csv"


ERRORS = [
    ("missing-csv", "cases.csv does not exist"),
    ("missing-file", "cases.csv:1: {tmp}/nothing.nii.gz does not exist"),
    ("shape-mismatch", "small.nii.gz has shape (3, 3, 2) but {tmp}/p.nii.gz has (4, 3, 2)"),
    ("stage1-shape", "small.nii.gz has shape (3, 3, 2)"),
    ("one-column", "cases.csv:1: expected 'prediction,reference[,stage1]'"),
    ("four-columns", "cases.csv:1: expected"),
    ("empty-cell", "cases.csv:1: expected"),
    ("only-header", "lists no cases"),
    ("mixed-stage1", "stage1 column for every case or for none"),
    ("id-beyond-classes", "bad_ids.nii.gz holds class id 4; expected ids 0..2"),
    ("not-a-nifti-name", "cases.csv: expected a file name ending in .nii or .nii.gz"),
    ("not-nifti", "junk.nii.gz: not a readable NIfTI file"),
]


@pytest.mark.parametrize("kind,message", ERRORS, ids=[kind for kind, _ in ERRORS])
def test_evaluate_errors_exit_2_with_one_line(tmp_path, capsys, kind, message):
    csv_path = _broken(tmp_path, kind)
    status, out, err = _run(capsys, "--csv", csv_path)
    assert status == 2 and out == ""
    assert err.startswith("fastcascade evaluate: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err


@pytest.mark.parametrize("radii", ["1,x", "-1", ""], ids=["not-int", "negative", "empty"])
def test_evaluate_rejects_bad_radii(tmp_path, capsys, radii):
    with pytest.raises(SystemExit) as e:
        _run(capsys, "--csv", tmp_path / "cases.csv", "--radii", radii)
    assert e.value.code == 2
    assert "--radii" in capsys.readouterr().err


def test_evaluate_unknown_label_map_and_out_folder(case_files, capsys):
    status, _, err = _run(capsys, "--csv", case_files / "cases.csv", "--label-map", "case_b")
    assert status == 2 and "--label-map must be one of ['case_a']" in err
    status, _, err = _run(capsys, "--csv", case_files / "cases.csv", "--out", case_files)
    assert status == 2 and "is a folder" in err


def test_label_map_that_is_not_an_object_is_a_value_error(tmp_path):
    from fastcascade.presets import read_label_map

    path = tmp_path / "map.json"
    path.write_text("[5, 1]")
    with pytest.raises(ValueError, match="JSON object"):
        read_label_map(str(path))


# ----------------------------------------------------------------------------------------
# Absent and cut organs, the report's comparisons
# ----------------------------------------------------------------------------------------


def test_scored_dice_leaves_out_what_the_reference_lacks():
    from fastcascade.evaluate import scored_dice

    got, voxels = scored_dice(PRED, REF, 4)
    np.testing.assert_allclose(got, BY_HAND, rtol=1e-12, equal_nan=True)
    assert voxels.tolist() == [1, 2, 3, 0]
    pred = PRED.copy()
    pred[0, 0, 0] = 3  # class 3: predicted once, not in the reference -> not scored
    got, voxels = scored_dice(pred, REF, 4)
    assert math.isnan(got[3]) and voxels[3] == 1
    assert dice(pred, REF, 4)[3] == 0.0  # plain Dice scores it 0


def test_reference_coverage_against_faces_by_hand():
    from fastcascade.evaluate import reference_coverage

    ref = np.zeros((5, 6, 7), np.uint8)
    ref[1:4, 1:5, 1:6] = 1  # inside: not cut
    ref[2, 2, 6] = 2  # last z slice: cut
    ref[0, 3, 3] = 3  # first x slice: cut
    ref[2, 5, 2] = 4  # last y row: cut
    present, cut = reference_coverage(torch.from_numpy(ref), 6)
    assert present.tolist() == [True, True, True, True, True, False]
    assert cut.tolist() == [True, False, True, True, True, False]
    faces = np.zeros_like(ref, bool)  # oracle: voxels whose erosion by one removes them
    faces[[0, -1]] = faces[:, [0, -1]] = faces[:, :, [0, -1]] = True
    assert cut.tolist() == [bool(np.isin(c, ref[faces])) for c in range(6)]


def test_summary_report_p_against_the_exact_distribution_and_scipy():
    from fastcascade.evaluate import summary_report

    diffs = np.array([0.03, -0.01, 0.05, 0.02, 0.04])  # n = 5, W- = 1
    s1 = np.column_stack([np.full(5, np.nan), np.linspace(0.6, 0.8, 5)])
    s2 = s1 + np.column_stack([np.zeros(5), diffs])
    report = summary_report(
        ["background", "liver"],
        {"stage1": ("stage 1", s1), "stage2": ("stage 2", s2)},
        np.ones((5, 2), bool),
        np.zeros((5, 2), bool),
        comparisons=[("stage1", "stage2")],
    )
    (comp,) = report["comparisons"]
    liver = comp["organs"]["liver"]
    # sign assignments of ranks 1..5 with a sum <= 1: {} and {1}
    assert exact_two_sided_p(diffs) == pytest.approx(2 * 2 / 2**5)
    assert liver["p"] == pytest.approx(2 * 2 / 2**5)
    assert liver["p"] == pytest.approx(wilcoxon(s2[:, 1], s1[:, 1]).pvalue)
    assert liver["n"] == 5 and liver["low_power"] is True
    assert liver["mean"] == pytest.approx(diffs.mean()) and liver["min"] == pytest.approx(-0.01)
    from fastcascade.evaluate import report_markdown

    text = report_markdown(report)
    assert "| liver | 0.700 | 0.726 | 0.1250 |" in text.splitlines()
    assert "Fewer than 10 cases (every organ): the test has no power here" in text


def test_an_organ_absent_from_a_reference_is_counted_not_scored(tmp_path, capsys):
    import json

    ref = _labels(liver=np.s_[1, 1])  # no spleen in the reference
    pred = _labels(liver=np.s_[1, 1], spleen=np.s_[2, 1])  # 2 spleen voxels nobody asked for
    _write(tmp_path / "p.nii.gz", pred, names=NAMES)
    _write(tmp_path / "r.nii.gz", ref)
    (tmp_path / "cases.csv").write_text("p.nii.gz,r.nii.gz\n")
    status, out, err = _run(capsys, "--csv", tmp_path / "cases.csv", "--out", tmp_path / "r.json")
    assert status == 0, err
    assert "| spleen | 0 | n/a | n/a | n/a | n/a |" in out.splitlines()
    assert "Absent from the reference, so not scored in those cases" in out
    assert "spleen (1 of 1 case)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["coverage"]["spleen"] == {"present": 0, "absent": 1, "cut": 0}
    (case,) = report["cases"]
    assert case["dice"]["spleen"] is None and case["absent"] == ["spleen"]
    assert case["predicted_where_absent"] == {"prediction": {"spleen": 2}}


def test_an_organ_cut_by_the_field_of_view_is_flagged(tmp_path, capsys):
    import json

    ref = np.zeros((5, 5, 4), np.uint8)
    ref[1:4, 1:4, 1:3] = 1  # liver inside the field of view
    ref[2, 2, 2:] = 2  # spleen reaching the last slice
    _write(tmp_path / "p.nii.gz", ref, names=NAMES)
    _write(tmp_path / "r.nii.gz", ref)
    (tmp_path / "cases.csv").write_text("p.nii.gz,r.nii.gz\n")
    status, out, err = _run(capsys, "--csv", tmp_path / "cases.csv", "--out", tmp_path / "r.json")
    assert status == 0, err
    assert "Cut by the field of view" in out and "spleen (1 of 1 case)." in out
    assert "liver (" not in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["coverage"]["spleen"]["cut"] == 1 and report["coverage"]["liver"]["cut"] == 0
    assert report["cases"][0]["cut"] == ["spleen"]
    assert report["cases"][0]["dice"] == {"liver": 1.0, "spleen": 1.0}


def test_unmapped_reference_ids_are_background_and_listed(case_files, capsys):
    import json

    out_path = case_files / "report.json"
    status, _, err = _run(
        capsys, "--csv", case_files / "cases.csv", "--label-map", "case_a", "--out", out_path
    )
    assert status == 0, err
    report = json.loads(out_path.read_text())
    assert [c["unmapped_reference_ids"] for c in report["cases"]] == [[99], [99], [99]]


def test_a_reference_with_none_of_the_maps_ids_warns(tmp_path, capsys):
    _write(tmp_path / "p.nii.gz", CASES[0]["pred"], names=NAMES)
    _write(tmp_path / "r.nii.gz", CASES[0]["ref"] * 40)  # ids 40, 80: nothing of case_a
    (tmp_path / "cases.csv").write_text("p.nii.gz,r.nii.gz\n")
    with pytest.warns(UserWarning, match=r"none of its ids \[40, 80\] is in the label map"):
        status, out, err = _run(capsys, "--csv", tmp_path / "cases.csv", "--label-map", "case_a")
    assert status == 0, err
    assert "| liver | 0 | n/a | n/a | n/a | n/a |" in out.splitlines()


# ----------------------------------------------------------------------------------------
# Geometry: prediction and reference compared in physical space
# ----------------------------------------------------------------------------------------


def _write_affine(path, labels, affine, names=None):
    return _write(path, labels, names=names, affine=affine)


def _flipped_case(tmp_path):
    """Case 1 of CASES, its prediction and stage-1 map also stored flipped along x and y
    (an LPS file) and transposed: the same anatomy in other voxel orders."""
    case = CASES[0]
    _write(tmp_path / "r.nii.gz", case["ref"])
    _write(tmp_path / "p.nii.gz", case["pred"], names=NAMES)
    _write(tmp_path / "s.nii.gz", case["s1"])
    n = np.array(SHAPE) - 1
    lps = np.array([[-1, 0, 0, n[0]], [0, -1, 0, n[1]], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    _write_affine(tmp_path / "p_lps.nii.gz", case["pred"][::-1, ::-1], lps, NAMES)
    _write_affine(tmp_path / "s_lps.nii.gz", case["s1"][::-1, ::-1], lps)
    zxy = np.eye(4)[:, [2, 0, 1, 3]]  # file axes (z, x, y)
    _write_affine(tmp_path / "p_zxy.nii.gz", case["pred"].transpose(2, 0, 1), zxy, NAMES)
    _write_affine(tmp_path / "s_zxy.nii.gz", case["s1"].transpose(2, 0, 1), zxy)
    (tmp_path / "plain.csv").write_text("p.nii.gz,r.nii.gz,s.nii.gz\n")
    (tmp_path / "lps.csv").write_text("p_lps.nii.gz,r.nii.gz,s_lps.nii.gz\n")
    (tmp_path / "zxy.csv").write_text("p_zxy.nii.gz,r.nii.gz,s_zxy.nii.gz\n")


def test_a_prediction_stored_flipped_or_transposed_scores_as_the_original(tmp_path, capsys):
    import json

    _flipped_case(tmp_path)
    reports = {}
    for name in ("plain", "lps", "zxy"):
        status, out, err = _run(
            capsys, "--csv", tmp_path / f"{name}.csv", "--radii", "0,1",
            "--out", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert status == 0, err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    plain = reports["plain"]["cases"][0]
    assert plain["dice"]["liver"] == pytest.approx(LIVER[0])
    assert plain["alignment"] == {"prediction": "same", "stage1": "same"}
    for name in ("lps", "zxy"):
        case = reports[name]["cases"][0]
        assert case["alignment"] == {"prediction": "reoriented", "stage1": "reoriented"}
        assert case["dice"] == plain["dice"] and case["dice_stage1"] == plain["dice_stage1"]
        assert case["candidates"] == plain["candidates"]
        assert reports[name]["stages"] == reports["plain"]["stages"]


def test_a_shifted_prediction_is_refused_or_resampled_on_request(tmp_path, capsys):
    import json

    case = CASES[0]
    _write(tmp_path / "r.nii.gz", case["ref"])
    far = np.diag([1.0, 1.0, 1.0, 1.0])
    far[0, 3] = 100.0  # the prediction's array as it is, 100 mm to the right
    _write_affine(tmp_path / "far.nii.gz", case["ref"], far, NAMES)
    # the reference's anatomy from x = 1 on, stored starting 1 mm to the right
    near = np.eye(4)
    near[0, 3] = 1.0
    moved = np.zeros_like(case["ref"])
    moved[:-1] = case["ref"][1:]
    _write_affine(tmp_path / "near.nii.gz", moved, near, NAMES)
    (tmp_path / "far.csv").write_text("far.nii.gz,r.nii.gz\n")
    (tmp_path / "near.csv").write_text("near.nii.gz,r.nii.gz\n")

    status, out, err = _run(capsys, "--csv", tmp_path / "far.csv")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert f"{tmp_path}/r.nii.gz and {tmp_path}/far.nii.gz have one shape (4, 3, 2)" in err
    assert "origin (100, 0, 0) mm" in err and "origin (0, 0, 0) mm" in err and "--resample" in err

    status, out, err = _run(
        capsys, "--csv", tmp_path / "near.csv", "--resample", "--out", tmp_path / "report.json"
    )
    assert status == 0, err
    got = json.loads((tmp_path / "report.json").read_text())["cases"][0]
    assert got["alignment"] == {"prediction": "resampled"}
    # resampled onto the reference: x = 0 lies outside the copy (background), the rest
    # is the reference's own; liver (x = 0, 6 voxels) is lost, spleen (x = 3) exact
    assert got["dice"] == {"liver": 0.0, "spleen": 1.0}
    status, out, err = _run(capsys, "--csv", tmp_path / "far.csv", "--resample")
    assert status == 0 and "| liver | 1 | 0.000 |" in out


def test_case_a_reference_stored_flipped_scores_one_and_flags_the_cut_organs(
    case_a_paths, tmp_path, capsys
):
    """Real geometry: case A's own labels, mapped onto our classes and stored in LPS order,
    against the original file: every organ Dice 1; the organs the field of view cuts are
    those reaching a face of the scan."""
    import json

    import nibabel as nib

    from fastcascade.io.nifti import map_labels
    from fastcascade.presets import CASE_A_TO_CLASSES

    _, seg_path = case_a_paths
    seg = nib.load(seg_path)
    classes = map_labels(np.asarray(seg.dataobj), CASE_A_TO_CLASSES).astype(np.uint8)
    n = np.array(classes.shape) - 1
    flip = np.array([[-1, 0, 0, n[0]], [0, -1, 0, n[1]], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    _write(tmp_path / "lps.nii.gz", classes[::-1, ::-1], names=CLASS_NAMES,
           affine=seg.affine @ flip)  # fmt: skip
    (tmp_path / "cases.csv").write_text(f"lps.nii.gz,{seg_path}\n")
    out_path = tmp_path / "report.json"
    status, out, err = _run(
        capsys, "--csv", tmp_path / "cases.csv", "--label-map", "case_a", "--out", out_path
    )
    assert status == 0, err
    (case,) = json.loads(out_path.read_text())["cases"]
    assert case["alignment"] == {"prediction": "reoriented"}
    assert case["dice"] == dict.fromkeys(CLASS_NAMES[1:], 1.0)
    faces = np.zeros(classes.shape, bool)
    faces[[0, -1]] = faces[:, [0, -1]] = faces[:, :, [0, -1]] = True
    cut = [name for c, name in enumerate(CLASS_NAMES) if c and (classes[faces] == c).any()]
    assert case["cut"] == cut and "liver" in cut and case["absent"] == []
