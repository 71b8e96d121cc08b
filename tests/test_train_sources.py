"""Training sources from real anatomy (synth, repaint, real), their mix, and the checks
that name the case: deterministic for a seed, resumable, labels on the model's classes."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from fastcascade.config import CLASS_NAMES
from fastcascade.ops.warp import warp
from fastcascade.presets import CASE_A_TO_CLASSES
from fastcascade.train.anatomy import (
    CaseFiles,
    RepaintSource,
    SynthSource,
    load_case,
    map_structures,
)
from fastcascade.train.dataset import NiftiSource, PhantomSource, Volume, load_nifti_pair
from fastcascade.train.mixed import MixedSource, weighted_choice
from fastcascade.train.sampling import cut_distance
from fastcascade.train.sources import mixed_source, parse_mix, read_cases

SHAPE = (16, 14, 12)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
#: TotalSegmentator-style ids: four of our classes and two structures that are not.
NAMES = {1: "spleen", 5: "liver", 52: "aorta", 20: "colon", 26: "vertebrae_S1", 3: "kidney_left"}
HU = {1: 40.0, 5: 55.0, 52: 45.0, 20: -20.0, 26: 300.0, 3: 25.0}


def _write_case(folder, seed=0, cut=True, names=NAMES, suffix=".json"):
    """A small CT (body box in air) and its full label map; the liver runs out of the
    bottom slice when ``cut``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[2:-2, 2:-2, :] = -90.0 + 10 * rng.standard_normal((12, 10, 12))
    seg = np.zeros(SHAPE, np.uint8)
    o = seed % 2
    seg[3 + o : 9 + o, 3:9, (0 if cut else 1) : 6] = 5
    seg[9:13, 4:8, 4:9] = 1
    seg[7:9, 8:10, 2:11] = 52
    seg[4:12, 9:12, 7:10] = 20
    seg[6:10, 10:12, 1:4] = 26
    seg[10:13, 3:6, 9:11] = 3
    for i, v in HU.items():
        ct[seg == i] = v + 8 * rng.standard_normal(int((seg == i).sum()))
    nib.save(nib.Nifti1Image(ct, AFFINE), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), folder / "seg.nii.gz")
    if suffix == ".json":
        (folder / "names.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    else:
        rows = "".join(f"x,{k},{v},{k}\n" for k, v in names.items())
        (folder / "names.csv").write_text("group,original_idx,structure,id\n" + rows)
    return CaseFiles(folder / "ct.nii.gz", folder / "seg.nii.gz", folder / f"names{suffix}")


@pytest.fixture
def cases(tmp_path):
    files = [_write_case(tmp_path / "a", 0), _write_case(tmp_path / "e", 1, suffix=".csv")]
    return [load_case(f, (3.0, 3.0, 3.0)) for f in files]


def _same(a: Volume, b: Volume):
    assert a.key == b.key
    assert torch.equal(a.image_hu, b.image_hu) and torch.equal(a.labels, b.labels)
    if a.cut_distance is None:
        assert b.cut_distance is None
    else:
        assert torch.equal(a.cut_distance, b.cut_distance)


def _check_resumes(make):
    """Same seed, same draws; a state_dict taken mid-way gives the same next draws."""
    a, b = make(), make()
    for _ in range(2):
        _same(a.draw(), b.draw())
    state = a.state_dict()
    after = [a.draw() for _ in range(3)]
    c = make()
    c.load_state_dict(state)
    for want in after:
        _same(c.draw(), want)


OUR_CLASSES = set(range(len(CLASS_NAMES)))


# -- reading cases ------------------------------------------------------------------------
def test_load_case_keeps_the_full_label_map_on_the_working_grid(tmp_path):
    files = _write_case(tmp_path / "a")
    case = load_case(files, (3.0, 3.0, 3.0))
    image, ids, spacing = load_nifti_pair(files.ct, files.labels)
    assert torch.equal(case.image_hu, image) and torch.equal(case.structures, ids)
    assert case.names == NAMES and case.spacing == spacing == (3.0, 3.0, 3.0)
    assert case.name == "a/ct.nii.gz"
    coarse = load_case(files, (6.0, 6.0, 6.0))
    assert tuple(coarse.image_hu.shape) == (8, 7, 6) and coarse.structures.dtype == torch.uint8


def test_bad_cases_are_refused_naming_the_case(tmp_path):
    unnamed = _write_case(tmp_path / "unnamed", names={k: v for k, v in NAMES.items() if k != 26})
    with pytest.raises(ValueError, match=r"case unnamed/ct.nii.gz: .*ids 26 that .* does not name"):
        load_case(unnamed, (3.0, 3.0, 3.0))
    shifted = _write_case(tmp_path / "shifted")
    seg = nib.load(shifted.labels)
    moved = AFFINE.copy()
    moved[0, 3] = 6.0
    nib.save(nib.Nifti1Image(np.asanyarray(seg.dataobj), moved), shifted.labels)
    with pytest.raises(ValueError, match=r"case shifted/ct.nii.gz: .* does not lie on the grid"):
        load_case(shifted, (3.0, 3.0, 3.0))
    missing = CaseFiles(tmp_path / "none" / "ct.nii.gz", tmp_path / "none" / "seg.nii.gz")
    with pytest.raises(FileNotFoundError, match="case none/ct.nii.gz"):
        load_case(missing, (3.0, 3.0, 3.0))


def test_empty_and_unnamed_cases_cannot_feed_synthesis(tmp_path):
    files = _write_case(tmp_path / "empty")
    seg = nib.load(files.labels)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), seg.affine), files.labels)
    empty = load_case(files, (3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="SynthSource: case empty/ct.nii.gz has no labelled"):
        SynthSource([empty], CASE_A_TO_CLASSES)
    with pytest.raises(ValueError, match="RepaintSource: case empty/ct.nii.gz has no structure"):
        RepaintSource([empty], CASE_A_TO_CLASSES)
    bare = load_case(CaseFiles(files.ct, _write_case(tmp_path / "b").labels), (3.0,) * 3)
    with pytest.raises(
        ValueError, match="SynthSource: case empty/ct.nii.gz has no structure names"
    ):
        SynthSource([bare], CASE_A_TO_CLASSES)


# -- synth --------------------------------------------------------------------------------
def test_synth_source_is_deterministic_and_resumable(cases):
    _check_resumes(lambda: SynthSource(cases, CASE_A_TO_CLASSES, seed=4))
    one, other = SynthSource(cases, CASE_A_TO_CLASSES, 4), SynthSource(cases, CASE_A_TO_CLASSES, 5)
    assert not torch.equal(one.draw().image_hu, other.draw().image_hu)


def test_synth_labels_are_our_classes_of_the_deformed_map(cases):
    src = SynthSource(cases, CASE_A_TO_CLASSES, seed=2)
    twin = SynthSource(cases, CASE_A_TO_CLASSES, seed=2)
    keys = set()
    for _ in range(4):
        # a twin in src's state predicts the next draw's deformation: the labels follow it
        twin.load_state_dict(src.state_dict())
        k = twin._pick()
        coords = twin.next_deformation(cases[k])
        _, want = warp(torch.zeros(1, *SHAPE), cases[k].structures, coords)
        v = src.draw()
        assert v.labels.dtype == torch.uint8 and set(v.labels.unique().tolist()) <= OUR_CLASSES
        assert torch.equal(v.labels, map_structures(want, CASE_A_TO_CLASSES))
        assert v.image_hu.dtype == torch.float32 and v.image_hu.shape == SHAPE
        # the deformed cut distance is the case's, moved by the same deformation
        cut, _ = warp(cut_distance(map_structures(cases[k].structures, CASE_A_TO_CLASSES))[None],
                      None, coords, fill_value=0.0)  # fmt: skip
        torch.testing.assert_close(v.cut_distance, cut[0])
        keys.add(v.key)
    assert len(keys) == 4  # every draw is a new image
    # no structure outside the map becomes a class; colon (20) and S1 (26) are background
    assert 8 in set(src.labels[0].unique().tolist()) and 20 not in CASE_A_TO_CLASSES


def test_synth_without_deformation_keeps_labels_and_cut(cases):
    from fastcascade.train.synth import SynthParams

    src = SynthSource(cases[:1], CASE_A_TO_CLASSES, seed=0, params=SynthParams(deform=False))
    v = src.draw()
    assert torch.equal(v.labels, map_structures(cases[0].structures, CASE_A_TO_CLASSES))
    assert float(v.cut_distance[..., 0].max()) == 0.0  # the liver's bottom face is cut
    assert float(v.cut_distance[..., 5].min()) == 5.0


# -- repaint ------------------------------------------------------------------------------
def test_repaint_source_is_deterministic_and_resumable(cases):
    _check_resumes(lambda: RepaintSource(cases, CASE_A_TO_CLASSES, seed=1))


def test_repaint_keeps_the_labels_and_draws_the_given_phases(cases):
    src = RepaintSource(cases, CASE_A_TO_CLASSES, seed=3, phases=("arterial", "delayed"),
                        phase_weights=(3, 1))  # fmt: skip
    phases = []
    for _ in range(80):
        v = src.draw()
        case = next(c for c in cases if v.key.startswith(f"repaint-{c.name}-"))
        assert torch.equal(v.labels, map_structures(case.structures, CASE_A_TO_CLASSES))
        assert set(v.labels.unique().tolist()) <= OUR_CLASSES
        phases.append(v.key.split("-")[2])
    assert set(phases) == {"arterial", "delayed"} and 0.6 < phases.count("arterial") / 80 < 0.9
    aorta = v.labels == 8
    if phases[-1] == "arterial":  # the aorta enhances; the non-phase structures keep their HU
        assert float(v.image_hu[aorta].mean()) > 200
    # voxels farther than one voxel from every phase-dependent structure keep their bits
    case = next(c for c in cases if v.key.startswith(f"repaint-{c.name}-"))
    phased = torch.isin(case.structures, torch.tensor([1, 3, 5, 52], dtype=torch.uint8))
    near = torch.nn.functional.max_pool3d(phased[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert bool((~near & (case.structures == 26)).any())
    assert torch.equal(v.image_hu[~near], case.image_hu[~near])
    with pytest.raises(ValueError, match="phases must be names of"):
        RepaintSource(cases, CASE_A_TO_CLASSES, phases=("venous",))


# -- real ---------------------------------------------------------------------------------
def test_real_cases_read_once_are_the_nifti_source(cases):
    real = NiftiSource.from_cases(cases, CASE_A_TO_CLASSES, seed=2)
    files = NiftiSource([(c.files.ct, c.files.labels) for c in cases], CASE_A_TO_CLASSES,
                        spacing=(3.0, 3.0, 3.0), seed=2)  # fmt: skip
    for _ in range(4):
        a, b = real.draw(), files.draw()
        assert a.key == b.key
        assert torch.equal(a.image_hu, b.image_hu) and torch.equal(a.labels, b.labels)
    assert real.describe() == {"kind": "real", "seed": 2, "cases": ["a/ct.nii.gz", "e/ct.nii.gz"]}


# -- the mix ------------------------------------------------------------------------------
class _Tagged:
    def __init__(self, tag, seed=0):
        self.tag, self.generator, self.draws = tag, torch.Generator().manual_seed(seed), 0

    def draw(self):
        self.draws += 1
        return (self.tag, int(torch.randint(1000, (1,), generator=self.generator)))

    def state_dict(self):
        return {"draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.draws = state["draws"]
        self.generator.set_state(state["generator"])


def test_mixed_frequencies_follow_the_weights():
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    mix = MixedSource({n: _Tagged(n) for n in weights}, weights, seed=0)
    n = 4000
    tags = [mix.draw()[0] for _ in range(n)]
    for name, w in weights.items():
        assert tags.count(name) / n == pytest.approx(w / 8.0, abs=0.03), name
    assert mix.counts == {name: tags.count(name) for name in weights} and mix.draws == n


def test_mixed_state_resumes_exactly():
    def make():
        return MixedSource(
            {n: _Tagged(n, i) for i, n in enumerate("xyz")}, {"x": 1, "y": 1, "z": 3}, 7
        )

    a = make()
    for _ in range(5):
        a.draw()
    state = a.state_dict()
    after = [a.draw() for _ in range(20)]
    b = make()
    b.load_state_dict(state)
    assert [b.draw() for _ in range(20)] == after and b.counts == a.counts
    with pytest.raises(ValueError, match="sources"):
        MixedSource({"x": _Tagged("x")}).load_state_dict(state)


@pytest.mark.parametrize(
    "weights, match",
    [({"a": 0.0}, "> 0"), ({"a": -1.0}, "> 0"), ({"b": 1.0}, "must name the sources")],
)
def test_mixed_refuses_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        MixedSource({"a": _Tagged("a")}, weights)
    with pytest.raises(ValueError, match="at least one"):
        MixedSource({})


def test_weighted_choice_refuses_bad_weights():
    for bad in ([], [0.0, 0.0], [1.0, float("nan")], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="weights"):
            weighted_choice(torch.Generator(), bad)


def _fake_phantom(shape, spacing, seed, contrast):
    from types import SimpleNamespace

    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2, 2:-2] = 40.0
    labels = np.zeros(shape, np.uint8)
    labels[4:8, 4:8, 3:7] = 1 + seed % 3
    return SimpleNamespace(image=image, labels=labels, spacing=tuple(spacing))


def test_the_mix_of_every_kind_resumes_and_records_what_it_holds(tmp_path, cases, monkeypatch):
    monkeypatch.setattr("fastcascade.phantom.make_phantom", _fake_phantom)
    files = [c.files for c in cases]
    mix = parse_mix("phantom=1,synth=2,repaint=1,real=1")

    def make():
        return mixed_source(mix, (3.0, 3.0, 3.0), 5, cases=files, label_map=CASE_A_TO_CLASSES,
                            num_classes=len(CLASS_NAMES), pool_size=1,
                            phases=("arterial", "portal_venous"))  # fmt: skip

    _check_resumes(make)
    src = make()
    kinds = {src.draw().key.split("-")[0] for _ in range(30)}
    assert kinds == {"phantom", "synth", "repaint", "nifti"}
    d = src.describe()
    assert d["kind"] == "mixed" and d["weights"] == mix
    assert d["sources"]["synth"]["cases"] == ["a/ct.nii.gz", "e/ct.nii.gz"]
    assert d["sources"]["repaint"]["phases"] == ["arterial", "portal_venous"]
    assert d["sources"]["real"]["cases"] == ["a/ct.nii.gz", "e/ct.nii.gz"]
    assert d["sources"]["phantom"]["kind"] == "phantom"
    assert json.loads(json.dumps(d)) == d
    assert isinstance(src.sources["phantom"], PhantomSource)


def test_the_mix_checks_cases_before_training(tmp_path, cases):
    files = [c.files for c in cases]
    spacing = (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match=r"sources \['synth'\] need real cases"):
        mixed_source({"synth": 1.0}, spacing, 0)
    # a full label map with no map onto the classes: ids 20, 26, 52 are no class of ours
    with pytest.raises(ValueError, match=r"case a/ct.nii.gz: its ids give class ids \[20, 26"):
        mixed_source({"real": 1.0}, spacing, 0, cases=files, num_classes=len(CLASS_NAMES))
    with pytest.raises(ValueError, match=r"case a/ct.nii.gz: the label map gives class ids \[12\]"):
        mixed_source({"real": 1.0}, spacing, 0, cases=files, label_map={5: 12}, num_classes=11)
    bad = _write_case(tmp_path / "bad", names={5: "liver"})
    with pytest.raises(ValueError, match="case bad/ct.nii.gz"):
        mixed_source({"synth": 1.0}, spacing, 0, cases=[*files, bad], label_map=CASE_A_TO_CLASSES)


def test_parse_mix():
    assert parse_mix("phantom=1, synth=2,repaint=0.5,real") == {
        "phantom": 1.0, "synth": 2.0, "repaint": 0.5, "real": 1.0,
    }  # fmt: skip
    for text, match in (
        ("phantoms=1", "unknown source 'phantoms'"),
        ("synth=1,synth=2", "named twice"),
        ("synth=0", "weight > 0"),
        ("synth=x", "weight > 0"),
        ("", "no source"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_mix(text)


def test_read_cases_with_and_without_a_names_column(tmp_path):
    (tmp_path / "c.csv").write_text("ct,labels,names\na/ct.nii.gz,a/seg.nii.gz,a/n.json\n"
                                    "e/ct.nii.gz,e/seg.nii.gz\n")  # fmt: skip
    a, e = read_cases(tmp_path / "c.csv", names=tmp_path / "default.csv")
    assert a.names == tmp_path / "a" / "n.json" and e.names == tmp_path / "default.csv"
    assert (a.ct, a.labels, a.name) == (tmp_path / "a/ct.nii.gz", tmp_path / "a/seg.nii.gz",
                                        "a/ct.nii.gz")  # fmt: skip
    assert read_cases(tmp_path / "c.csv")[1].names is None


# -- the real cases -----------------------------------------------------------------------
def test_the_real_cases_feed_every_source(real_cases):
    files = [CaseFiles(*real_cases[c]) for c in ("case_a", "case_e")]
    cases = [load_case(f, (6.0, 6.0, 6.0)) for f in files]
    a, e = cases
    assert len(a.names) >= 100 and set(a.structures.unique().tolist()) - {0} <= set(a.names)
    # case E's kidneys and pancreas are cut off at its lowest slice: its bottom face is cut
    e_labels = map_structures(e.structures, CASE_A_TO_CLASSES)
    assert float(cut_distance(e_labels)[..., 0].max()) == 0.0
    assert {3, 4, 5} <= set(e_labels[..., 0].unique().tolist())
    synth = SynthSource(cases, CASE_A_TO_CLASSES, seed=0).draw()
    repainted = RepaintSource(cases, CASE_A_TO_CLASSES, seed=0).draw()
    for v in (synth, repainted):
        assert set(v.labels.unique().tolist()) <= OUR_CLASSES and int((v.labels == 1).sum()) > 100
        liver = v.image_hu[v.labels == 1]
        assert float((liver > -300).float().mean()) > 0.95  # on the body's side
    assert float(synth.image_hu.min()) >= -1024.0


# -- training on the mix --------------------------------------------------------------------
def _tiny_config():
    from fastcascade.config import Architecture, CascadeConfig, StageConfig

    arch = Architecture(base_channels=2, levels=2, padding="same")
    tiles = (8, 8, 8)
    return CascadeConfig(
        spacing=(3.0, 3.0, 3.0),
        radius=1,
        stage1=StageConfig(tile=tiles, architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=tiles, architecture=arch),
    )


def test_training_on_the_mix_resumes_bit_identically(tmp_path, cases, monkeypatch):
    from fastcascade.model.checkpoint import load_training_checkpoint
    from fastcascade.train.trainer import checkpoint_path, train_stage

    monkeypatch.setattr("fastcascade.phantom.make_phantom", _fake_phantom)
    files = [c.files for c in cases]

    def run(out, iterations, resume=False):
        source = mixed_source(parse_mix("phantom=1,synth=1,repaint=1,real=1"), (3.0,) * 3, 2,
                              cases=files, label_map=CASE_A_TO_CLASSES, num_classes=11,
                              pool_size=1)  # fmt: skip
        return train_stage(1, _tiny_config(), source, out, iterations, batch_size=2, lr=1e-2,
                           seed=1, checkpoint_every=2, log=None, resume=resume)  # fmt: skip

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    a, b = (load_training_checkpoint(checkpoint_path(tmp_path / d, 1)) for d in "ab")
    assert a["losses"] == b["losses"] and a["source"]["counts"] == b["source"]["counts"]
    assert sum(a["source"]["counts"].values()) >= 8
    assert a["training"]["source"]["weights"] == {"phantom": 1, "real": 1, "synth": 1, "repaint": 1}


# -- the command ----------------------------------------------------------------------------
def _cases_csv(tmp_path):
    _write_case(tmp_path / "a", 0)
    _write_case(tmp_path / "e", 1, suffix=".csv")
    (tmp_path / "cases.csv").write_text(
        "ct,labels,names\na/ct.nii.gz,a/seg.nii.gz,a/names.json\ne/ct.nii.gz,e/seg.nii.gz\n"
    )
    return tmp_path / "cases.csv", tmp_path / "e" / "names.csv"


TINY = ["--base-channels", "2", "--levels", "2", "--tile", "8", "--quiet", "--pool-size", "1"]


def test_train_command_on_the_mix_records_it(tmp_path, monkeypatch):
    from fastcascade import cli
    from fastcascade.model.checkpoint import load_config, load_training_checkpoint

    monkeypatch.setattr("fastcascade.phantom.make_phantom", _fake_phantom)
    csv, names = _cases_csv(tmp_path)
    out = tmp_path / "run"
    argv = [
        "train", "--out", str(out), "--iterations", "2", *TINY,
        "--sources", "phantom=1,synth=2,repaint=1,real=1", "--real-csv", str(csv),
        "--names", str(names), "--label-map", "case_a", "--phases", "arterial,delayed",
        "--stage2-regions", "labels", "--cut-margin", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    want = {"phantom": 1.0, "real": 1.0, "synth": 2.0, "repaint": 1.0}
    for stage in (1, 2):
        ckpt = load_training_checkpoint(out / f"stage{stage}.ckpt")
        assert ckpt["iteration"] == 2
        assert ckpt["training"]["source"]["weights"] == want
        assert ckpt["training"]["cut_margin"] == 2
        assert set(ckpt["source"]["sources"]) == set(want)
    # stage 2 drew on from where stage 1 stopped
    assert (
        ckpt["source"]["draws"] > load_training_checkpoint(out / "stage1.ckpt")["source"]["draws"]
    )
    config = load_config(out / "model.json")
    record = config.training
    assert record["source"]["weights"] == want
    assert record["source"]["sources"]["synth"]["cases"] == ["a/ct.nii.gz", "e/ct.nii.gz"]
    assert record["source"]["sources"]["repaint"]["phases"] == ["arterial", "delayed"]
    assert record["source"]["sources"]["real"]["cases"] == ["a/ct.nii.gz", "e/ct.nii.gz"]
    assert record["intensity"]["kind"] == "intensity" and record["augment"].startswith("Augmenter(")
    assert record["iterations"] == [2, 2] and record["stage2_regions"] == "labels"
    assert json.loads((out / "model.json").read_text())["training"] == record
    # resuming the finished run with the same mix trains nothing more
    assert cli.main([*argv, "--resume"]) == 0


CASES = ["--real-csv", "{csv}", "--names", "{names}", "--label-map", "case_a"]


@pytest.mark.parametrize(
    "edit, data, match",
    [
        (None, ["--sources", "synth=1"], "needs the cases: --real-csv"),
        ("unnamed", ["--sources", "synth=1", *CASES], r"case a/ct.nii.gz: .* holds label ids 26"),
        ("grid", ["--sources", "real=1", *CASES], r"case e/ct.nii.gz: .* does not lie on the grid"),
        (None, ["--sources", "real=1", *CASES[:4]], r"case a/ct.nii.gz: its ids give class ids"),
        ("empty", ["--sources", "synth=1", *CASES], r"case e/ct.nii.gz has no labelled structures"),
        (None, ["--sources", "synth=1", *CASES[:2], *CASES[4:]], r"case e/ct.nii.gz has no str"),
        (None, ["--sources", "pixels=1"], "unknown source 'pixels'"),
    ],
    ids=["no-cases", "unnamed-id", "grids", "no-label-map", "no-structures", "no-names", "kind"],
)
def test_train_command_refuses_bad_input_naming_the_case(tmp_path, capsys, edit, data, match):
    from fastcascade import cli

    csv, names = _cases_csv(tmp_path)
    a, e = tmp_path / "a", tmp_path / "e"
    if edit == "unnamed":  # a's names leave out id 26 (vertebrae_S1)
        (a / "names.json").write_text(json.dumps({k: v for k, v in NAMES.items() if k != 26}))
    elif edit in ("grid", "empty"):
        seg = nib.load(e / "seg.nii.gz")
        ids = np.asanyarray(seg.dataobj)
        ids = ids[:-1] if edit == "grid" else np.zeros_like(ids)
        nib.save(nib.Nifti1Image(ids, seg.affine), e / "seg.nii.gz")
    data = [d.format(csv=csv, names=names) for d in data]
    argv = ["train", "--out", str(tmp_path / "run"), "--iterations", "1", *TINY, *data]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "run" / "stage1.ckpt").exists()  # refused before any training
