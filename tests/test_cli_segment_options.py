"""``fastcascade segment``: a flag for every inference option, each reaching ``segment()``;
``--threads``; the help's examples; and ``fastcascade env``'s per-op backend choices.

``segment()`` is replaced by the fake of ``test_cli.py``, which records its call.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_cli import FakeSegment, ct_file, fake  # noqa: F401  (fixtures)

from fastcascade import cli
from fastcascade.cli import segment_options
from fastcascade.ops import _backend, morphology
from fastcascade.options import (
    HU_CHECKS,
    INFERENCE,
    PRECISIONS,
    WEIGHTS,
    InferenceOptions,
    option_names,
)

#: For each InferenceOptions field: flags that set it away from its default, and the value
#: segment() must receive.
FLAG_CASES = {
    "overlap": (["--no-overlap"], False),
    "overlap_step": (["--overlap-step", "1,0.25,0.5"], (1.0, 0.25, 0.5)),
    "weights": (["--weights", "gaussian"], "gaussian"),
    "skip_empty": (["--no-skip"], False),
    "batch_size": (["--batch-size", "7"], 7),
    "probabilities": (["--probabilities", "{tmp}/p.nii.gz"], True),
    "memory_budget": (["--memory-budget", "4G"], 4 * 2**30),
    "body_mask_backend": (["--body-mask-backend", "torch"], "torch"),
    "precision": (["--precision", "bf16"], "bf16"),
    "compile": (["--compile"], True),
    "inference": (["--inference", "tiles"], "tiles"),
    "hu_check": (["--hu-check", "off"], "off"),
}


def test_every_inference_option_has_a_flag():
    assert sorted(FLAG_CASES) == sorted(option_names())  # a new option needs a flag here
    assert sorted(segment_options.FLAGS) == sorted(option_names())
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    flags = {s for a in sub.choices["segment"]._actions for s in a.option_strings}
    assert set(segment_options.FLAGS.values()) <= flags


@pytest.mark.parametrize("field", sorted(FLAG_CASES))
def test_each_flag_reaches_segment(field, ct_file, fake, tmp_path):  # noqa: F811
    argv, expected = FLAG_CASES[field]
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", str(ct_file), "-o", str(out), "--quiet", *argv]) == 0
    ((_, kwargs),) = fake.calls
    assert kwargs[field] == expected
    assert getattr(InferenceOptions(), field) != expected  # the flag changed something
    defaults = dataclasses.asdict(InferenceOptions())
    others = {k: v for k, v in kwargs.items() if k in defaults and k != field}
    assert others == {k: v for k, v in defaults.items() if k != field}


def test_without_flags_segment_gets_the_defaults(ct_file, fake, tmp_path):  # noqa: F811
    assert cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.nii.gz"), "--quiet"]) == 0
    ((_, kwargs),) = fake.calls
    expected = dataclasses.asdict(InferenceOptions())
    assert {k: kwargs[k] for k in expected} == expected
    InferenceOptions(**{k: kwargs[k] for k in expected})  # valid as they are


def test_strict_is_hu_check_error(ct_file, fake, tmp_path):  # noqa: F811
    assert cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.nii"), "--strict"]) == 0
    assert fake.calls[0][1]["hu_check"] == "error"


def test_choices_are_the_libraries(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for values in (WEIGHTS, INFERENCE, ("auto", *PRECISIONS), morphology.BACKENDS, HU_CHECKS):
        assert "{" + ",".join(values) + "}" in text


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--memory-budget", "4X"], id="budget-unit"),
        pytest.param(["--memory-budget", "0"], id="budget-zero"),
        pytest.param(["--overlap-step", "0.5,0.5"], id="step-2-values"),
        pytest.param(["--overlap-step", "0.5,0,1"], id="step-zero"),
        pytest.param(["--overlap-step", "0.5,1.5,1"], id="step-above-1"),
        pytest.param(["--weights", "linear"], id="weights"),
        pytest.param(["--inference", "patches"], id="inference"),
        pytest.param(["--precision", "tf32"], id="precision"),
        pytest.param(["--body-mask-backend", "opencv"], id="backend"),
        pytest.param(["--threads", "0"], id="threads-0"),
    ],
)
def test_bad_flag_values_are_usage_errors(argv, ct_file, fake, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", str(ct_file), "-o", str(tmp_path / "s.nii"), *argv])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
    assert fake.calls == []


def test_threads_apply_during_segment_only(ct_file, monkeypatch, tmp_path):  # noqa: F811
    seen = []
    real = FakeSegment()

    def segment(volume, **kwargs):
        seen.append(torch.get_num_threads())
        return real(volume, **kwargs)

    import fastcascade

    monkeypatch.setattr(fastcascade, "segment", segment, raising=False)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    argv = ["segment", str(ct_file), "-o", str(tmp_path / "s.nii"), "--quiet"]
    assert cli.main([*argv, "--threads", str(target)]) == 0
    assert seen == [target] and torch.get_num_threads() == before
    assert cli.main([*argv, "--overwrite"]) == 0
    assert seen[-1] == before


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("None", None), ("1.5G", 3 * 2**29)])
def test_memory_budget_takes_auto_none_or_a_size(text, value):
    assert segment_options.memory_size(text) == value


def test_a_bad_memory_budget_says_what_is_expected(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "ct.nii.gz", "--memory-budget", "lots"])
    assert "expected a positive size" in capsys.readouterr().err


def test_marker_records_every_option(ct_file, fake, tmp_path):  # noqa: F811
    import json

    out = tmp_path / "s.nii.gz"
    argv = ["segment", str(ct_file), "-o", str(out), "--quiet", "--overlap-step", "1,1,1"]
    assert cli.main([*argv, "--memory-budget", "512M", "--threads", "1"]) == 0
    marker = json.loads((tmp_path / "s.done.json").read_text())
    assert set(option_names()) <= set(marker["options"])
    assert marker["options"]["overlap_step"] == [1.0, 1.0, 1.0]
    assert marker["options"]["memory_budget"] == 512 * 2**20
    assert marker["threads"] == 1


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    for flag in ("--preview", "--statistics", "--split", "--organs", "--memory-budget 4G"):
        assert flag in text.split("examples:")[1], flag


# -- fastcascade env -----------------------------------------------------------------------
def test_env_names_the_backend_auto_picks_for_every_op(capsys):
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    assert "backend='auto' picks, on cpu:" in text
    lines = text.split("backend='auto' picks")[1].splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(_backend.OPS)
    assert [line.split()[1] for line in lines] == ["torch", "torch", "torch", "scipy", "torch"]
    assert all("no CUDA device" in line for line in lines)


def test_auto_choices_on_the_cpu_are_what_the_ops_pick(monkeypatch):
    from fastcascade.ops import stitch

    choices = _backend.auto_choices(cuda=False)
    assert tuple(choices) == _backend.OPS
    cpu = torch.zeros(2, 2, 2, dtype=torch.bool)
    for op in ("conv-BN-ReLU", "dilation", "warp"):
        assert choices[op][0] == _backend.resolve("auto", cpu) == "torch"
    assert choices["morphology"][0] == morphology.resolve_backend("auto", cpu) == "scipy"
    # stitching on a CPU takes the slice-add loop (accumulate_ref), whatever Triton offers
    calls = []
    monkeypatch.setattr(stitch, "accumulate_ref", lambda *args: calls.append(len(args)))
    tiles, origins = torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 3, dtype=torch.long)
    stitch.accumulate(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 2), tiles, origins)
    assert calls and choices["stitching"] == ("torch", choices["stitching"][1])
    assert "slice-add" in choices["stitching"][1]


def _gpu(monkeypatch, triton=True, cudnn=True, cupy=False, interpret=False):
    monkeypatch.setattr(_backend, "triton_available", lambda: triton)
    monkeypatch.setattr(_backend, "cudnn_available", lambda: cudnn)
    monkeypatch.setattr(_backend, "cupy_available", lambda: cupy)
    monkeypatch.setattr(_backend, "interpreter_on", lambda: interpret)
    return _backend.auto_choices(cuda=True)


def test_auto_choices_on_a_gpu_follow_the_probes(monkeypatch):
    from fastcascade.ops.conv_bn_relu import configs

    full = _gpu(monkeypatch, cupy=True)
    assert {op: b for op, (b, _) in full.items()} == {
        "conv-BN-ReLU": "triton|cudnn",
        "dilation": "triton",
        "stitching": "triton",
        "morphology": "cupy",
        "warp": "triton",
    }
    providers = [e["provider"] for e in configs.CONFIGS.values()]
    assert f"{providers.count('cudnn')} cudnn" in full["conv-BN-ReLU"][1]

    bare = _gpu(monkeypatch, triton=False, cudnn=True, cupy=False)
    assert bare["conv-BN-ReLU"][0] == "cudnn" and "Triton not installed" in bare["conv-BN-ReLU"][1]
    assert [bare[op][0] for op in ("dilation", "stitching", "morphology", "warp")] == ["torch"] * 4
    assert "CuPy not installed" in bare["morphology"][1]

    interpreted = _gpu(monkeypatch, triton=True, cudnn=False, interpret=True)
    assert interpreted["conv-BN-ReLU"][0] == "torch"
    assert all("TRITON_INTERPRET=1" in interpreted[op][1] for op in ("dilation", "warp"))


def test_env_choice_for_triton_matches_resolve_on_a_cuda_like_tensor(monkeypatch):
    """``resolve`` with the same probes: for a CUDA tensor it takes Triton first, and never
    the interpreter."""
    tensor = torch.zeros(1)
    monkeypatch.setattr(_backend, "on_cuda", lambda t: True)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    assert _backend.resolve("auto", tensor) == "triton"
    monkeypatch.setattr(_backend, "interpreter_on", lambda: True)
    assert _backend.resolve("auto", tensor) == "torch"
    assert np.all([c[0] != "triton" for c in _gpu(monkeypatch, interpret=True).values()])
