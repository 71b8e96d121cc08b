"""How each conv-BN-ReLU layer shape runs on a GPU in eval mode: a committed table.

Keyed by layer shape ``(in_channels, out_channels)`` (3x3x3 kernels, stride 1). Each
entry names the provider that runs it (``"triton"``: fastcascade's fused kernel with the
block sizes given; ``"cudnn"``: ``torch.cudnn_convolution_relu`` with BatchNorm folded)
and the kernel's block configuration for 16-bit inputs (fp32 inputs halve ``BLOCK_K``).
The entries cover every layer of ``UNet3D`` with base widths 8, 16 and 32 (four
levels, the paper's network being base 32); other shapes get
``conv_bn_relu.default_config``.

``tuned: False`` marks a default that has not been measured: such a layer runs cuDNN,
the faster of PyTorch's paths, until ``benchmarks/gpu_check.sh --area tune`` has timed
our kernel's candidates against it on a GPU (bf16, at most 8 candidates per shape) and
rewritten this file with the winners. Run-time autotuning is opt-in
(``FASTCASCADE_AUTOTUNE=1``).
"""

#: Device and date of the tuning run that wrote this table; None while untuned.
TUNED_ON = None

# fmt: off
CONFIGS = {
    (1, 8): {"provider": "cudnn", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (1, 16): {"provider": "cudnn", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (1, 32): {"provider": "cudnn", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (8, 16): {"provider": "cudnn", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (16, 16): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (16, 32): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (32, 32): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (32, 64): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (48, 16): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (64, 64): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (64, 128): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (96, 32): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (128, 128): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (128, 256): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (192, 64): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "tuned": False},  # noqa: E501
    (256, 256): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (256, 512): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (384, 128): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
    (768, 256): {"provider": "cudnn", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "tuned": False},  # noqa: E501
}
# fmt: on
