"""The model's saved configuration: classes, working grid, windows, r, tiles, architecture.

Everything a trained cascade needs besides its weights lives here and travels with them
(``model/checkpoint.py`` writes it as JSON beside the safetensors file). The class list is
defined once, here, and read everywhere else; presets and dataset label maps are in
``presets.py``.

Geometry used throughout the package: volumes are indexed ``(x, y, z)`` in the canonical
RAS orientation (first axis towards the patient's right, second anterior, third superior),
spacings are in millimetres in the same order, intensities are Hounsfield units.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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

AIR_HU = -1024.0


PADDINGS = ("valid", "same")

#: Upper bounds of a config's numbers, far beyond any sensible model, so that a corrupt or
#: hostile config is refused by name when it is read instead of exhausting memory later.
LIMITS: dict[str, Any] = {
    "in_channels": 16,
    "num_classes": 1024,
    "base_channels": 512,
    "levels": 8,
    "tile": 1024,  # voxels per axis
    "radius": 64,  # voxels
    "spacing": (0.01, 50.0),  # mm
    "hu": 100_000.0,  # |HU| of windows and the body threshold
}


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of one ``UNet3D`` (see ``model/unet3d.py``).

    ``base_channels`` is the width of the first convolution (the paper: 32); each level
    doubles it. ``padding`` is ``"valid"`` (the paper) or ``"same"``. ``num_classes``
    defaults to the package's class list, ``len(CLASS_NAMES)``.

    Checked when built: ``ValueError`` / ``TypeError`` naming the field.

    >>> Architecture(levels=0)
    Traceback (most recent call last):
    ...
    ValueError: Architecture.levels must be an integer >= 1, got 0
    """

    in_channels: int = 1
    num_classes: int = len(CLASS_NAMES)
    base_channels: int = 32
    levels: int = 4
    padding: str = "valid"

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_channels", "levels"):
            value = _int(getattr(self, name), f"Architecture.{name}", minimum=1)
            _set(self, name, _at_most(value, f"Architecture.{name}", LIMITS[name]))
        if self.padding not in PADDINGS:
            raise ValueError(
                f"Architecture.padding must be 'valid' or 'same', got {self.padding!r}"
            )


@dataclass(frozen=True)
class StageConfig:
    """One stage of the cascade.

    ``window`` is the HU range ``(lo, hi)``, ``lo < hi``, mapped linearly onto [-1, 1]
    (values outside are clipped); ``tile`` is the network's input size ``(x, y, z)`` in
    voxels of the working grid. Checked when built, like ``Architecture``.
    """

    window: tuple[float, float] = (-1000.0, 1000.0)
    tile: tuple[int, int, int] = (132, 132, 116)
    architecture: Architecture = field(default_factory=Architecture)

    def __post_init__(self) -> None:
        lo, hi = _reals(self.window, "StageConfig.window", 2, "two HU values (lo, hi)")
        if not lo < hi:
            raise ValueError(f"StageConfig.window must have lo < hi (HU), got {(lo, hi)}")
        if not (-LIMITS["hu"] <= lo and hi <= LIMITS["hu"]):
            raise ValueError(
                f"StageConfig.window must lie within ±{LIMITS['hu']:g} HU, got {(lo, hi)}"
            )
        _set(self, "window", (lo, hi))
        if isinstance(self.tile, str) or not isinstance(self.tile, Sequence):
            raise TypeError(f"StageConfig.tile must be 3 integers (x, y, z), got {self.tile!r}")
        if len(self.tile) != 3:
            raise ValueError(f"StageConfig.tile must be 3 integers (x, y, z), got {self.tile!r}")
        tile = tuple(_int(t, "StageConfig.tile", minimum=1) for t in self.tile)
        _set(self, "tile", tuple(_at_most(t, "StageConfig.tile", LIMITS["tile"]) for t in tile))
        if not isinstance(self.architecture, Architecture):
            raise TypeError(
                "StageConfig.architecture must be an Architecture, got "
                f"{type(self.architecture).__name__}"
            )


