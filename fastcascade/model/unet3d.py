"""The 3D U-Net of Çiçek et al. (2016) as used by Roth et al. (2018).

Tensors are ``(N, C, X, Y, Z)``; spatial sizes are voxels of the working grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Architecture
from ..ops.conv_bn_relu import conv_bn_relu
from ..ops.conv_bn_relu.folding import forget


class ConvBNReLU(nn.Module):
    """3x3x3 convolution, BatchNorm and ReLU: the one block a fused kernel replaces.

    ``padding`` is ``"valid"`` (no padding, each side loses one voxel) or ``"same"``.
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "valid"):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1 if padding == "same" else 0)
        self.bn = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eval mode on a GPU: BatchNorm folds into a fused kernel (ours or cuDNN's, per layer
        # shape). Training, batch statistics and the CPU keep PyTorch's kernels.
        if x.is_cuda and not (self.training or self.bn.training):
            return conv_bn_relu(x, self)
        return F.relu(self.bn(self.conv(x)))

    # The fused path caches the folded weights on the block and checks a stamp of its
    # tensors at every call (``ops.conv_bn_relu.folding.Prepared``); a change of mode or a
    # conversion, which replaces what the cache was built from, drops it outright.
    def train(self, mode: bool = True) -> ConvBNReLU:
        forget(self)
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        forget(self)
        return super()._apply(fn, recurse)


def _center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size, strict=True):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class UNet3D(nn.Module):
    """Çiçek's 3D U-Net: valid 3x3x3 conv-BN-ReLU pairs, 2x2x2 max-pooling and
    up-convolutions, cropped and concatenated skips, a 1x1x1 classifier.

    Widths follow the paper: level ``l`` convolves to ``c·2^l`` then ``c·2^(l+1)``
    (``c = base_channels``, 32 → 32…512 over four levels); each decoder level takes
    the up-convolved deeper features plus the skip and convolves twice to ``c·2^(l+1)``.

    Output: logits ``(N, num_classes, *output_size(input))``. With the defaults a
    132x132x116 tile gives 44x44x28 voxels.

    Parameters: convolutions with bias, BatchNorm with a scale and a shift per channel,
    up-convolutions with bias. For K = 8 the count is within 0.02% of the paper's
    19,069,955 (``tests/test_model_unet3d.py`` checks it against a hand formula); no
    single choice of biases or BatchNorm affine parameters reproduces the paper's exact
    figure, whose bookkeeping the paper does not spell out; the architecture is the same.

    >>> net = UNet3D(num_classes=8).eval()
    >>> net.output_size((132, 132, 116))
    (44, 44, 28)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 8,
        base_channels: int = 32,
        levels: int = 4,
        padding: str = "valid",
    ):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        if base_channels < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError("base_channels ≥ 1, num_classes ≥ 2 and in_channels ≥ 1 expected")
        self.architecture = Architecture(in_channels, num_classes, base_channels, levels, padding)
        c = base_channels
        self.encoder = nn.ModuleList()
        ch = in_channels
        for level in range(levels):
            mid = c * 2**level
            self.encoder.append(
                nn.Sequential(ConvBNReLU(ch, mid, padding), ConvBNReLU(mid, 2 * mid, padding))
            )
            ch = 2 * mid
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(levels - 1)):
            skip = c * 2 ** (level + 1)
            self.up.append(nn.ConvTranspose3d(ch, ch, 2, stride=2))
            self.decoder.append(
                nn.Sequential(ConvBNReLU(ch + skip, skip, padding), ConvBNReLU(skip, skip, padding))
            )
            ch = skip
        self.classifier = nn.Conv3d(ch, num_classes, 1)

    @classmethod
    def from_architecture(cls, arch: Architecture) -> UNet3D:
        return cls(
            arch.in_channels, arch.num_classes, arch.base_channels, arch.levels, arch.padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"UNet3D expects (N, C, X, Y, Z), got shape {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < len(self.encoder) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = up(x)
            x = block(torch.cat([_center_crop(skip, x.shape[2:]), x], dim=1))
        return self.classifier(x)

    # -- geometry -------------------------------------------------------------------
    def output_size(self, input_size: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial output size for an input size; raises ``ValueError`` if invalid."""
        return tuple(self._output_1d(int(s)) for s in input_size)

    def _output_1d(self, n: int) -> int:
        levels = self.architecture.levels
        shrink = 4 if self.architecture.padding == "valid" else 0
        size = n
        for level in range(levels):
            size -= shrink
            if level < levels - 1:
                if size <= 0 or size % 2:
                    raise ValueError(
                        f"input size {n} does not fit this U-Net: it must reach every "
                        f"max-pooling with an even size (see UNet3D.valid_input_size)"
                    )
                size //= 2
        for _ in range(levels - 1):
            size = 2 * size - shrink
        if size <= 0:
            raise ValueError(f"input size {n} is too small for this U-Net")
        return size

    def valid_input_size(self, min_output: int) -> int:
        """Smallest input size along one axis whose output is at least ``min_output``."""
        n = 1
        while True:
            try:
                if self._output_1d(n) >= min_output:
                    return n
            except ValueError:
                pass
            n += 1

    def margin(self, input_size: tuple[int, ...]) -> tuple[int, ...]:
        """Context lost on each side per axis: ``(input - output) / 2``."""
        out = self.output_size(input_size)
        return tuple((i - o) // 2 for i, o in zip(input_size, out, strict=True))
