"""``CascadeConfig`` and its parts: valid defaults, checks that name the field, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fastcascade.config import CLASS_NAMES, Architecture, CascadeConfig, StageConfig


def test_defaults_are_valid_and_agree_on_the_class_count():
    config = CascadeConfig()
    assert config.class_names == CLASS_NAMES
    assert config.num_classes == len(CLASS_NAMES)
    assert config.stage1.architecture.num_classes == len(CLASS_NAMES)
    assert config.stage2.architecture.num_classes == len(CLASS_NAMES)
    assert Architecture().num_classes == len(CLASS_NAMES)


def test_round_trip_through_json():
    arch = Architecture(num_classes=3, base_channels=4, levels=2, padding="same")
    config = CascadeConfig(
        class_names=("bg", "a", "b"),
        spacing=(2.0, 2.5, 3.0),
        radius=0,
        stage1=StageConfig(tile=(16, 16, 8), architecture=arch),
        stage2=StageConfig(window=(-200.0, 400.0), tile=(16, 16, 8), architecture=arch),
    )
    back = CascadeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert back.to_dict() == config.to_dict()


def test_sequences_and_numbers_are_normalised():
    arch = Architecture(num_classes=np.int64(2), levels=np.int32(2))
    config = CascadeConfig(
        class_names=["bg", "x"],
        spacing=[3, 3, np.float32(4.0)],
        radius=np.int64(2),
        body_threshold=-300,
        stage1=StageConfig(window=[-1000, 1000], tile=[8, 8, np.int64(8)], architecture=arch),
        stage2=StageConfig(architecture=arch),
    )
    assert config.class_names == ("bg", "x")
    assert config.spacing == (3.0, 3.0, 4.0) and all(type(s) is float for s in config.spacing)
    assert type(config.radius) is int and config.radius == 2
    assert type(config.body_threshold) is float
    assert config.stage1.window == (-1000.0, 1000.0) and config.stage1.tile == (8, 8, 8)
    assert all(type(t) is int for t in config.stage1.tile)
    assert type(arch.num_classes) is int and type(arch.levels) is int
    hash(config)  # frozen and made of tuples


ARCH2 = Architecture(num_classes=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"class_names": ()}, ValueError, "class_names is empty", id="no-names"),
        pytest.param({"class_names": "ab"}, TypeError, "class_names", id="names-string"),
        pytest.param({"class_names": ("bg", 1)}, TypeError, "class_names", id="names-not-str"),
        pytest.param({"class_names": ("bg", "")}, TypeError, "class_names", id="names-empty-str"),
        pytest.param(
            {"class_names": ("bg", "bg")}, ValueError, r"unique; repeated: \['bg'\]", id="dupes"
        ),
        pytest.param(
            {"class_names": ("bg", "x", "y")},
            ValueError,
            r"stage1\.architecture\.num_classes is 2 but class_names has 3",
            id="num-classes",
        ),
        pytest.param({"spacing": (1.0, 1.0)}, ValueError, "spacing", id="spacing-2"),
        pytest.param({"spacing": (1.0, 0.0, 1.0)}, ValueError, "spacing", id="spacing-0"),
        pytest.param({"spacing": (1.0, -1.0, 1.0)}, ValueError, "spacing", id="spacing-neg"),
        pytest.param({"spacing": (1.0, math.nan, 1.0)}, ValueError, "spacing", id="spacing-nan"),
        pytest.param({"spacing": (1.0, math.inf, 1.0)}, ValueError, "spacing", id="spacing-inf"),
        pytest.param({"spacing": (1.0, "1", 1.0)}, TypeError, "spacing", id="spacing-text"),
        pytest.param({"radius": -1}, ValueError, r"radius must be an integer >= 0", id="r-neg"),
        pytest.param({"radius": 1.5}, TypeError, "radius", id="r-float"),
        pytest.param({"radius": True}, TypeError, "radius", id="r-bool"),
        pytest.param({"body_threshold": math.nan}, ValueError, "body_threshold", id="thr-nan"),
        pytest.param({"body_threshold": "-300"}, TypeError, "body_threshold", id="thr-text"),
        pytest.param({"stage2": "default"}, TypeError, "stage2 must be a StageConfig", id="stage"),
    ],
)
def test_cascade_config_checks_name_the_field(kwargs, error, match):
    base = {"class_names": ("bg", "x"), "stage1": StageConfig(architecture=ARCH2)}
    base["stage2"] = StageConfig(architecture=ARCH2)
    with pytest.raises(error, match=match):
        CascadeConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            {"window": (400.0, -200.0)}, ValueError, "window must have lo < hi", id="lohi"
        ),
        pytest.param({"window": (0.0, 0.0)}, ValueError, "window", id="lo-eq-hi"),
        pytest.param({"window": (-math.inf, 0.0)}, ValueError, "window", id="window-inf"),
        pytest.param({"window": (0.0,)}, ValueError, "window", id="window-1"),
        pytest.param({"tile": (8, 8)}, ValueError, "tile", id="tile-2"),
        pytest.param({"tile": (8, 0, 8)}, ValueError, r"tile must be an integer >= 1", id="t0"),
        pytest.param({"tile": (8, 8.0, 8)}, TypeError, "tile", id="tile-float"),
        pytest.param({"architecture": {}}, TypeError, "architecture", id="arch-dict"),
    ],
)
def test_stage_config_checks_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=f"StageConfig.{match}"):
        StageConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"levels": 0}, ValueError, "levels", id="levels-0"),
        pytest.param({"base_channels": 0}, ValueError, "base_channels", id="base-0"),
        pytest.param({"in_channels": 0}, ValueError, "in_channels", id="in-0"),
        pytest.param({"num_classes": 0}, ValueError, "num_classes", id="classes-0"),
        pytest.param({"levels": 2.0}, TypeError, "levels", id="levels-float"),
        pytest.param({"padding": "full"}, ValueError, "padding must be 'valid' or 'same'", id="p"),
    ],
)
def test_architecture_checks_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=f"Architecture.{match}"):
        Architecture(**kwargs)


def test_replace_is_checked_too():
    config = CascadeConfig()
    with pytest.raises(ValueError, match="radius"):
        dataclasses.replace(config, radius=-2)


def _edited(edit) -> dict:
    data = json.loads(json.dumps(CascadeConfig().to_dict()))
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, match",
    [
        pytest.param(lambda d: d.pop("radius"), "no field 'radius'", id="missing-radius"),
        pytest.param(
            lambda d: d["stage2"].pop("window"), r"no field 'stage2\.window'", id="missing-window"
        ),
        pytest.param(
            lambda d: d["stage1"].pop("architecture"),
            r"no field 'stage1\.architecture'",
            id="missing-arch",
        ),
        pytest.param(
            lambda d: d["stage1"]["architecture"].update(levels=0),
            r"stage1\.architecture: Architecture\.levels",
            id="bad-levels",
        ),
        pytest.param(
            lambda d: d["stage2"]["architecture"].update(width=3),
            r"stage2\.architecture has unknown keys \['width'\]",
            id="unknown-arch-key",
        ),
        pytest.param(
            lambda d: d["stage2"].update(tile=[64, 64]), r"stage2: StageConfig\.tile", id="tile"
        ),
        pytest.param(lambda d: d.update(stage1=[1]), "stage1 must be an object", id="stage-list"),
        pytest.param(lambda d: d.update(spacing="3"), r"CascadeConfig\.spacing", id="spacing"),
        pytest.param(lambda d: d.update(class_names="ab"), "class_names", id="names-string"),
        pytest.param(
            lambda d: d.update(class_names=d["class_names"][:8]),
            r"stage1\.architecture\.num_classes is 11 but class_names has 8",
            id="class-count",
        ),
        pytest.param(lambda d: d.update(schema_version=2), "schema_version 2", id="version"),
    ],
)
def test_from_dict_names_the_bad_field(edit, match):
    with pytest.raises(ValueError, match=match):
        CascadeConfig.from_dict(_edited(edit))


def test_from_dict_ignores_unknown_top_level_keys():
    data = _edited(lambda d: d.update(note="trained on phantoms"))
    assert CascadeConfig.from_dict(data) == CascadeConfig()


def test_training_metadata_round_trips_and_stays_out_of_old_files():
    record = {"sources": {"synth": {"weight": 2, "cases": ("case_a",)}}, "cut_margin": 3}
    config = CascadeConfig(training=record)
    assert config.training == {"sources": {"synth": {"weight": 2, "cases": ["case_a"]}},
                               "cut_margin": 3}  # fmt: skip
    back = CascadeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.training == config.training
    assert hash(config) == hash(CascadeConfig())  # metadata is not part of the hash
    assert config != CascadeConfig()
    # None is not written, and a file without the field reads as None
    assert "training" not in CascadeConfig().to_dict()
    assert CascadeConfig.from_dict(_edited(lambda d: None)).training is None


@pytest.mark.parametrize(
    "value, error",
    [(["a"], TypeError), ({"x": float("nan")}, ValueError), ({"x": object()}, ValueError)],
    ids=["list", "nan", "object"],
)
def test_training_metadata_must_be_plain_json(value, error):
    with pytest.raises(error, match="CascadeConfig.training"):
        CascadeConfig(training=value)
    with pytest.raises(ValueError, match="CascadeConfig.training"):
        CascadeConfig.from_dict(_edited(lambda d: d.update(training=value)))
