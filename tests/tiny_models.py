"""Tiny cascades and volumes for the tests that run the real pipeline: a saved random
model on a coarse grid, phantom scan files, and the two-organ box volumes and the
configuration the training tests draw their tiles from."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import torch

import fastcascade
from fastcascade.config import CLASS_NAMES, Architecture, CascadeConfig, StageConfig
from fastcascade.model import UNet3D
from fastcascade.model.checkpoint import save_cascade


def save_tiny_cascade(
    path: Path,
    *,
    spacing: float = 6.0,
    base_channels: int = 2,
    foreground_bias: bool = False,
) -> Path:
    """Save a random two-stage cascade (the default 11 classes, two levels, "same"
    padding, 16³ tiles, isotropic ``spacing`` mm, stage 2 on the -200..400 HU window)
    as ``path.safetensors`` + ``path.json``; returns the weights file.

    The networks are drawn after ``torch.manual_seed(0)``. ``foreground_bias``: each
    classifier's bias drawn from N(0, 2²), so that stage 1 marks some voxels and the
    candidate map C2 is not empty."""
    torch.manual_seed(0)
    arch = Architecture(
        num_classes=len(CLASS_NAMES), base_channels=base_channels, levels=2, padding="same"
    )
    config = CascadeConfig(
        spacing=(spacing, spacing, spacing),
        stage1=StageConfig(window=(-1000.0, 1000.0), tile=(16, 16, 16), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=(16, 16, 16), architecture=arch),
    )
    nets = []
    for _ in range(2):
        net = UNet3D.from_architecture(arch)
        if foreground_bias:
            torch.nn.init.normal_(net.classifier.bias, 0.0, 2.0)
        nets.append(net)
    save_cascade(path, config, *nets)
    return path.with_suffix(".safetensors")


def write_phantoms(folder: Path, seeds=(1, 2, 3), corrupt: str | None = None) -> list[Path]:
    """Phantoms of 40×36×32 voxels of 6 mm as ``folder/case<seed>.nii.gz`` (the folder
    created if missing), and with ``corrupt`` a file of that name that is not a NIfTI
    file; returns the phantoms' paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in seeds:
        ph = fastcascade.phantom.make_phantom(shape=(40, 36, 32), spacing=(6, 6, 6), seed=k)
        path = folder / f"case{k}.nii.gz"
        nib.save(ph.to_nifti()[0], path)
        paths.append(path)
    if corrupt is not None:
        (folder / corrupt).write_bytes(b"this is not a NIfTI file")
    return paths


def two_organ_volume(seed: int, shape, first, second) -> tuple[torch.Tensor, torch.Tensor]:
    """A box of soft tissue in air with two organs: ``(image, labels)``, float32 HU and
    uint8 labels of ``shape`` (x, y, z).

    The body fills all but a 2-voxel margin, 40 ± 15 HU drawn from a generator seeded
    with ``seed``; label 1 fills the box ``first`` moved ``seed % 3`` voxels along x and
    is 80 HU brighter, label 2 the box ``second`` moved as much back along y and 60 HU
    darker (boxes as ``((x0, x1), (y0, y1), (z0, z1))``, ends excluded)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full(shape, -1000.0)
    image[2:-2, 2:-2, 2:-2] = 40 + 15 * torch.randn(tuple(n - 4 for n in shape), generator=g)
    labels = torch.zeros(shape, dtype=torch.uint8)
    o = seed % 3
    (x0, x1), (y0, y1), (z0, z1) = first
    labels[x0 + o : x1 + o, y0:y1, z0:z1] = 1
    (x0, x1), (y0, y1), (z0, z1) = second
    labels[x0:x1, y0 - o : y1 - o, z0:z1] = 2
    image[labels == 1] += 80
    image[labels == 2] -= 60
    return image, labels


def train_config(padding="same", tile=8, class_names=CLASS_NAMES) -> CascadeConfig:
    """A trainable cascade on a 3 mm grid (r = 1): two levels of 2 base channels,
    ``tile``³ tiles, stage 2 on the -200..400 HU window."""
    arch = Architecture(num_classes=len(class_names), base_channels=2, levels=2, padding=padding)
    tiles = (tile, tile, tile)
    return CascadeConfig(
        class_names=tuple(class_names),
        spacing=(3.0, 3.0, 3.0),
        radius=1,
        stage1=StageConfig(tile=tiles, architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=tiles, architecture=arch),
    )
