"""InferenceOptions: built once from an object or a mapping plus overrides, checked once,
and every field reachable from segment()."""

import dataclasses

import numpy as np
import pytest
import torch
from test_cascade import tiny_predictor

import fastcascade
from fastcascade import cascade
from fastcascade.options import InferenceOptions, build_options, option_names


def test_overrides_apply_on_top_of_the_base():
    base = InferenceOptions(batch_size=4, weights="gaussian")
    built = build_options(None, {"overlap": False}, base)
    assert (built.batch_size, built.weights, built.overlap) == (4, "gaussian", False)
    assert build_options({"batch_size": 3}, {}, base).weights == "gaussian"
    assert build_options(InferenceOptions(), {"batch_size": 5}, base).weights == "constant"
    assert build_options(base, {}, None) is base  # nothing to change: the same object


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown inference option\(s\) \['overlapp'\].*overlap"):
        build_options(None, {"overlapp": True})
    with pytest.raises(TypeError, match="options must be an InferenceOptions"):
        build_options(42, {})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"weights": "linear"}, "weights must be one of"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"memory_budget": -1}, "memory_budget must be 'auto', a positive number of bytes"),
        ({"memory_budget": "4G"}, "memory_budget must be 'auto', a positive number of bytes"),
        ({"overlap_step": (0.5, 0.5)}, "overlap_step must be 3 fractions"),
        ({"overlap_step": (0.0, 0.5, 1.0)}, "overlap_step must be 3 fractions"),
        ({"body_mask_backend": "opencv"}, "body_mask_backend must be one of"),
        ({"precision": "int8"}, "precision must be one of"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_values_are_refused_when_built(change, match):
    with pytest.raises(ValueError, match=match):
        InferenceOptions().replace(**change)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        InferenceOptions().overlap = False


def test_every_option_reaches_the_cascade_unchanged(monkeypatch):
    """segment(**overrides) builds one object and hands that very object to the stages."""
    seen = []
    real = cascade.run_cascade

    def spy(image, s1, s2, config, options, *args, **kwargs):
        seen.append(options)
        return real(image, s1, s2, config, options, *args, **kwargs)

    monkeypatch.setattr(cascade, "run_cascade", spy)
    predictor = tiny_predictor()
    ct = np.full((20, 20, 20), -1000.0, np.float32)
    ct[4:16, 4:16, 4:16] = 40.0
    chosen = {
        "overlap": False,
        "overlap_step": (1.0, 0.5, 1.0),
        "weights": "gaussian",
        "skip_empty": False,
        "batch_size": 3,
        "probabilities": True,
        "memory_budget": 10**9,
        "body_mask_backend": "torch",
        "precision": "fp32",
        "compile": False,
        "inference": "tiles",
        "hu_check": "error",
    }
    assert sorted(chosen) == sorted(option_names())  # a new option must be added here
    result = fastcascade.segment(ct, spacing=(6.0, 6.0, 6.0), model=predictor, **chosen)
    assert seen == [InferenceOptions(**chosen)]
    assert result.probabilities is not None
    given = InferenceOptions(batch_size=1)
    predictor.segment(torch.from_numpy(ct), given, spacing=(6.0, 6.0, 6.0))
    assert seen[-1] is given


def test_predictor_holds_its_default_options():
    predictor = tiny_predictor()
    assert predictor.options == InferenceOptions()
    predictor.compile = True
    assert predictor.options.compile and predictor.compile
    assert predictor.precision == "fp32"


# -- precision="auto" --------------------------------------------------------------------------
def test_auto_precision_is_the_default_and_resolves_per_device(monkeypatch):
    import inspect

    from fastcascade.api import Predictor, load_model

    assert InferenceOptions().precision == "auto"
    assert inspect.signature(load_model).parameters["precision"].default == "auto"
    assert inspect.signature(Predictor).parameters["precision"].default == "auto"
    auto = InferenceOptions()
    assert auto.autocast_dtype_for("cpu") is None
    assert auto.autocast_dtype_for(torch.device("meta")) is None
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    assert auto.autocast_dtype_for("cuda") is torch.bfloat16
    assert auto.autocast_dtype_for(torch.device("cuda", 1)) is torch.bfloat16
    capability["now"] = (7, 5)  # no native bf16 (and no bf16 convolution engines): fp32
    assert auto.autocast_dtype_for("cuda") is None
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        fixed = InferenceOptions(precision=name)
        assert fixed.autocast_dtype == dtype
        assert fixed.autocast_dtype_for("cpu") == dtype == fixed.autocast_dtype_for("cuda")
    with pytest.raises(ValueError, match="depends on the device"):
        auto.autocast_dtype  # noqa: B018
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32'"):
        InferenceOptions(precision="tf32")


def _ct():
    ct = np.full((20, 20, 20), -1000.0, np.float32)
    ct[4:16, 4:16, 4:16] = 40.0
    ct[8:12, 6:10, 5:15] = 300.0
    return ct


def test_auto_precision_on_the_cpu_is_bit_identical_to_fp32():
    predictor = tiny_predictor()
    assert predictor.precision == "fp32"  # "auto", resolved on the predictor's CPU
    runs = {
        p: predictor.segment(_ct(), spacing=(6.0, 6.0, 6.0), probabilities=True, precision=p)
        for p in ("auto", "fp32")
    }
    assert np.array_equal(runs["auto"].labels, runs["fp32"].labels)
    assert np.array_equal(runs["auto"].probabilities, runs["fp32"].probabilities)


def test_probabilities_are_averaged_in_fp32_under_half_precision():
    """bf16 autocast (on the CPU here): the networks' output is cast to fp32 before the
    softmax (tiling.py) and stitched into fp32 accumulators (ops/stitch.py)."""
    predictor = tiny_predictor()
    result = predictor.segment(_ct(), spacing=(6.0, 6.0, 6.0), probabilities=True, precision="bf16")
    assert result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
