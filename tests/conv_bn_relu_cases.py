"""Shared by the tests of the fused conv3d + BatchNorm + ReLU: tiny cases, their
parameters, an independent float64 oracle, modules built from the parameters, the
reference of a module, and the U-Net's layer shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastcascade.config import CLASS_NAMES
from fastcascade.model import ConvBNReLU, UNet3D
from fastcascade.ops import _backend
from fastcascade.ops.conv_bn_relu import conv_bn_relu_ref

needs_interpreter = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="needs Triton with TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


@dataclass(frozen=True)
class Case:
    batch: int
    cin: int
    cout: int
    size: tuple[int, int, int]
    padding: str

    def __str__(self) -> str:
        x, y, z = self.size
        return f"b{self.batch}-cin{self.cin}-cout{self.cout}-{x}x{y}x{z}-{self.padding}"


# Tiny on purpose (the interpreter runs programs one by one); each row hits one awkward
# corner: C_in = 1 and 3 (flattened-K path), channel counts off multiples of 16, an even
# channel count (no channel mask), batch 2, more voxels than one BLOCK_M (686 > 512), more
# output channels than one BLOCK_N (72 > 64), odd sizes, both paddings.
CASES = [
    Case(1, 1, 8, (7, 6, 5), "valid"),
    Case(2, 3, 12, (5, 7, 6), "same"),
    Case(2, 20, 24, (7, 7, 7), "valid"),
    Case(1, 17, 72, (6, 5, 7), "same"),
    Case(1, 32, 16, (5, 5, 5), "same"),
    Case(1, 5, 3, (3, 4, 3), "valid"),
]


def make_params(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cin, cout = case.cin, case.cout
    x = torch.randn(case.batch, cin, *case.size, generator=g)
    w = torch.randn(cout, cin, 3, 3, 3, generator=g) / math.sqrt(27 * cin)
    b = torch.randn(cout, generator=g) * 0.1
    gamma = torch.rand(cout, generator=g) + 0.5
    beta = torch.randn(cout, generator=g) * 0.1
    mean = torch.randn(cout, generator=g) * 0.1
    var = torch.rand(cout, generator=g) + 0.5
    return x, (w, b, gamma, beta, mean, var, 1e-5)


def naive_conv_bn_relu(x, w, b, gamma, beta, mean, var, eps, padding):
    """Independent oracle in float64: explicit patches and an einsum, BN by its formula."""
    x = x.double()
    if padding == "same":
        x = F.pad(x, (1, 1, 1, 1, 1, 1))
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # N C X' Y' Z' 3 3 3
    y = torch.einsum("ncxyzijk,ocijk->noxyz", patches, w.double())
    per_channel = lambda t: t.double().view(1, -1, 1, 1, 1)  # noqa: E731
    y = (y + per_channel(b) - per_channel(mean)) / torch.sqrt(per_channel(var) + eps)
    return (y * per_channel(gamma) + per_channel(beta)).clamp_min(0)


def module_for(case: Case, seed: int = 0) -> ConvBNReLU:
    _, (w, b, gamma, beta, mean, var, _eps) = make_params(case, seed)
    m = ConvBNReLU(case.cin, case.cout, case.padding)
    with torch.no_grad():
        m.conv.weight.copy_(w)
        m.conv.bias.copy_(b)
        m.bn.weight.copy_(gamma)
        m.bn.bias.copy_(beta)
        m.bn.running_mean.copy_(mean)
        m.bn.running_var.copy_(var)
    return m.eval()


def expected_ref(m, x):
    """``conv_bn_relu_ref`` with the parameters and padding of module ``m`` (a
    ``ConvBNReLU`` or anything with ``conv`` and ``bn``)."""
    bn = m.bn
    return conv_bn_relu_ref(
        x, m.conv.weight, m.conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        bn.eps, "same" if tuple(m.conv.padding) == (1, 1, 1) else "valid",
    )  # fmt: skip


def unet_layer_shapes(base: int, levels: int = 4) -> set[tuple[int, int]]:
    with torch.device("meta"):
        net = UNet3D(num_classes=len(CLASS_NAMES), base_channels=base, levels=levels)
    return {
        (m.conv.in_channels, m.conv.out_channels)
        for m in net.modules()
        if isinstance(m, ConvBNReLU)
    }