@dataclass(frozen=True)
class CascadeConfig:
    """Everything about a two-stage cascade except its weights.

    ``spacing`` is the working grid's voxel size in mm ``(x, y, z)``; ``radius`` is the
    candidate-map dilation r in voxels of that grid; ``body_threshold`` the HU above which
    a voxel can belong to the body mask C1. Both stages classify into ``class_names``:
    each stage's ``architecture.num_classes`` must equal ``len(class_names)``.

    ``training``: free-form metadata about how the weights were trained (the data mix,
    augmentation, iterations; see ``train.trainer.training_record``), or ``None``. It is
    kept as plain JSON (a JSON round trip leaves it unchanged), does not take part in the
    config's hash, and is left out of ``to_dict`` when ``None``, so files written before
    it existed, and the shipped ``weights/default.json``, read and write back unchanged.

    Checked when built (``ValueError`` / ``TypeError`` naming the field); sequences are
    stored as tuples, numbers as ``int`` / ``float``.

    >>> CascadeConfig().num_classes == len(CLASS_NAMES)
    True
    >>> CascadeConfig(radius=-1)
    Traceback (most recent call last):
    ...
    ValueError: CascadeConfig.radius must be an integer >= 0, got -1
    """

    class_names: tuple[str, ...] = CLASS_NAMES
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    radius: int = 3
    body_threshold: float = -300.0
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    schema_version: int = SCHEMA_VERSION
    training: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"CascadeConfig.class_names must be a sequence of names, got {names!r}")
        if not names:
            raise ValueError("CascadeConfig.class_names is empty; expected one name per class")
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError(
                f"CascadeConfig.class_names must be non-empty strings, got {list(names)!r}"
            )
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"CascadeConfig.class_names must be unique; repeated: {twice}")
        _set(self, "class_names", tuple(names))
        spacing = _reals(self.spacing, "CascadeConfig.spacing", 3, "3 voxel sizes in mm")
        lo, hi = LIMITS["spacing"]
        if not all(lo <= s <= hi for s in spacing):
            raise ValueError(
                f"CascadeConfig.spacing must lie in [{lo:g}, {hi:g}] mm, got {spacing}"
            )
        _set(self, "spacing", spacing)
        radius = _int(self.radius, "CascadeConfig.radius", minimum=0)
        _set(self, "radius", _at_most(radius, "CascadeConfig.radius", LIMITS["radius"]))
        (threshold,) = _reals((self.body_threshold,), "CascadeConfig.body_threshold", 1, "HU")
        if abs(threshold) > LIMITS["hu"]:
            raise ValueError(
                f"CascadeConfig.body_threshold must lie within ±{LIMITS['hu']:g} HU, "
                f"got {threshold:g}"
            )
        _set(self, "body_threshold", threshold)
        for name in ("stage1", "stage2"):
            stage = getattr(self, name)
            if not isinstance(stage, StageConfig):
                raise TypeError(
                    f"CascadeConfig.{name} must be a StageConfig, got {type(stage).__name__}"
                )
            if stage.architecture.num_classes != len(names):
                raise ValueError(
                    f"CascadeConfig.{name}.architecture.num_classes is "
                    f"{stage.architecture.num_classes} but class_names has {len(names)} "
                    "entries; they must be equal"
                )
        _set(self, "training", _training(self.training))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["training"] is None:
            del data["training"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CascadeConfig:
        """The config ``to_dict`` gave (as read back from JSON); ``ValueError`` naming the
        field that is missing or wrong. Keys this schema does not know are ignored at the
        top level and refused inside a stage."""
        if not isinstance(data, Mapping):
            raise TypeError(f"model config must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"model config has schema_version {version!r}; this fastcascade reads "
                f"version {SCHEMA_VERSION}"
            )

        def stage(name: str) -> StageConfig:
            d = _section(_get(data, name, name), name)
            arch = _section(_get(d, "architecture", f"{name}.architecture"), f"{name}.architecture")
            known = {f.name for f in dataclasses.fields(Architecture)}
            unknown = sorted(set(arch) - known)
            if unknown:
                raise ValueError(
                    f"model config field {name}.architecture has unknown keys {unknown}"
                )
            architecture = _named(f"{name}.architecture", lambda: Architecture(**arch))
            return _named(
                name,
                lambda: StageConfig(
                    window=_get(d, "window", f"{name}.window"),
                    tile=_get(d, "tile", f"{name}.tile"),
                    architecture=architecture,
                ),
            )

        stage1, stage2 = stage("stage1"), stage("stage2")
        fields = {k: _get(data, k, k) for k in ("class_names", "spacing", "radius")}
        fields["body_threshold"] = _get(data, "body_threshold", "body_threshold")
        fields["training"] = data.get("training")
        try:  # the messages name the field (CascadeConfig.<field>)
            return cls(**fields, stage1=stage1, stage2=stage2, schema_version=version)
        except TypeError as e:
            raise ValueError(str(e)) from None


# --------------------------------------------------------------------------- checks


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's own field


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _at_most(value: int, what: str, maximum: int) -> int:
    if value > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {value!r}")
    return value


def _reals(value: object, what: str, count: int, expected: str) -> tuple[float, ...]:
    """``count`` finite real numbers as floats, else an error naming ``what``."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    if len(value) != count:
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    floats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return floats


def _training(value: object) -> dict | None:
    """Training metadata as plain JSON (tuples become lists, keys strings), or None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"CascadeConfig.training must be a JSON object (dict) or None, got {value!r}"
        )
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"CascadeConfig.training must be plain JSON data: {e}") from None


def _get(data: Mapping[str, Any], key: str, path: str) -> Any:
    try:
        return data[key]
    except KeyError:
        raise ValueError(f"model config has no field {path!r}") from None


def _section(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"model config field {path} must be an object, got {value!r}")
    return value


def _named(path: str, build: Callable[[], Any]) -> Any:
    """``build()``, its errors prefixed with the field they come from."""
    try:
        return build()
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config field {path}: {e}") from None
