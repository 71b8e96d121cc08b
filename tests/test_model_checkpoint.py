"""Model files (safetensors + JSON) and training checkpoints."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastcascade.config import Architecture, CascadeConfig, StageConfig
from fastcascade.io.atomic import atomic_write
from fastcascade.model.checkpoint import (
    FORMAT,
    load_cascade,
    load_state_any,
    load_training_checkpoint,
    model_paths,
    save_cascade,
    save_training_checkpoint,
)
from fastcascade.model.unet3d import UNet3D


def _config(base=2, levels=2, k=11):
    arch = Architecture(num_classes=k, base_channels=base, levels=levels, padding="same")
    return CascadeConfig(
        spacing=(3.0, 3.0, 3.0),
        stage1=StageConfig(tile=(16, 16, 16), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=(16, 16, 16), architecture=arch),
    )


def _trained_models(config, seed=0):
    """Two small U-Nets with non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    models = []
    for st in (config.stage1, config.stage2):
        m = UNet3D.from_architecture(st.architecture).train()
        with torch.no_grad():
            m(torch.randn(2, 1, 8, 8, 8) * 3 + 1)
        models.append(m.eval())
    return models


@pytest.fixture
def saved(tmp_path):
    config = _config()
    s1, s2 = _trained_models(config)
    weights, cfg = save_cascade(tmp_path / "model", config, s1, s2)
    return config, s1, s2, weights, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_round_trip(tmp_path, dtype):
    config = _config()
    s1, s2 = _trained_models(config)
    weights, cfg_path = save_cascade(tmp_path / "model.safetensors", config, s1, s2, dtype=dtype)
    assert (weights.name, cfg_path.name) == ("model.safetensors", "model.json")
    config2, l1, l2 = load_cascade(cfg_path)
    assert config2 == config
    for orig, loaded in ((s1, l1), (s2, l2)):
        assert not loaded.training
        want, got = orig.state_dict(), loaded.state_dict()
        assert set(want) == set(got)
        for k, v in want.items():
            if v.is_floating_point():
                assert got[k].dtype == torch.float32, k
                assert torch.equal(got[k], v.to(dtype).float()), k
            else:
                assert torch.equal(got[k], v), k  # num_batches_tracked stays an integer
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        if dtype == torch.float32:
            assert torch.equal(l1(x), s1(x))
        else:
            torch.testing.assert_close(l2(x), s2(x), rtol=2e-2, atol=2e-2)


def test_file_layout(saved):
    config, s1, s2, weights, cfg_path = saved
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == FORMAT
        assert f.get_tensor("stage1.classifier.weight").dtype == torch.float16
    want = {f"stage1.{k}" for k in s1.state_dict()} | {f"stage2.{k}" for k in s2.state_dict()}
    assert keys == want
    assert any(k.endswith("running_var") for k in keys)
    data = json.loads(cfg_path.read_text())
    assert data.pop("format") == FORMAT
    assert data == json.loads(json.dumps(config.to_dict()))


def test_paths_accept_stem_directory_and_either_file(tmp_path):
    want = (tmp_path / "m.safetensors", tmp_path / "m.json")
    for p in ("m", "m.safetensors", "m.json"):
        assert model_paths(tmp_path / p) == want
    assert model_paths(tmp_path) == (tmp_path / "model.safetensors", tmp_path / "model.json")


def test_missing_json(saved):
    *_, weights, cfg_path = saved
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_cascade(weights)


def test_missing_weights(saved):
    *_, weights, cfg_path = saved
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_cascade(cfg_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.pop("stage2"), "schema"),
    ],
    ids=["schema_version", "wrong_format", "no_format", "missing_field"],
)
def test_bad_json(saved, edit, match):
    *_, weights, cfg_path = saved
    data = json.loads(cfg_path.read_text())
    edit(data)
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_cascade(weights)


def _rewrite(weights, change):
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))


def test_missing_key_is_named(saved):
    *_, weights, _ = saved
    _rewrite(weights, lambda t: t.pop("stage2.classifier.bias"))
    with pytest.raises(ValueError, match=r"missing keys \['classifier.bias'\]"):
        load_cascade(weights)


def test_extra_key_is_named(saved):
    *_, weights, _ = saved
    _rewrite(weights, lambda t: t.update({"stage1.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_cascade(weights)


def test_key_outside_stages_is_named(saved):
    *_, weights, _ = saved
    _rewrite(weights, lambda t: t.update({"stage3.x": torch.zeros(2)}))
    with pytest.raises(ValueError, match="stage3.x"):
        load_cascade(weights)


def test_shape_mismatch_is_named(saved):
    *_, weights, _ = saved

    def change(t):
        t["stage1.classifier.weight"] = torch.zeros(7, *t["stage1.classifier.weight"].shape[1:])

    _rewrite(weights, change)
    with pytest.raises(ValueError, match="classifier.weight"):
        load_cascade(weights)


def test_architecture_mismatch_on_save(tmp_path):
    config = _config()
    other = UNet3D(num_classes=11, base_channels=4, levels=2, padding="same")
    s1, _ = _trained_models(config)
    with pytest.raises(ValueError, match="stage2"):
        save_cascade(tmp_path / "model", config, s1, other)
    assert not list(tmp_path.iterdir())


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_state_any_torch_file(tmp_path, wrap):
    sd = UNet3D(num_classes=3, base_channels=2, levels=2).state_dict()
    path = tmp_path / "w.pt"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    got = load_state_any(path)
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())


def test_load_state_any_safetensors(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.float16)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_state_any(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_load_state_any_refuses_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt: cannot read it") as info:
        load_state_any(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert "executed" not in capsys.readouterr().out


def test_load_state_any_rejects_non_state(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_state_any(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_state_any(tmp_path / "nope.pt")


def test_training_checkpoint_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {
        "iteration": 7,
        "generator": g.get_state(),
        "nested": {"losses": [0.5, 0.25], "tuple": (1, "a"), "t": torch.arange(3)},
        "config": _config().to_dict(),
    }
    path = save_training_checkpoint(tmp_path / "sub" / "c.ckpt", state)
    got = load_training_checkpoint(path)
    assert got["iteration"] == 7 and got["nested"]["losses"] == [0.5, 0.25]
    assert got["nested"]["tuple"] == (1, "a") and torch.equal(got["nested"]["t"], torch.arange(3))
    assert torch.equal(got["generator"], state["generator"])
    assert CascadeConfig.from_dict(got["config"]) == _config()
    with pytest.raises(FileNotFoundError):
        load_training_checkpoint(tmp_path / "missing.ckpt")
