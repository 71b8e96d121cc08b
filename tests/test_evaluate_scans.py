"""``fastcascade evaluate --model``: the cascade run on CT scans and scored, end to end on
two phantoms with a tiny random model, against oracles computed here: the ordinary
route (``Predictor.segment``, ``run_cascade``), Dice by ``dice``, the candidate region by
SciPy's Euclidean distance transform, cut organs from the volume's faces."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import fastcascade
from fastcascade.evaluate import compare_stages, dice
from fastcascade.presets import CASE_A_TO_CLASSES

RADII = list(range(7))
CLASS_TO_CASE_A = {c: file_id for file_id, c in CASE_A_TO_CLASSES.items()}
GALLBLADDER = fastcascade.CLASS_NAMES.index("gallbladder")


def _case_a_ids(labels):
    out = np.zeros_like(labels)
    for c, file_id in CLASS_TO_CASE_A.items():
        out[labels == c] = file_id
    return out


def _lps_transposed(labels, affine):
    """The same anatomy stored flipped along x and y and with the axes in (z, x, y) order."""
    n = np.array(labels.shape) - 1
    flip = np.array([[-1, 0, 0, n[0]], [0, -1, 0, n[1]], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    data, a = labels[::-1, ::-1], affine @ flip
    return np.ascontiguousarray(data.transpose(2, 0, 1)), a[:, [2, 0, 1, 3]]


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


def _tiny_cascade(image_hu, spacing):
    """A tiny cascade on a 9 mm grid whose stages split the body: random weights (stage 2
    a copy of stage 1, on its own window), each background bias set at a quantile of its
    foreground margin over the phantom ``image_hu``, so that stage 1 keeps part of the
    body (C2's recall then grows with r) and stage 2 differs with overlap."""
    from fastcascade.config import Architecture, CascadeConfig, StageConfig
    from fastcascade.io.scan import load_scan
    from fastcascade.model import UNet3D
    from fastcascade.ops.intensity import apply_window

    torch.manual_seed(0)
    arch = Architecture(num_classes=11, base_channels=2, levels=2, padding="same")
    config = CascadeConfig(
        spacing=(9.0, 9.0, 9.0),
        stage1=StageConfig(window=(-1000.0, 1000.0), tile=(24, 24, 24), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=(24, 24, 24), architecture=arch),
    )
    nets = [UNet3D.from_architecture(arch).eval() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    image = load_scan(image_hu, spacing=spacing).working_grid(config.spacing).image()
    with torch.no_grad():
        for net, stage, q in zip(nets, (config.stage1, config.stage2), (0.5, 0.3), strict=True):
            logits = net(apply_window(image, stage.window)[None, None])[0]
            margin = logits[1:].max(0).values - logits[0]
            net.classifier.bias[0] += float(margin.quantile(q))
    return config, nets


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two phantoms as files and the tiny model. Case 1's reference lacks the gallbladder
    (absent); case 2's is stored flipped and transposed against its CT (reoriented
    exactly). References in case A's ids."""
    from fastcascade.model.checkpoint import save_cascade

    tmp = tmp_path_factory.mktemp("scans")
    cases = []
    for i, seed in enumerate((1, 2), start=1):
        ph = fastcascade.phantom.make_phantom(shape=(40, 34, 36), spacing=(7.0,) * 3, seed=seed)
        if i == 1:
            config, nets = _tiny_cascade(ph.image, ph.spacing)
            save_cascade(tmp / "tiny", config, *nets, dtype=torch.float32)
        ct, _ = ph.to_nifti()
        nib.save(ct, tmp / f"ct{i}.nii.gz")
        ref = ph.labels.copy()
        if i == 1:
            assert (ref == GALLBLADDER).any()
            ref[ref == GALLBLADDER] = 0
            _save(tmp / "ref1.nii.gz", _case_a_ids(ref), ph.affine)
        else:
            _save(tmp / "ref2.nii.gz", *_lps_transposed(_case_a_ids(ref), ph.affine))
        cases.append({"ct": tmp / f"ct{i}.nii.gz", "ref": ref, "affine": ph.affine})
    (tmp / "cases.csv").write_text("ct,reference\nct1.nii.gz,ref1.nii.gz\nct2.nii.gz,ref2.nii.gz\n")
    return tmp, cases


@pytest.fixture(scope="module")
def model_path(scans):
    return scans[0] / "tiny.safetensors"


def _run(capsys, *argv):
    from fastcascade.cli import main

    status = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def evaluated(scans, model_path):
    """One run of the command over both cases, writing the report folder (module scope,
    so its output is captured here rather than by ``capsys``)."""
    import contextlib
    import io

    from fastcascade.cli import main

    tmp, _ = scans
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(
            [
                "evaluate", "--model", str(model_path), "--csv", str(tmp / "cases.csv"),
                "--label-map", "case_a", "--out", str(tmp / "report"), "--device", "cpu",
            ]
        )  # fmt: skip
    return status, out.getvalue(), err.getvalue(), tmp / "report"


def _scored(pred, ref, k):
    """Dice with the organs the reference lacks left out (NaN)."""
    d = dice(pred, ref, k)
    for c in range(k):
        if not (ref == c).any():
            d[c] = math.nan
    return d


@pytest.fixture(scope="module")
def oracle(scans, model_path):
    """Per case: each stage's Dice through the ordinary routes (``run_cascade`` for stages
    1 and 2, ``Predictor.segment`` with overlap), and C2 recall/FPR/fraction on the
    working grid from SciPy's distance transform."""
    from fastcascade.cascade import run_cascade
    from fastcascade.io.scan import load_scan
    from fastcascade.options import InferenceOptions

    _, cases = scans
    predictor = fastcascade.load_model(model_path, device="cpu")
    config = predictor.config
    k = config.num_classes
    out = []
    for case in cases:
        ref = case["ref"]
        overlapped = predictor.segment(str(case["ct"]), overlap=True)
        scan = load_scan(case["ct"])
        grid = scan.working_grid(config.spacing)
        cascade = run_cascade(
            grid.image(),
            predictor.stage1,
            predictor.stage2,
            config,
            InferenceOptions(overlap=False),
        )
        stage1 = grid.labels_to_input(cascade.stage1.labels).numpy()
        stage2 = grid.labels_to_input(cascade.stage2.labels).numpy()
        s1_working = cascade.stage1.labels.numpy()
        ref_working = grid.labels_from_input(torch.from_numpy(ref)).numpy()
        dist = ndimage.distance_transform_edt(s1_working == 0, sampling=config.spacing)
        fg = ref_working > 0
        candidates = []
        for r in RADII:
            c2 = dist <= r * min(config.spacing) * (1 + 1e-9)
            candidates.append(
                ((c2 & fg).sum() / fg.sum(), (c2 & ~fg).sum() / (~fg).sum(), c2.mean())
            )
        faces = np.zeros(ref.shape, bool)
        faces[[0, -1]] = faces[:, [0, -1]] = faces[:, :, [0, -1]] = True
        out.append(
            {
                "stage1": _scored(stage1, ref, k),
                "stage2": _scored(stage2, ref, k),
                "stage2_overlap": _scored(overlapped.labels, ref, k),
                "c2_fraction": overlapped.c2_fraction,
                "candidates": candidates,
                "cut": [
                    n for c, n in enumerate(config.class_names) if c and (ref[faces] == c).any()
                ],
                "absent": [
                    n for c, n in enumerate(config.class_names) if c and not (ref == c).any()
                ],
            }
        )
    return config, out


def _nan(values):
    return [None if math.isnan(v) else pytest.approx(v, abs=1e-12) for v in values]


@pytest.mark.slow
def test_the_command_writes_the_tables_and_the_plot(evaluated):
    status, out, err, folder = evaluated
    assert status == 0, err
    assert sorted(p.name for p in folder.iterdir()) == [
        "candidates.png",
        "report.json",
        "report.md",
    ]
    assert "case 1/2" in err and "case 2/2" in err
    report = json.loads((folder / "report.json").read_text())
    markdown = (folder / "report.md").read_text()
    for text in (out, markdown):
        for title in (
            "Dice, stage 1 (2 cases)",
            "Dice, stage 2\n",
            "Dice, stage 2 with overlap\n",
            "Wilcoxon signed-rank test, stage 1 vs stage 2\n",
            "Dice stage 2 − stage 1, per case",
            "Wilcoxon signed-rank test, stage 1 vs stage 2 with overlap",
            "Wilcoxon signed-rank test, stage 2 vs stage 2 with overlap",
            "the test has no power here",
            "Candidate region C2 (stage-1 foreground dilated by r voxels)",
            "on the model's working grid (9 x 9 x 9 mm; r in its voxels, the model's own r = 3)",
        ):
            assert title in text
    assert "![C2 recall and false-positive rate against r](candidates.png)" in markdown
    organs = list(fastcascade.CLASS_NAMES[1:])
    assert list(report["stages"]) == ["stage1", "stage2", "stage2_overlap"]
    for stage in report["stages"].values():
        assert list(stage["dice"]) == organs
        assert set(stage["dice"]["liver"]) == {"n", "mean", "std", "median", "min", "max"}
    assert [(c["before"], c["after"]) for c in report["comparisons"]] == [
        ("stage1", "stage2"), ("stage1", "stage2_overlap"), ("stage2", "stage2_overlap"),
    ]  # fmt: skip
    assert [c["radius"] for c in report["candidates"]] == RADII
    assert report["model_radius"] == 3 and report["working_spacing"] == [9.0, 9.0, 9.0]
    assert report["label_map"] == "case_a" and report["n_cases"] == 2
    assert [c["alignment"]["reference_to_ct"] for c in report["cases"]] == ["same", "reoriented"]
    assert report["cases"][1]["alignment"]["stage2_to_reference"] == "reoriented"

    import matplotlib.image

    png = matplotlib.image.imread(folder / "candidates.png")
    assert png.shape[:2] == (420, 640) and png[..., :3].std() > 0.05


@pytest.mark.slow
def test_the_tables_agree_with_the_ordinary_route(evaluated, oracle):
    _, _, err, folder = evaluated
    config, want = oracle
    report = json.loads((folder / "report.json").read_text())
    organs = list(config.class_names[1:])
    for case, w in zip(report["cases"], want, strict=True):
        for stage in ("stage1", "stage2", "stage2_overlap"):
            assert [case["dice"][stage][o] for o in organs] == _nan(w[stage][1:]), stage
        for r, (got, (recall, fpr, frac)) in enumerate(
            zip(case["candidates"], w["candidates"], strict=True)
        ):
            assert got["radius"] == r
            assert got["recall"] == pytest.approx(recall)
            assert got["fpr"] == pytest.approx(fpr)
            assert got["candidate_fraction"] == pytest.approx(frac)
        # the cascade's own C2 is the row of the model's r
        assert case["candidates"][config.radius]["candidate_fraction"] == pytest.approx(
            w["c2_fraction"]
        )
        assert case["c2_fraction"] == pytest.approx(w["c2_fraction"])
        assert case["cut"] == w["cut"] and case["absent"] == w["absent"]
    for key, stage in report["stages"].items():
        for c, organ in enumerate(organs, start=1):
            values = [w[key][c] for w in want if not math.isnan(w[key][c])]
            s = stage["dice"][organ]
            assert s["n"] == len(values)
            if values:
                assert s["mean"] == pytest.approx(np.mean(values))
                assert (s["min"], s["max"]) == (
                    pytest.approx(min(values)),
                    pytest.approx(max(values)),
                )
    for comp in report["comparisons"]:
        a = np.array([w[comp["before"]] for w in want])
        b = np.array([w[comp["after"]] for w in want])
        p = compare_stages(a, b)[1:]
        assert [comp["organs"][o]["p"] for o in organs] == _nan(p)
        assert all(comp["organs"][o]["low_power"] for o in organs)


@pytest.mark.slow
def test_absent_and_cut_organs_are_counted(evaluated, oracle):
    _, out, _, folder = evaluated
    _, want = oracle
    report = json.loads((folder / "report.json").read_text())
    gallbladder = report["coverage"]["gallbladder"]
    assert gallbladder["absent"] >= 1 and "gallbladder" in report["cases"][0]["absent"]
    assert report["cases"][0]["dice"]["stage2"]["gallbladder"] is None
    assert report["stages"]["stage2"]["dice"]["gallbladder"]["n"] == 2 - gallbladder["absent"]
    for organ, cov in report["coverage"].items():
        assert cov["cut"] == sum(organ in w["cut"] for w in want)
        assert cov["absent"] == sum(organ in w["absent"] for w in want)
        assert cov["present"] + cov["absent"] == 2
    cut = [o for o, c in report["coverage"].items() if c["cut"]]
    assert cut, "the small field of view cuts some organ"
    assert "Cut by the field of view" in out
    assert f"{cut[0]} ({report['coverage'][cut[0]]['cut']} of 2 cases)" in out
    assert "Absent from the reference" in out and "gallbladder (" in out
    where_absent = report["cases"][0]["predicted_where_absent"]
    assert set(where_absent) == {"stage1", "stage2", "stage2_overlap"}
    assert all("gallbladder" in v for v in where_absent.values())


def test_grids_and_ids_are_checked_before_any_work(scans, model_path, capsys):
    tmp, cases = scans
    shifted = cases[0]["affine"].copy()
    shifted[2, 3] += 100.0
    _save(tmp / "ref_far.nii.gz", _case_a_ids(cases[0]["ref"]), shifted)
    _save(tmp / "ref_classes.nii.gz", cases[0]["ref"], cases[0]["affine"])
    bad = cases[0]["ref"].copy()
    bad[0, 0, 0] = 50
    _save(tmp / "ref_bad.nii.gz", bad, cases[0]["affine"])
    (tmp / "far.csv").write_text("ct1.nii.gz,ref1.nii.gz\nct1.nii.gz,ref_far.nii.gz\n")
    (tmp / "ids.csv").write_text("ct1.nii.gz,ref_classes.nii.gz\nct1.nii.gz,ref_bad.nii.gz\n")
    args = [
        "--model",
        model_path,
        "--label-map",
        "case_a",
        "--out",
        tmp / "never",
        "--device",
        "cpu",
    ]

    status, out, err = _run(capsys, "--csv", tmp / "far.csv", *args)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"case {tmp}/far.csv:2: {tmp}/ref_far.nii.gz and {tmp}/ct1.nii.gz have one shape" in err
    assert "origin (" in err and "orientation RAS" in err and "--resample" in err
    assert "case 1/2" not in err and not (tmp / "never").exists()

    status, out, err = _run(capsys, "--csv", tmp / "ids.csv", *args[:2], "--device", "cpu")
    assert status == 2 and "case 1/2" not in err
    assert f"case {tmp}/ids.csv:2: {tmp}/ref_bad.nii.gz holds class id 50" in err


@pytest.mark.slow
def test_a_reference_elsewhere_is_resampled_on_request(scans, model_path, capsys):
    tmp, cases = scans
    case = cases[0]
    shift = 2  # voxels of 7 mm along y: the reference's grid starts 14 mm further
    affine = case["affine"].copy()
    affine[1, 3] += 7.0 * shift
    moved = np.zeros_like(case["ref"])
    moved[:, :-shift] = case["ref"][:, shift:]
    _save(tmp / "ref_moved.nii.gz", moved, affine)
    (tmp / "moved.csv").write_text("ct1.nii.gz,ref_moved.nii.gz\n")
    args = ["--model", model_path, "--device", "cpu", "--radii", "0,3", "--out", tmp / "moved"]
    status, out, err = _run(capsys, "--csv", tmp / "moved.csv", *args)
    assert status == 2 and "--resample" in err
    status, out, err = _run(capsys, "--csv", tmp / "moved.csv", *args, "--resample")
    assert status == 0, err
    (row,) = json.loads((tmp / "moved" / "report.json").read_text())["cases"]
    assert row["alignment"]["reference_to_ct"] == "resampled"
    assert row["alignment"]["stage2_to_reference"] == "resampled"
    # oracle: the prediction on the CT's grid seen from the moved reference's voxels
    predictor = fastcascade.load_model(model_path, device="cpu")
    labels = predictor.segment(str(case["ct"]), overlap=False).labels
    on_moved = np.zeros_like(labels)
    on_moved[:, :-shift] = labels[:, shift:]
    want = _scored(on_moved, moved, predictor.config.num_classes)
    got = [row["dice"]["stage2"][o] for o in predictor.config.class_names[1:]]
    assert got == _nan(want[1:])


def test_model_options_need_a_model_and_the_folder_is_a_folder(scans, model_path, capsys):
    tmp, _ = scans
    with pytest.raises(SystemExit) as e:
        _run(capsys, "--csv", tmp / "cases.csv", "--device", "cpu")
    assert e.value.code == 2 and "--device apply only with --model" in capsys.readouterr().err
    (tmp / "a_file").write_text("")
    status, _, err = _run(
        capsys, "--csv", tmp / "cases.csv", "--model", model_path, "--out", tmp / "a_file"
    )
    assert status == 2 and "is a file; expected a folder" in err
    (tmp / "three.csv").write_text("ct1.nii.gz,ref1.nii.gz,ref1.nii.gz\n")
    status, _, err = _run(capsys, "--csv", tmp / "three.csv", "--model", model_path)
    assert status == 2 and "expected 'ct,reference'" in err


def test_candidates_png_rejects_rows_without_its_columns(tmp_path):
    from fastcascade.viz import candidates_png

    with pytest.raises(ValueError, match="empty"):
        candidates_png([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="lack"):
        candidates_png([{"radius": 0, "recall_mean": 1.0}], tmp_path / "x.png")
