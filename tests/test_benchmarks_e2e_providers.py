"""Tests of the end-to-end benchmark's providers (``benchmarks/e2e_providers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastcascade.model import UNet3D
from fastcascade.model.unet3d import ConvBNReLU

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def e2e_providers():
    sys.path.insert(0, str(BENCH))
    try:
        import e2e_providers as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_torch_only_network_matches_and_has_no_fused_blocks(e2e_providers):
    torch.manual_seed(1)
    net = UNet3D(1, 3, 2, 2, "same").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    plain = e2e_providers.torch_only(net).eval()
    blocks = sum(isinstance(m, ConvBNReLU) for m in net.modules())
    assert blocks == 6  # 2 encoder levels + 1 decoder level, two blocks each
    assert sum(isinstance(m, e2e_providers.TorchConvBNReLU) for m in plain.modules()) == blocks
    assert not any(isinstance(m, ConvBNReLU) for m in plain.modules())
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)
