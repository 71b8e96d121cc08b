"""The model's saved configuration: classes, working grid, windows, r, tiles, architecture.

Everything a trained cascade needs besides its weights lives here and travels with them
(``model/checkpoint.py`` writes it as JSON beside the safetensors file). The class list is
defined once, here, and read everywhere else.

Geometry used throughout the package: volumes are indexed ``(x, y, z)`` in the canonical
RAS orientation (first axis towards the patient's right, second anterior, third superior),
spacings are in millimetres in the same order, intensities are Hounsfield units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEMA_VERSION = 1

#: The default model's and the phantom generator's classes, by id.
CLASS_NAMES: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas",
    "stomach",
    "gallbladder",
    "aorta",
    "inferior_vena_cava",
    "portal_splenic_vein",
)

#: Case A (TotalSegmentator v2 ids) onto ``CLASS_NAMES``; every other id is background.
CASE_A_TO_CLASSES: dict[int, int] = {5: 1, 1: 2, 2: 3, 3: 4, 7: 5, 6: 6, 4: 7, 52: 8, 63: 9, 64: 10}

#: The paper's own label set (K = 8), kept as an architecture preset.
PAPER_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "artery",
    "vein",
    "liver",
    "spleen",
    "stomach",
    "gallbladder",
    "pancreas",
)

AIR_HU = -1024.0


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of one ``UNet3D`` (see ``model/unet3d.py``).

    ``base_channels`` is the width of the first convolution (the paper: 32); each level
    doubles it, the paper's network reaching 512 at the bottom. ``padding`` is ``"valid"``
    (the paper) or ``"same"``.
    """

    in_channels: int = 1
    num_classes: int = len(PAPER_CLASS_NAMES)
    base_channels: int = 32
    levels: int = 4
    padding: str = "valid"


@dataclass(frozen=True)
class StageConfig:
    """One stage of the cascade.

    ``window`` is the HU range mapped linearly onto [-1, 1] (values outside are clipped);
    ``tile`` is the network's input size ``(x, y, z)`` in voxels of the working grid.
    """

    window: tuple[float, float] = (-1000.0, 1000.0)
    tile: tuple[int, int, int] = (132, 132, 116)
    architecture: Architecture = field(default_factory=Architecture)


@dataclass(frozen=True)
class CascadeConfig:
    """Everything about a two-stage cascade except its weights.

    ``spacing`` is the working grid's voxel size in mm ``(x, y, z)``; ``radius`` is the
    candidate-map dilation r in voxels of that grid; ``body_threshold`` the HU above which
    a voxel can belong to the body mask C1.
    """

    class_names: tuple[str, ...] = CLASS_NAMES
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    radius: int = 3
    body_threshold: float = -300.0
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CascadeConfig:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"model config has schema_version {version!r}; this fastcascade reads "
                f"version {SCHEMA_VERSION}"
            )

        def stage(d: dict) -> StageConfig:
            return StageConfig(
                window=tuple(d["window"]),
                tile=tuple(d["tile"]),
                architecture=Architecture(**d["architecture"]),
            )

        return cls(
            class_names=tuple(data["class_names"]),
            spacing=tuple(float(s) for s in data["spacing"]),
            radius=int(data["radius"]),
            body_threshold=float(data["body_threshold"]),
            stage1=stage(data["stage1"]),
            stage2=stage(data["stage2"]),
            schema_version=version,
        )


def paper_config(class_names: tuple[str, ...] = PAPER_CLASS_NAMES) -> CascadeConfig:
    """The paper's preset: its network (base 32, 4 levels, valid convolutions) on half of
    a ~0.7 mm scan, 132x132x116 tiles, r = 3; K = 8 classes unless ``class_names`` says
    otherwise."""
    arch = Architecture(num_classes=len(class_names))
    return CascadeConfig(
        class_names=tuple(class_names),
        spacing=(1.5, 1.5, 1.5),
        stage1=StageConfig(window=(-1000.0, 1000.0), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), architecture=arch),
    )
