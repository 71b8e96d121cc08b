"""Presets: dataset label maps, the paper's configuration and the shipped model's recipe.

A label map takes a dataset's label ids onto the classes of a config (``{file id: class
id}``, every other id background); ``read_label_map`` resolves a map's name or a JSON file.
``paper_config()`` is the paper's network on its label set; ``default_config()`` is the
configuration of the model shipped in ``fastcascade/weights/default.json``, and the
``fastcascade train`` command's defaults.

>>> read_label_map("case_a") == CASE_A_TO_CLASSES
True
>>> default_config().stage1.architecture.padding
'same'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .config import CLASS_NAMES, Architecture, CascadeConfig, StageConfig

#: Case A (TotalSegmentator v2 ids) onto ``CLASS_NAMES``; every other id is background.
CASE_A_TO_CLASSES: dict[int, int] = {5: 1, 1: 2, 2: 3, 3: 4, 7: 5, 6: 6, 4: 7, 52: 8, 63: 9, 64: 10}

#: Label maps known by name.
LABEL_MAPS: dict[str, dict[int, int]] = {"case_a": CASE_A_TO_CLASSES}

#: The paper's own label set (K = 8).
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


def read_label_map(value: str | None, what: str = "label map") -> dict[int, int] | None:
    """A label map by name (a key of ``LABEL_MAPS``), from a JSON file ``{"file id": class
    id}``, or ``None`` for ``None`` / ``"none"`` (ids used as they are).

    ``what`` names the value in error messages (a command passes its option's name).
    Returns a new dict; ``ValueError`` for an unknown name or a malformed file.

    >>> read_label_map(None) is None
    True
    """
    if value is None or value == "none":
        return None
    if value in LABEL_MAPS:
        return dict(LABEL_MAPS[value])
    path = Path(value)
    if not path.exists():
        raise ValueError(
            f"{what} must be one of {sorted(LABEL_MAPS)}, 'none' or a JSON file; "
            f"{value!r} is neither"
        )
    mapping = json.loads(path.read_text())
    try:
        return {int(k): int(v) for k, v in mapping.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(
            f'label map {path} must be a JSON object of integer ids, e.g. {{"5": 1}}'
        ) from None


def paper_config(class_names: Sequence[str] = PAPER_CLASS_NAMES) -> CascadeConfig:
    """The paper's preset: its network (base 32, 4 levels, valid convolutions) on half of
    a ~0.7 mm scan, 132x132x116 tiles, r = 3, on ``class_names`` (the paper's K = 8
    unless given)."""
    arch = Architecture(num_classes=len(class_names))
    return CascadeConfig(
        class_names=tuple(class_names),
        spacing=(1.5, 1.5, 1.5),
        stage1=StageConfig(window=(-1000.0, 1000.0), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), architecture=arch),
    )


def default_config(
    base_channels: int = 6,
    levels: int = 4,
    padding: str = "same",
    spacing: float = 3.0,
    tile: int = 64,
    class_names: Sequence[str] = CLASS_NAMES,
) -> CascadeConfig:
    """The shipped model's recipe: both stages ``UNet3D(base_channels, levels, padding)``
    on an isotropic ``spacing`` mm grid with ``tile``³ voxel tiles, stage 1 windowed to
    the whole CT range and stage 2 to a soft-tissue window (HU, see the code), on
    ``class_names``.

    With its defaults it equals the config of ``fastcascade/weights/default.json``
    (``tests/test_presets.py`` checks it).
    """
    arch = Architecture(
        in_channels=1,
        num_classes=len(class_names),
        base_channels=base_channels,
        levels=levels,
        padding=padding,
    )
    tiles = (tile, tile, tile)
    return CascadeConfig(
        class_names=tuple(class_names),
        spacing=(spacing, spacing, spacing),
        stage1=StageConfig(window=(-1000.0, 1000.0), tile=tiles, architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=tiles, architecture=arch),
    )
