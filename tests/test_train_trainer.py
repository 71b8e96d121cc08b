"""The trainer (bit-identical resume, regions, init state), fine-tuning and data sources."""

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import train_config, two_organ_volume

from fastcascade.config import CLASS_NAMES, CascadeConfig
from fastcascade.io.scan import load_scan
from fastcascade.model.checkpoint import load_cascade, load_training_checkpoint, save_cascade
from fastcascade.model.unet3d import UNet3D
from fastcascade.ops.intensity import apply_window
from fastcascade.ops.resample import resample
from fastcascade.train.dataset import NiftiSource, PhantomSource, Volume
from fastcascade.train.finetune import adapt_state, finetune
from fastcascade.train.trainer import checkpoint_path, stage1_candidates, train_stage

SHAPE = (20, 18, 16)


def _volume(seed, shape=SHAPE):
    """A box of soft tissue in air with two organs: body mask, labels, distinct HU."""
    return two_organ_volume(seed, shape, ((4, 10), (4, 10), (3, 9)), ((11, 16), (9, 15), (8, 13)))


class SynthSource:
    """Two synthetic volumes on a 3 mm grid, drawn with their own generator."""

    def __init__(self, seed=0, spacing=(3.0, 3.0, 3.0)):
        self.volumes = [Volume(*_volume(i), spacing, f"synth-{i}") for i in range(2)]
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def draw(self):
        self.draws += 1
        return self.volumes[int(torch.randint(2, (1,), generator=self.generator))]

    def state_dict(self):
        return {"draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.draws = state["draws"]
        self.generator.set_state(state["generator"])


def flip_augment(image, labels, generator):
    """A cheap random augmentation that consumes the generator (flips and a HU shift)."""
    for axis in range(3):
        if bool(torch.rand((), generator=generator) < 0.5):
            image, labels = image.flip(axis + 1), labels.flip(axis)
    shift = float(torch.randn((), generator=generator)) * 10
    return torch.cat([image[:1] + shift, image[1:]]), labels


def _train(out, iterations, stage=1, resume=False, log=None, config=None, **kw):
    kw.setdefault("augment", flip_augment)
    return train_stage(
        stage,
        config or train_config(),
        kw.pop("source", None) or SynthSource(),
        out,
        iterations,
        batch_size=2,
        lr=1e-2,
        seed=3,
        checkpoint_every=2,
        log=log,
        resume=resume,
        **kw,
    )


class _Interrupt(Exception):
    pass


def _interrupt_at(iteration):
    def log(line):
        if f"iteration {iteration}/" in line:
            raise _Interrupt

    return log


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "stage, augment",
    [(1, flip_augment), (2, flip_augment), (1, True)],
    ids=["stage1_body_mask", "stage2_dilated_truth", "stage1_elastic_augmenter"],
)
def test_resume_is_bit_identical(tmp_path, stage, augment):
    straight = _train(tmp_path / "a", 4, stage, augment=augment)
    # stopped after 2 iterations, then resumed to 4
    _train(tmp_path / "b", 2, stage, augment=augment)
    resumed = _train(tmp_path / "b", 4, stage, resume=True, augment=augment)
    # killed during iteration 3 (after its checkpoint at 2), then resumed
    with pytest.raises(_Interrupt):
        _train(tmp_path / "c", 4, stage, log=_interrupt_at(3), augment=augment)
    assert load_training_checkpoint(checkpoint_path(tmp_path / "c", stage))["iteration"] == 2
    crashed = _train(tmp_path / "c", 4, stage, resume=True, augment=augment)
    _assert_same_state(straight, resumed)
    _assert_same_state(straight, crashed)
    ckpts = [load_training_checkpoint(checkpoint_path(tmp_path / d, stage)) for d in "abc"]
    assert [c["iteration"] for c in ckpts] == [4, 4, 4]
    assert ckpts[0]["losses"] == ckpts[1]["losses"] == ckpts[2]["losses"]
    for c in ckpts[1:]:
        for k, v in ckpts[0]["optimizer"]["state"].items():
            assert torch.equal(v["exp_avg_sq"], c["optimizer"]["state"][k]["exp_avg_sq"])
    # and the run did train: the weights moved from their initialisation
    torch.manual_seed(3)
    init = UNet3D.from_architecture(train_config().stage1.architecture)
    assert not torch.equal(init.classifier.weight, straight.classifier.weight.cpu())


