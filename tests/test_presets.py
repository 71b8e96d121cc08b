"""Presets: the shipped model's recipe, the paper's configuration, dataset label maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import fastcascade
from fastcascade.config import CLASS_NAMES, CascadeConfig
from fastcascade.model.checkpoint import FORMAT, load_config
from fastcascade.presets import (
    CASE_A_TO_CLASSES,
    LABEL_MAPS,
    PAPER_CLASS_NAMES,
    default_config,
    paper_config,
    read_label_map,
)

SHIPPED_JSON = Path(fastcascade.__file__).parent / "weights" / "default.json"


def test_default_config_reproduces_the_shipped_json_exactly():
    """What ``save_cascade`` would write for ``default_config()``, byte for byte, once the
    shipped file's ``training`` record (how its weights were made) is set aside."""
    shipped = json.loads(SHIPPED_JSON.read_text())
    training = shipped.pop("training")
    assert {"source", "iterations", "dice", "phantom_seeds"} <= set(training)
    text = json.dumps({"format": FORMAT, **default_config().to_dict()}, indent=2) + "\n"
    assert text == json.dumps(shipped, indent=2) + "\n"
    assert dataclasses.replace(load_config(SHIPPED_JSON), training=None) == default_config()
    assert default_config().stage1.architecture.base_channels == 6


def test_train_command_defaults_are_the_shipped_recipe():
    from fastcascade.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "runs/x"])
    built = default_config(args.base_channels, args.levels, args.padding, args.spacing, args.tile)
    assert built == default_config()


def test_default_config_arguments():
    config = default_config(base_channels=2, levels=2, spacing=6.0, tile=24, class_names="abc")
    assert config.class_names == ("a", "b", "c")
    assert config.spacing == (6.0, 6.0, 6.0)
    for stage in (config.stage1, config.stage2):
        assert stage.tile == (24, 24, 24)
        assert stage.architecture.num_classes == 3 and stage.architecture.base_channels == 2
    assert config.stage1.window == (-1000.0, 1000.0) and config.stage2.window == (-200.0, 400.0)


def test_paper_config():
    config = paper_config()
    assert config.class_names == PAPER_CLASS_NAMES and config.num_classes == 8
    arch = config.stage1.architecture
    assert (arch.base_channels, arch.levels, arch.padding, arch.num_classes) == (32, 4, "valid", 8)
    assert config.stage1.tile == (132, 132, 116) and config.spacing == (1.5, 1.5, 1.5)
    assert config.stage2.window == (-200.0, 400.0) and config.radius == 3
    ours = paper_config(CLASS_NAMES)
    assert ours.num_classes == len(CLASS_NAMES)
    assert ours.stage2.architecture.num_classes == len(CLASS_NAMES)
    assert isinstance(ours, CascadeConfig)


def test_case_a_map_targets_every_organ_once():
    assert LABEL_MAPS["case_a"] is CASE_A_TO_CLASSES
    assert sorted(CASE_A_TO_CLASSES.values()) == list(range(1, len(CLASS_NAMES)))


def test_read_label_map_names_files_and_errors(tmp_path):
    got = read_label_map("case_a")
    assert got == CASE_A_TO_CLASSES and got is not CASE_A_TO_CLASSES  # a copy
    assert read_label_map(None) is None and read_label_map("none") is None
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"7": 1, "14": 2}))
    assert read_label_map(str(path)) == {7: 1, 14: 2}
    with pytest.raises(ValueError, match=r"^label map must be one of \['case_a'\], 'none'"):
        read_label_map("case_b")
    with pytest.raises(ValueError, match=r"^--label-map must be one of"):
        read_label_map("case_b", "--label-map")
    path.write_text(json.dumps({"seven": 1}))
    with pytest.raises(ValueError, match="JSON object of integer ids"):
        read_label_map(str(path))
