"""UNet3D against the paper's numbers and an independent functional implementation."""

import pytest
import torch
import torch.nn.functional as F

from fastcascade.model import UNet3D


def paper_parameter_count(num_classes: int, base: int = 32, levels: int = 4) -> int:
    """Çiçek's U-Net counted by hand: conv3 (27·ci·co + co), BN (2·co), upconv (8·c² + c)."""

    def conv(ci, co, k=27):
        return k * ci * co + co

    total, ch = 0, 1
    for level in range(levels):
        mid = base * 2**level
        total += conv(ch, mid) + 2 * mid + conv(mid, 2 * mid) + 4 * mid
        ch = 2 * mid
    for level in reversed(range(levels - 1)):
        skip = base * 2 ** (level + 1)
        total += conv(ch, ch, k=8)  # 2x2x2 up-convolution keeps the width
        total += conv(ch + skip, skip) + 2 * skip + conv(skip, skip) + 2 * skip
        ch = skip
    return total + conv(ch, num_classes, k=1)


def test_paper_network_shape_and_parameters():
    with torch.device("meta"):
        net = UNet3D(num_classes=8)
        out = net(torch.empty(1, 1, 132, 132, 116))
    assert tuple(out.shape) == (1, 8, 44, 44, 28)
    assert net.output_size((132, 132, 116)) == (44, 44, 28)
    count = sum(p.numel() for p in net.parameters())
    assert count == paper_parameter_count(8) == 19_074_120
    # The paper states 19,069,955: within 0.03% (the difference is explained in the docstring).
    assert abs(count - 19_069_955) / 19_069_955 < 3e-4


@pytest.mark.parametrize("base,levels", [(4, 2), (8, 3), (16, 4)], ids=lambda v: str(v))
def test_parameter_count_matches_formula(base, levels):
    with torch.device("meta"):
        net = UNet3D(num_classes=11, base_channels=base, levels=levels)
    assert sum(p.numel() for p in net.parameters()) == paper_parameter_count(11, base, levels)


def functional_forward(state: dict, x: torch.Tensor, levels: int, pad: int) -> torch.Tensor:
    """The same network written with F.* calls only, reading weights by name."""

    def block(prefix, x):
        for i in (0, 1):
            p = f"{prefix}.{i}"
            x = F.conv3d(x, state[f"{p}.conv.weight"], state[f"{p}.conv.bias"], padding=pad)
            x = F.batch_norm(
                x,
                state[f"{p}.bn.running_mean"],
                state[f"{p}.bn.running_var"],
                state[f"{p}.bn.weight"],
                state[f"{p}.bn.bias"],
                training=False,
                eps=1e-5,
            )
            x = F.relu(x)
        return x

    skips = []
    for level in range(levels):
        x = block(f"encoder.{level}", x)
        if level < levels - 1:
            skips.append(x)
            x = F.max_pool3d(x, 2)
    for i in range(levels - 1):
        x = F.conv_transpose3d(x, state[f"up.{i}.weight"], state[f"up.{i}.bias"], stride=2)
        skip = skips[-1 - i]
        crops = [(s - t) // 2 for s, t in zip(skip.shape[2:], x.shape[2:], strict=True)]
        skip = skip[
            :,
            :,
            crops[0] : crops[0] + x.shape[2],
            crops[1] : crops[1] + x.shape[3],
            crops[2] : crops[2] + x.shape[4],
        ]
        x = block(f"decoder.{i}", torch.cat([skip, x], 1))
    return F.conv3d(x, state["classifier.weight"], state["classifier.bias"])


@pytest.mark.parametrize(
    "padding,levels,size",
    [("valid", 3, (44, 52, 60)), ("valid", 2, (22, 26, 30)), ("same", 3, (16, 8, 24))],
    ids=["valid-3lv", "valid-2lv-odd", "same-3lv"],
)
def test_forward_matches_functional(padding, levels, size):
    torch.manual_seed(0)
    net = UNet3D(num_classes=5, base_channels=4, levels=levels, padding=padding)
    # Non-trivial BatchNorm statistics so a wrong eps/order would show.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        got = net(x)
        want = functional_forward(net.state_dict(), x, levels, 1 if padding == "same" else 0)
    assert got.shape[2:] == net.output_size(size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_output_size_rejects_sizes_that_do_not_pool_evenly():
    net = UNet3D(num_classes=3, base_channels=2, levels=3)
    with pytest.raises(ValueError, match="even size"):
        net.output_size((45, 44, 44))
    n = net.valid_input_size(10)
    assert net.output_size((n,) * 3)[0] >= 10
    assert net.margin((n,) * 3) == ((n - net.output_size((n,))[0]) // 2,) * 3


@pytest.mark.parametrize(
    "kwargs", [{"padding": "full"}, {"levels": 1}, {"num_classes": 1}], ids=str
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        UNet3D(**kwargs)


def test_forward_rejects_wrong_rank():
    net = UNet3D(num_classes=3, base_channels=2, levels=2, padding="same")
    with pytest.raises(ValueError, match="N, C, X, Y, Z"):
        net(torch.zeros(1, 8, 8, 8))