def test_without_augmentation_also_resumes(tmp_path):
    straight = _train(tmp_path / "a", 3, augment=False)
    _train(tmp_path / "b", 2, augment=False)
    _assert_same_state(straight, _train(tmp_path / "b", 3, augment=False, resume=True))


def test_valid_padding_network_trains(tmp_path):
    config = train_config("valid", tile=20)
    model = _train(tmp_path, 2, config=config)
    assert model.output_size((20, 20, 20)) == (4, 4, 4)
    losses = load_training_checkpoint(checkpoint_path(tmp_path, 1))["losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_checkpoint_contents(tmp_path):
    _train(tmp_path, 2, stage=2)
    ckpt = load_training_checkpoint(checkpoint_path(tmp_path, 2))  # weights_only=True
    for key in (
        "model", "optimizer", "scaler", "rng", "sampler", "source", "augment_generator",
        "iteration", "config", "losses",
    ):  # fmt: skip
        assert key in ckpt, key
    assert ckpt["stage"] == 2 and ckpt["iteration"] == 2
    assert CascadeConfig.from_dict(ckpt["config"]) == train_config()
    assert ckpt["source"]["draws"] == 4 and ckpt["sampler"]["drawn"] == 4
    assert set(ckpt["rng"]) == {"torch", "numpy", "python"}
    assert json.loads((tmp_path / "stage2_losses.json").read_text())["losses"] == ckpt["losses"]


def test_only_the_region_counts(tmp_path):
    """A region holding one class only has weight λ = 0 everywhere: zero loss, and Adam
    leaves every parameter where it started although the other voxels are wrong."""
    calls = []

    def liver_only(image_hu, labels):
        calls.append(1)
        return labels == 1

    torch.manual_seed(3)
    init = UNet3D.from_architecture(train_config().stage1.architecture)
    model = _train(tmp_path, 4, stage=2, candidate_fn=liver_only, augment=False)
    assert load_training_checkpoint(checkpoint_path(tmp_path, 2))["losses"] == [0.0] * 4
    for (name, p0), p1 in zip(init.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p0, p1), name
    assert len(calls) == 2  # once per source volume, not once per sample


def test_volumes_with_empty_region_are_skipped(tmp_path):
    volume_1 = _volume(1)[0]

    def only_volume_1(image_hu, labels):  # the other volume's C2 is empty
        return (labels > 0) & torch.equal(image_hu, volume_1)

    _train(tmp_path / "a", 3, stage=2, candidate_fn=only_volume_1, augment=False)
    ckpt = load_training_checkpoint(checkpoint_path(tmp_path / "a", 2))
    assert ckpt["sampler"]["drawn"] == 6 and ckpt["source"]["draws"] > 6
    with pytest.raises(ValueError, match="empty stage-2 region.*train it longer"):
        _train(tmp_path / "b", 1, stage=2, candidate_fn=lambda im, lab: lab > 99)


@pytest.mark.slow
def test_loss_decreases(tmp_path):
    _train(tmp_path, 16, augment=False, stage=2)
    losses = load_training_checkpoint(checkpoint_path(tmp_path, 2))["losses"]
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4])


def test_init_state_and_zero_iterations(tmp_path):
    source_model = UNet3D.from_architecture(train_config().stage1.architecture)
    with torch.no_grad():
        for p in source_model.parameters():
            p.uniform_(-1, 1)
    model = _train(tmp_path, 0, init_state=source_model.state_dict())
    _assert_same_state(model, source_model)
    assert load_training_checkpoint(checkpoint_path(tmp_path, 1))["iteration"] == 0


