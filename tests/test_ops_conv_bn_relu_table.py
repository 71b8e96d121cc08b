"""The committed tuning table of the fused conv-BN-ReLU as data (``table.json``): what
the package loads from it, that the writer reproduces the committed file byte for byte,
that a malformed file is refused with a message naming it, that it covers every layer
of the U-Net with valid entries, and the interpreter's one fixed configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conv_bn_relu_cases import needs_interpreter, unet_layer_shapes

from fastcascade.ops import conv_bn_relu as cbr
from fastcascade.ops.conv_bn_relu import configs


def test_package_loads_the_committed_file():
    assert configs.TABLE_PATH.name == "table.json" and configs.TABLE_PATH.is_file()
    assert configs.TABLE_PATH.parent == Path(cbr.__file__).parent  # package data
    loaded, tuned_on = configs.load_table(configs.TABLE_PATH)
    assert loaded == configs.CONFIGS and tuned_on == configs.TUNED_ON
    assert cbr.CONFIGS is configs.CONFIGS and cbr.TUNED_ON == configs.TUNED_ON
    assert tuned_on is None or isinstance(tuned_on, str)
    for entry in loaded.values():
        assert tuple(entry) == configs.FIELDS  # the fields, in the writer's order


def test_committed_file_is_in_the_writers_form():
    """A tuning run rewrites the file: unchanged entries must give unchanged lines."""
    text = configs.TABLE_PATH.read_text()
    assert configs.dump_table(configs.CONFIGS, configs.TUNED_ON) == text
    assert len(text.splitlines()) == len(configs.CONFIGS) + 5  # one entry a line


def test_dump_then_load_round_trips(tmp_path):
    table = {k: dict(v) for k, v in configs.CONFIGS.items()}
    cin, cout = next(iter(table))
    table[(cin, cout)].update(provider="triton", BLOCK_M=256, num_stages=4, tuned=True)
    table[(3, 5)] = {**configs.default_config(3, 5), "extra": "not written"}
    path = tmp_path / "table.json"
    path.write_text(configs.dump_table(table, "NVIDIA H200, 2026-01-01, torch 2.13.0"))
    loaded, tuned_on = configs.load_table(path)
    assert tuned_on == "NVIDIA H200, 2026-01-01, torch 2.13.0"
    assert list(loaded) == sorted(table)  # sorted by shape, whatever the input order
    assert loaded[(cin, cout)] == table[(cin, cout)]
    assert loaded[(3, 5)] == configs.default_config(3, 5)
    assert json.loads(path.read_text())["configs"][0] == {
        "in_channels": 1,
        "out_channels": 8,
        **loaded[(1, 8)],
    }
    # The same table in another insertion order gives the same text.
    shuffled = dict(reversed(list(table.items())))
    assert configs.dump_table(shuffled, tuned_on) == path.read_text()


def _entry(cin=16, cout=32, **change):
    return {"in_channels": cin, "out_channels": cout, **configs.default_config(cin, cout), **change}


@pytest.mark.parametrize(
    "data, match",
    [
        ([_entry()], "expected an object with 'tuned_on' and 'configs'"),
        ({"configs": [_entry()]}, "expected an object with 'tuned_on' and 'configs'"),
        ({"tuned_on": None, "configs": [{"in_channels": 16}]}, "entry 0 must have the keys"),
        ({"tuned_on": None, "configs": [_entry(), _entry(spare=1)]}, "entry 1 must have"),
        ({"tuned_on": None, "configs": [_entry(), _entry()]}, r"\(16, 32\) appears twice"),
    ],
    ids=["list", "no-tuned-on", "missing-fields", "extra-field", "duplicate"],
)
def test_malformed_table_is_refused_naming_the_file(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as info:
        configs.load_table(path)
    assert str(path) in str(info.value)


# -- the committed configuration table -------------------------------------------------------
@pytest.mark.parametrize("base", [8, 16, 32], ids=lambda b: f"base{b}")
def test_table_covers_every_unet_layer(base):
    missing = unet_layer_shapes(base) - set(cbr.CONFIGS)
    assert not missing, f"layer shapes without a committed configuration: {sorted(missing)}"


def test_table_entries_are_valid():
    for (cin, cout), cfg in cbr.CONFIGS.items():
        assert cfg["provider"] in ("triton", "cudnn"), (cin, cout)
        assert isinstance(cfg["tuned"], bool)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (cin, cout, key)
        assert cfg["num_warps"] in (1, 2, 4, 8, 16) and 1 <= cfg["num_stages"] <= 6
        assert cfg["BLOCK_N"] <= max(32, 2 * cout)  # no block much wider than the layer


@needs_interpreter
def test_interpreter_uses_one_fixed_config():
    for cin, cout in [(1, 32), (768, 256)]:
        assert cbr.kernel_config(cin, cout, torch.bfloat16) == cbr.INTERPRETER_CONFIG
