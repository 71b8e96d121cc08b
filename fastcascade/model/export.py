"""A saved cascade as portable programs: each stage's network through ``torch.export``
(``stage1.pt2``, ``stage2.pt2``), and ONNX (``stage1.onnx``, ``stage2.onnx``) where the
``onnx`` and ``onnxscript`` packages are installed, with the model's JSON config beside
them (``model.json``: classes, working spacing, windows, r, tiles).

The exported graphs hold plain PyTorch operators only: every conv-BN-ReLU block is
replaced by its reference (``Conv3d`` → ``BatchNorm3d`` in eval mode → ``ReLU``, what
the CPU runs), never the fused GPU kernels, so any runtime that knows those operators
runs them. Input: float32 ``(N, C_in, *tile)`` with the stage's tile size (in voxels of
the working grid) and any batch ``N`` ≥ 1, intensities already windowed as the cascade
does; output: logits ``(N, num_classes, *output_size(tile))``.

>>> from fastcascade.model.export import export_cascade
>>> [p.name for p in export_cascade("model.safetensors", "exported/")]  # doctest: +SKIP
['stage1.pt2', 'stage2.pt2', 'model.json']
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.atomic import atomic_write, output_folders
from ..io.sitk import MissingDependencyError
from .checkpoint import FORMAT, STAGES, load_cascade
from .unet3d import ConvBNReLU, UNet3D

ONNX_CHOICES = ("auto", "yes", "no")
ONNX_INSTALL = "pip install onnx onnxscript"


class ReferenceConvBNReLU(nn.Module):
    """``relu(bn(conv(x)))`` with PyTorch's own operators (the reference of the fused
    kernel), sharing the parameters of the block it replaces."""

    def __init__(self, block: ConvBNReLU):
        super().__init__()
        self.conv, self.bn = block.conv, block.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def reference_network(net: UNet3D) -> UNet3D:
    """A copy of ``net`` on the CPU in eval mode, float32, whose conv-BN-ReLU blocks are
    :class:`ReferenceConvBNReLU`: the same function, with no fused kernel to trace."""
    ref = copy.deepcopy(net).to("cpu", torch.float32).eval()
    for module in list(ref.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ConvBNReLU):
                setattr(module, child_name, ReferenceConvBNReLU(child))
    return ref


def export_network(net: UNet3D, tile: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """``torch.export`` of :func:`reference_network` (``net``) for float32 input
    ``(N, C_in, *tile)`` with the batch ``N`` dynamic."""
    ref = reference_network(net)
    example = torch.zeros(2, ref.architecture.in_channels, *tile)  # 2: N stays symbolic
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        return torch.export.export(ref, (example,), dynamic_shapes=({0: batch},))


def export_cascade(model, out_dir, onnx: str = "auto") -> list[Path]:
    """Write each stage of the cascade ``model`` (a path, as ``load_cascade`` takes) to
    ``out_dir`` (created if missing): ``stage1.pt2``/``stage2.pt2`` (``torch.export.save``),
    ONNX per ``onnx`` (``"auto"``: where ``onnx`` and ``onnxscript`` are installed,
    ``"yes"``: required, ``"no"``: never), and ``model.json``. Returns the paths written.

    Raises ``ValueError`` for a bad ``onnx`` choice, ``MissingDependencyError`` for
    ``onnx="yes"`` without the packages; see ``load_cascade`` for the model's errors.
    """
    if onnx not in ONNX_CHOICES:
        raise ValueError(f"onnx must be one of {ONNX_CHOICES}, got {onnx!r}")
    write_onnx = onnx == "yes" or (onnx == "auto" and _onnx_installed())
    if onnx == "yes" and not _onnx_installed():
        raise MissingDependencyError(f"ONNX export needs onnx and onnxscript: {ONNX_INSTALL}")
    config, *nets = load_cascade(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; expected an output folder")
    written: list[Path] = []
    with output_folders([out_dir]):
        for name, net in zip(STAGES, nets, strict=True):
            tile = tuple(getattr(config, name).tile)
            program = export_network(net, tile)
            path = out_dir / f"{name}.pt2"
            atomic_write(path, lambda tmp, p=program: torch.export.save(p, str(tmp)))
            written.append(path)
            if write_onnx:
                path = out_dir / f"{name}.onnx"
                atomic_write(path, lambda tmp, p=program: _save_onnx(p, tmp))
                written.append(path)
        text = json.dumps({"format": FORMAT, **config.to_dict()}, indent=2) + "\n"
        path = out_dir / "model.json"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        written.append(path)
    return written


def _onnx_installed() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _save_onnx(program: torch.export.ExportedProgram, path) -> None:
    onnx_program = torch.onnx.export(program, dynamo=True)
    onnx_program.save(str(path))