def test_rejects_mismatches(tmp_path):
    with pytest.raises(ValueError, match="spacing"):
        _train(tmp_path / "a", 1, source=SynthSource(spacing=(1.5, 1.5, 1.5)))
    _train(tmp_path / "b", 1)
    with pytest.raises(ValueError, match="another config"):
        _train(tmp_path / "b", 2, resume=True, config=train_config(tile=16))
    with pytest.raises(ValueError, match="stage must be"):
        _train(tmp_path / "c", 1, stage=3)
    bad = UNet3D(num_classes=3, base_channels=2, levels=2).state_dict()
    with pytest.raises(ValueError, match="init_state"):
        _train(tmp_path / "d", 1, init_state=bad)


@pytest.mark.parametrize("winner, want_all", [(0, False), (1, True)], ids=["bg", "fg"])
@pytest.mark.parametrize("padding, tile", [("same", 8), ("valid", 20)])
def test_stage1_candidates_cover_the_volume(winner, want_all, padding, tile):
    config = train_config(padding, tile)
    model = UNet3D.from_architecture(config.stage1.architecture)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[winner] = 5.0
    image, labels = _volume(0, (13, 11, 9))  # not a multiple of any tile
    c2 = stage1_candidates(model, config)(image, labels)
    assert c2.dtype == torch.bool and c2.shape == image.shape
    if want_all:  # all of C1 (the body box) is foreground, dilated by r = 1
        from scipy import ndimage

        body = (image > config.body_threshold).numpy()
        want = ndimage.binary_dilation(body, ndimage.generate_binary_structure(3, 1))
        np.testing.assert_array_equal(c2.numpy(), want)
    else:
        assert not bool(c2.any())


