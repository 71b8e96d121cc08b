"""``fastcascade export`` and ``fastcascade.model.export``: the exported programs compute
what the modules compute, with plain PyTorch operators only."""

from __future__ import annotations

import pytest
import torch

from fastcascade import cli
from fastcascade.config import Architecture, CascadeConfig, StageConfig
from fastcascade.model import UNet3D
from fastcascade.model.checkpoint import load_cascade, load_config, save_cascade
from fastcascade.model.export import ReferenceConvBNReLU, export_network, reference_network
from fastcascade.model.unet3d import ConvBNReLU


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    arch = Architecture(num_classes=5, base_channels=2, levels=2, padding="valid")
    config = CascadeConfig(
        spacing=(5.0, 5.0, 5.0),
        class_names=("background", "liver", "spleen", "kidney_right", "kidney_left"),
        stage1=StageConfig(window=(-1000.0, 1000.0), tile=(20, 24, 28), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=(24, 20, 20), architecture=arch),
    )
    nets = [UNet3D.from_architecture(arch) for _ in range(2)]
    for net in nets:  # BatchNorm statistics away from the identity, so folding them matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_cascade(path, config, *nets, dtype=torch.float32)
    return path.with_suffix(".safetensors")


def test_reference_network_has_no_fused_block_and_computes_the_same(model):
    _, net, _ = load_cascade(model)
    ref = reference_network(net)
    assert not any(isinstance(m, ConvBNReLU) for m in ref.modules())
    assert sum(isinstance(m, ReferenceConvBNReLU) for m in ref.modules()) == 6
    assert any(isinstance(m, ConvBNReLU) for m in net.modules())  # the original is untouched
    x = torch.randn(1, 1, 20, 24, 28)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), net(x), rtol=0, atol=0)


def test_export_round_trip_matches_the_modules(model, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", "--model", str(model), "--out", str(out), "--onnx", "no"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "stage1.pt2", "stage2.pt2"]
    config, *nets = load_cascade(model)
    assert load_config(out / "model.json") == config
    for name, net in zip(("stage1", "stage2"), nets, strict=True):
        program = torch.export.load(str(out / f"{name}.pt2"))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("fastcascade" in t for t in targets), targets
        tile = getattr(config, name).tile
        for batch in (1, 3):  # the batch is dynamic
            x = torch.randn(batch, 1, *tile) * 2
            with torch.no_grad():
                expected = net(x)
                got = program.module()(x)
            assert got.shape == (batch, 5, *net.output_size(tile))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "wrote" in capsys.readouterr().out
    # a second export refuses to replace the files unless asked
    assert cli.main(["export", "--model", str(model), "--out", str(out), "--onnx", "no"]) == 2
    argv = ["export", "--model", str(model), "--out", str(out), "--onnx", "no", "--overwrite"]
    assert cli.main(argv) == 0


def test_onnx_is_skipped_cleanly_or_written(model, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", "--model", str(model), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        assert names == ["model.json", "stage1.pt2", "stage2.pt2"]
        assert "no ONNX" in capsys.readouterr().out
        assert (
            cli.main(
                ["export", "--model", str(model), "--out", str(tmp_path / "x"), "--onnx", "yes"]
            )
            == 1
        )
        assert not (tmp_path / "x").exists()
        return
    assert names == ["model.json", "stage1.onnx", "stage1.pt2", "stage2.onnx", "stage2.pt2"]
    ort = pytest.importorskip("onnxruntime")
    config, net, _ = load_cascade(model)
    x = torch.randn(2, 1, *config.stage1.tile)
    session = ort.InferenceSession(str(out / "stage1.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), net(x), rtol=1e-4, atol=1e-4)


def test_export_network_keeps_its_input_module_unchanged():
    torch.manual_seed(1)
    net = UNet3D(num_classes=3, base_channels=2, levels=2, padding="same").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    program = export_network(net, (8, 8, 8))
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