def test_stage1_candidates_are_the_dilated_argmax():
    """Oracle: each tile through the network by plain slicing, argmax, SciPy dilation."""
    from scipy import ndimage

    config = train_config("same", tile=8)  # radius 1 on an isotropic grid: the 6-neighbourhood
    torch.manual_seed(0)
    model = UNet3D.from_architecture(config.stage1.architecture)
    model(torch.randn(2, 1, 8, 8, 8))  # non-trivial BatchNorm statistics
    model.eval()
    image, labels = _volume(1, (16, 8, 24))  # exactly 2 x 1 x 3 tiles
    x = apply_window(image, config.stage1.window)
    starts = [(i, k) for i in range(0, 16, 8) for k in range(0, 24, 8)]

    def tile_logits():
        out = torch.empty(11, *image.shape)
        with torch.no_grad():
            for i, k in starts:
                tile = x[i : i + 8, :, k : k + 8][None, None]
                out[:, i : i + 8, :, k : k + 8] = model(tile)[0]
        return out

    # shift the background bias to the median margin: about half the voxels foreground
    logits = tile_logits()
    margin = logits[1:].max(0).values - logits[0]
    with torch.no_grad():
        model.classifier.bias[0] += margin.median()
    # Stage 1 runs over the body mask C1 (> -300 HU: the soft-tissue box), as at inference.
    body = (image > config.body_threshold).numpy()
    fg = (tile_logits().argmax(0) > 0).numpy() & body
    assert 0.2 < fg[body].mean() < 0.8  # a mixed prediction, or the test proves little
    want = ndimage.binary_dilation(fg, ndimage.generate_binary_structure(3, 1))
    got = stage1_candidates(model, config, inference="tiles")(image, labels)
    np.testing.assert_array_equal(got.numpy(), want)
    assert not model.training
    # Slabs (the default): a "same" network over the whole volume at once.
    with torch.no_grad():
        whole = model(x[None, None])[0]
    fg = (whole.argmax(0) > 0).numpy() & body
    want = ndimage.binary_dilation(fg, ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(stage1_candidates(model, config)(image, labels).numpy(), want)


# -- intensity augmentation, cut borders, the training record ------------------------------
def _spy_loss(monkeypatch):
    """Record the targets and loss regions the trainer hands to the loss."""
    import fastcascade.train.trainer as trainer

    seen = []
    real = trainer.weighted_cross_entropy

    def spy(logits, target, region):
        seen.append((target.clone(), region.clone()))
        return real(logits, target, region)

    monkeypatch.setattr(trainer, "weighted_cross_entropy", spy)
    return seen


def test_intensity_augmentation_changes_inputs_never_labels(tmp_path, monkeypatch):
    from fastcascade.train.intensity import IntensityAugmenter

    inputs = []
    aug = IntensityAugmenter(max_offset_hu=40, noise_std_hu=(5.0, 10.0))

    def recorded(image_hu, window, generator):
        inputs.append(aug(image_hu, window, generator))
        return inputs[-1]

    seen = _spy_loss(monkeypatch)
    _train(tmp_path / "a", 3, intensity=recorded)
    with_aug, seen[:] = list(seen), []
    _train(tmp_path / "b", 3, intensity=False)
    plain = list(seen)
    assert len(with_aug) == len(plain) == 3 and len(inputs) == 6
    for (t1, r1), (t2, r2) in zip(with_aug, plain, strict=True):
        assert torch.equal(t1, t2) and torch.equal(r1, r2)  # the same labels and regions
    a = load_training_checkpoint(checkpoint_path(tmp_path / "a", 1))
    b = load_training_checkpoint(checkpoint_path(tmp_path / "b", 1))
    assert a["losses"] != b["losses"]  # ... but other inputs
    assert all(float(x.abs().max()) <= 1.0 for x in inputs)
    assert (
        a["training"]["intensity"]
        == "test_intensity_augmentation_changes_inputs_never_labels.<locals>.recorded"
    )
    assert b["training"]["intensity"] is None


class CutSource(SynthSource):
    """The two volumes with their first organ running out of the bottom face (z = 0)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        cut = []
        for v in self.volumes:
            labels = v.labels.clone()
            labels[4:10, 4:10, 0:9] = torch.where(labels[4:10, 4:10, 0:9] == 2, 2, 1)
            image = v.image_hu.clone()
            image[labels == 1] = 120.0
            cut.append(Volume(image, labels, v.spacing, v.key))
        self.volumes = cut


@pytest.mark.parametrize("region_z, margin, learns", [
    ("margin", 3, False), ("margin", 0, True), ("inside", 3, True),
], ids=["margin_ignored", "no_margin", "inside_counts"])  # fmt: skip
def test_the_loss_ignores_the_margin_at_a_cut_face_only(tmp_path, region_z, margin, learns):
    def region(image_hu, labels):
        z = torch.arange(labels.shape[2]).view(1, 1, -1)
        where = z < 3 if region_z == "margin" else (z >= 3) & (z < 6)
        return (image_hu > -300) & where

    torch.manual_seed(3)
    init = UNet3D.from_architecture(train_config().stage1.architecture)
    model = _train(tmp_path, 2, stage=2, candidate_fn=region, augment=False, intensity=False,
                   cut_margin=margin, source=CutSource())  # fmt: skip
    ckpt = load_training_checkpoint(checkpoint_path(tmp_path, 2))
    assert ckpt["training"]["cut_margin"] == margin
    pairs = zip(init.parameters(), model.parameters(), strict=True)
    moved = any(not torch.equal(p0, p1) for p0, p1 in pairs)
    assert moved == learns
    assert (ckpt["losses"] == [0.0, 0.0]) != learns


def test_the_training_record_is_kept_and_checked_on_resume(tmp_path):
    from fastcascade.train.intensity import IntensityAugmenter

    _train(tmp_path, 2)
    ckpt = load_training_checkpoint(checkpoint_path(tmp_path, 1))
    record = ckpt["training"]
    assert record["source"] == {"kind": "SynthSource"}  # a source without describe()
    assert record["augment"] == "flip_augment" and record["cut_margin"] == 3
    assert record["intensity"] == IntensityAugmenter().describe()
    assert "intensity_generator" in ckpt
    with pytest.raises(ValueError, match="another data mix or augmentation"):
        _train(tmp_path, 3, resume=True, intensity=IntensityAugmenter(max_offset_hu=5))
    with pytest.raises(ValueError, match="another data mix or augmentation"):
        _train(tmp_path, 3, resume=True, cut_margin=1)
    with pytest.raises(ValueError, match="margin"):
        _train(tmp_path / "x", 1, cut_margin=-1)


# -- fine-tuning ------------------------------------------------------------------------
OLD = ("background", "liver", "spleen", "kidney")
NEW = ("background", "spleen", "pancreas", "liver")


def _saved_cascade(tmp_path):
    config = train_config(class_names=OLD)
    torch.manual_seed(1)
    s1 = UNet3D.from_architecture(config.stage1.architecture).eval()
    s2 = UNet3D.from_architecture(config.stage2.architecture).eval()
    save_cascade(tmp_path / "old" / "model", config, s1, s2, dtype=torch.float32)
    return config, s1, s2


def test_adapt_state_copies_rows_by_name():
    old = UNet3D(num_classes=4, base_channels=2, levels=2)
    torch.manual_seed(5)
    new = UNet3D(num_classes=4, base_channels=2, levels=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    state = adapt_state(old.state_dict(), OLD, new, NEW)
    w_old, w_new = old.classifier.weight, state["classifier.weight"]
    for j, name in enumerate(NEW):
        if name in OLD:
            i = OLD.index(name)
            assert torch.equal(w_new[j], w_old[i]), name
            assert state["classifier.bias"][j] == old.classifier.bias[i]
        else:  # new class: the fresh initialisation
            assert torch.equal(w_new[j], fresh["classifier.weight"][j])
            assert state["classifier.bias"][j] == fresh["classifier.bias"][j]
    for k, v in old.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(state[k], v), k


def _ft_source():
    # labels index NEW: 1 spleen, 2 pancreas
    return SynthSource()


def test_finetune_copies_shared_rows(tmp_path):
    old_config, s1, s2 = _saved_cascade(tmp_path)
    config, f1, f2 = finetune(
        tmp_path / "old" / "model.safetensors", NEW, _ft_source(), tmp_path / "ft", 0, log=None
    )
    assert config.class_names == NEW and config.stage2.architecture.num_classes == 4
    for old, new in ((s1, f1), (s2, f2)):
        for j, name in enumerate(NEW):
            if name in OLD:
                i = OLD.index(name)
                assert torch.equal(new.classifier.weight[j], old.classifier.weight[i])
        for (k, v), w in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
            if not k.startswith("classifier"):
                assert torch.equal(v, w), k
    loaded_config, l1, _ = load_cascade(tmp_path / "ft" / "model.safetensors")
    assert loaded_config == config
    for k, v in f1.state_dict().items():  # the shipped format: float16 weights
        want = v.half().float() if v.is_floating_point() else v
        assert torch.equal(l1.state_dict()[k], want), k


def test_finetune_records_its_own_training(tmp_path):
    import dataclasses

    config = dataclasses.replace(train_config(class_names=OLD), training={"source": "the old mix"})
    s1 = UNet3D.from_architecture(config.stage1.architecture).eval()
    s2 = UNet3D.from_architecture(config.stage2.architecture).eval()
    save_cascade(tmp_path / "old" / "model", config, s1, s2, dtype=torch.float32)
    new, _, _ = finetune(
        tmp_path / "old" / "model", NEW, _ft_source(), tmp_path / "ft", 0, log=None
    )
    record = load_cascade(tmp_path / "ft" / "model")[0].training
    assert record == new.training and record["source"] == {"kind": "SynthSource"}
    assert record["finetuned_from"] == "model" and record["lr_scale"] == 0.1
    assert record["iterations"] == [0, 0]
    # the checkpoints' configs carry no record, so a resume may ask for more iterations
    assert "training" not in load_training_checkpoint(tmp_path / "ft" / "stage1.ckpt")["config"]


def test_finetune_learning_rate_is_ten_times_smaller(tmp_path):
    _saved_cascade(tmp_path)
    lr = 1e-3
    _, f1, _ = finetune(
        tmp_path / "old" / "model", NEW, _ft_source(), tmp_path / "ft", (1, 0), lr=lr, log=None,
        augment=False,
    )  # fmt: skip
    ckpt = load_training_checkpoint(tmp_path / "ft" / "stage1.ckpt")
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [pytest.approx(lr * 0.1)]
    # Adam's first step moves each weight by lr·sign(g) (up to eps): measure it
    torch.manual_seed(1)
    start = UNet3D.from_architecture(train_config(class_names=OLD).stage1.architecture)
    step = (f1.encoder[0][0].conv.weight - start.encoder[0][0].conv.weight).detach().abs()
    assert float(step.max()) == pytest.approx(lr * 0.1, rel=1e-3)


# -- data sources -------------------------------------------------------------------------
def _fake_phantom(calls):
    def make(shape, spacing, seed, contrast):
        calls.append((seed, contrast))
        image, labels = _volume(seed, tuple(shape))
        return SimpleNamespace(
            image=image.numpy(), labels=labels.numpy(), spacing=tuple(spacing), affine=np.eye(4)
        )

    return make


def test_phantom_pool_refresh_and_resume():
    calls = []
    kw = dict(
        spacing=(3.0, 3.0, 3.0), seed=10, pool_size=2, refresh_every=3, shape=SHAPE,
        make_fn=_fake_phantom(calls),
    )  # fmt: skip
    src = PhantomSource(**kw)
    keys = [src.draw().key for _ in range(7)]
    # pool {10, 11} for draws 1-3, {11, 12} for 4-6, {12, 13} from 7 on
    seeds = [int(k.split("-")[1]) for k in keys]
    assert set(seeds[:3]) <= {10, 11} and set(seeds[3:6]) <= {11, 12} and seeds[6] in {12, 13}
    assert [c[0] for c in calls] == [10, 11, 12, 13]
    state = src.state_dict()
    more = [src.draw().key for _ in range(5)]
    calls2 = []
    other = PhantomSource(**{**kw, "make_fn": _fake_phantom(calls2)})
    other.load_state_dict(state)
    assert [c[0] for c in calls2] == [12, 13]  # the pool is rebuilt from its seeds
    assert [other.draw().key for _ in range(5)] == more
    image, labels, spacing = next(iter(other))
    assert image.dtype == torch.float32 and labels.dtype == torch.uint8
    assert spacing == (3.0, 3.0, 3.0)


def test_phantom_contrast_depends_on_seed_only():
    calls = []
    src = PhantomSource(
        contrasts=("none", "portal_venous"), contrast_weights=(1, 3), make_fn=_fake_phantom(calls)
    )
    mix = [src.contrast_for(s) for s in range(400)]
    assert mix == [src.contrast_for(s) for s in range(400)]
    assert 0.65 < mix.count("portal_venous") / 400 < 0.85
    only = PhantomSource(contrasts=("portal_venous",), make_fn=_fake_phantom(calls))
    assert only.make(3).key == "phantom-3-portal_venous" and calls[-1] == (3, "portal_venous")


def test_phantom_resampled_to_working_grid():
    src = PhantomSource(
        spacing=(3.0, 3.0, 3.0), phantom_spacing=(1.5, 1.5, 3.0), shape=(20, 18, 16),
        make_fn=_fake_phantom([]),
    )  # fmt: skip
    v = src.make(0)
    assert tuple(v.image_hu.shape) == (10, 9, 16) and v.spacing == (3.0, 3.0, 3.0)
    image, labels = _volume(0, (20, 18, 16))
    torch.testing.assert_close(v.image_hu, resample(image, (10, 9, 16), mode="linear"))
    assert torch.equal(v.labels, resample(labels, (10, 9, 16), mode="nearest"))


def test_working_grid_is_a_no_op_on_the_grid():
    image, labels = _volume(2)
    grid = load_scan(image, spacing=(3.0, 3.0, 3.0)).working_grid((3.0, 3.0, 3.0))
    assert grid.spacing == (3.0, 3.0, 3.0)
    assert torch.equal(grid.image(), image) and torch.equal(grid.labels_from_input(labels), labels)


def _write_nifti(tmp_path, flip_x=True):
    image, labels = _volume(0)
    ids = labels.numpy().astype(np.int16) * 7  # file ids 7 and 14
    affine = np.diag([-2.0 if flip_x else 2.0, 2.0, 3.0, 1.0])
    data = np.flip(image.numpy(), 0) if flip_x else image.numpy()
    seg = np.flip(ids, 0) if flip_x else ids
    ct_path, seg_path = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), ct_path)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(seg), affine), seg_path)
    return ct_path, seg_path, image, labels


def test_nifti_source_canonical_mapped_and_resampled(tmp_path):
    ct, seg, image, labels = _write_nifti(tmp_path)
    src = NiftiSource([(ct, seg)], label_map={7: 5, 14: 2}, spacing=(2.0, 2.0, 3.0))
    v = src.draw()
    # the file was stored left-to-right flipped: canonical RAS undoes it
    torch.testing.assert_close(v.image_hu, image)
    want = torch.zeros_like(labels)
    want[labels == 1], want[labels == 2] = 5, 2
    assert torch.equal(v.labels, want) and v.spacing == (2.0, 2.0, 3.0)
    coarse = NiftiSource([(ct, seg)], label_map={7: 5, 14: 2}, spacing=(4.0, 4.0, 3.0)).draw()
    assert tuple(coarse.image_hu.shape) == (10, 9, 16)
    torch.testing.assert_close(coarse.image_hu, resample(image, (10, 9, 16), mode="linear"))
    assert torch.equal(coarse.labels, resample(want, (10, 9, 16), mode="nearest"))


def test_nifti_source_state_and_errors(tmp_path):
    ct, seg, *_ = _write_nifti(tmp_path, flip_x=False)
    pairs = [(ct, seg), (ct, seg)]
    a = NiftiSource(pairs, spacing=(2.0, 2.0, 3.0), seed=4)
    a.draw()
    state = a.state_dict()
    keys = [a.draw().key for _ in range(6)]
    b = NiftiSource(pairs, spacing=(2.0, 2.0, 3.0))
    b.load_state_dict(state)
    assert [b.draw().key for _ in range(6)] == keys
    assert int(b.draw().labels.max()) == 14  # no label map: file ids kept
    with pytest.raises(FileNotFoundError, match="missing"):
        NiftiSource([(ct, tmp_path / "missing.nii.gz")])
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), other)
    with pytest.raises(ValueError, match="grid"):
        NiftiSource([(ct, other)], spacing=(2.0, 2.0, 3.0)).draw()


def test_training_pairs_are_read_like_scans_at_inference(tmp_path):
    """Spacing from the affine (as ``segment()`` reads it) even where the header's voxel
    sizes say otherwise, and a label map given as the CT is refused."""
    from fastcascade.io.scan import load_scan
    from fastcascade.train.dataset import load_nifti_pair

    ct, seg, *_ = _write_nifti(tmp_path, flip_x=False)
    img = nib.load(ct)
    img.header.set_zooms((1.0, 1.0, 1.0))  # pixdim disagrees with the sform
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), odd)
    image, labels, spacing = load_nifti_pair(odd, seg)
    assert spacing == load_scan(odd).spacing == (2.0, 2.0, 3.0)
    assert image.shape == labels.shape
    with pytest.raises(ValueError, match="label map"):
        load_nifti_pair(seg, seg)


def test_nifti_source_case_a(case_a_paths):
    from fastcascade.presets import CASE_A_TO_CLASSES

    src = NiftiSource([case_a_paths], CASE_A_TO_CLASSES, spacing=(3.0, 3.0, 3.0))
    v = src.draw()
    assert v.image_hu.dtype == torch.float32 and v.labels.dtype == torch.uint8
    assert v.image_hu.shape == v.labels.shape
    assert set(torch.unique(v.labels).tolist()) <= set(range(len(CLASS_NAMES)))
    assert (v.labels == 1).sum() > 1000  # a liver
    assert float(v.image_hu.min()) < -900 and float(v.image_hu.max()) > 300


# -- the commands ---------------------------------------------------------------------------
def test_train_command_on_nifti_pairs(tmp_path):
    import argparse

    from fastcascade.cli import train as train_cli

    for i in range(2):
        image, labels = _volume(i)
        for name, data in ((f"ct{i}", image.numpy()), (f"seg{i}", labels.numpy() * 7)):
            nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / f"{name}.nii")
    (tmp_path / "pairs.csv").write_text("ct,labels\nct0.nii,seg0.nii\nct1.nii,seg1.nii\n")
    (tmp_path / "map.json").write_text(json.dumps({"7": 1, "14": 2}))
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    argv = [
        "train", "--out", str(tmp_path / "run"), "--csv", str(tmp_path / "pairs.csv"),
        "--label-map", str(tmp_path / "map.json"), "--iterations", "2", "--base-channels",
        "2", "--levels", "2", "--tile", "8", "--quiet",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    config, s1, s2 = load_cascade(tmp_path / "run" / "model.safetensors")
    assert config.class_names == CLASS_NAMES and config.stage1.tile == (8, 8, 8)
    first = load_file(tmp_path / "run" / "model.safetensors")
    assert load_training_checkpoint(tmp_path / "run" / "stage2.ckpt")["iteration"] == 2
    # resuming finished stages trains nothing more and rewrites the same model
    args = parser.parse_args([*argv, "--resume"])
    assert args.func(args) == 0
    again = load_file(tmp_path / "run" / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_read_pairs_and_label_maps(tmp_path):
    from fastcascade.presets import CASE_A_TO_CLASSES, read_label_map
    from fastcascade.train.sources import read_pairs

    (tmp_path / "a.csv").write_text("# cases\nx/ct.nii.gz, x/seg.nii.gz\n/abs/ct.nii,/abs/s.nii\n")
    assert read_pairs(tmp_path / "a.csv") == [
        (tmp_path / "x/ct.nii.gz", tmp_path / "x/seg.nii.gz"),
        (Path("/abs/ct.nii"), Path("/abs/s.nii")),
    ]
    (tmp_path / "b.csv").write_text("ct.nii\n")
    with pytest.raises(ValueError, match="ct,labels"):
        read_pairs(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("\ufeff# cases\nct,labels\na.nii.gz,b.nii.gz\n")
    assert read_pairs(tmp_path / "c.csv") == [(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")]
    (tmp_path / "d.csv").write_text("a.nii.gz,\n")
    with pytest.raises(ValueError, match="ct,labels"):
        read_pairs(tmp_path / "d.csv")
    assert read_label_map("case_a") == CASE_A_TO_CLASSES
    assert read_label_map(None) is None and read_label_map("none") is None
    with pytest.raises(ValueError, match=r"label map must be one of \['case_a'\]"):
        read_label_map("no_such_map")
    with pytest.raises(ValueError, match="--label-map must be one of"):
        read_label_map("no_such_map", "--label-map")


def test_training_source_picks_phantoms_or_the_csv_pairs(tmp_path):
    from fastcascade.train.sources import training_source

    phantoms = training_source((3.0, 3.0, 3.0), 5, pool_size=2, refresh_every=3, contrasts=["none"])
    assert isinstance(phantoms, PhantomSource)
    assert (phantoms.seed, phantoms.pool_size, phantoms.refresh_every) == (5, 2, 3)
    assert phantoms.contrasts == ("none",) and phantoms.spacing == (3.0, 3.0, 3.0)
    image, labels = _volume(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image.numpy(), affine), tmp_path / "ct.nii")
    nib.save(nib.Nifti1Image(labels.numpy() * 7, affine), tmp_path / "seg.nii")
    (tmp_path / "pairs.csv").write_text("ct.nii,seg.nii\n")
    pairs = training_source((3.0, 3.0, 3.0), 1, csv=tmp_path / "pairs.csv", label_map={7: 1, 14: 2})
    assert isinstance(pairs, NiftiSource)
    assert pairs.pairs == [(tmp_path / "ct.nii", tmp_path / "seg.nii")]
    assert torch.equal(pairs.draw().labels, labels.to(torch.uint8))
