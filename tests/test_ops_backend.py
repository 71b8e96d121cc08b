"""Choosing a backend (``ops/_backend.py``): what runs where, and what a missing backend
says."""

import pytest
import torch

from fastcascade.ops import _backend

needs_interpreter = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="needs Triton with TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def test_auto_on_cpu_is_torch_even_with_the_interpreter():
    assert _backend.resolve("auto", torch.zeros(1), ("triton", "cudnn", "torch")) == "torch"


@needs_interpreter
def test_named_triton_runs_in_the_interpreter_on_cpu():
    assert _backend.resolve("triton", torch.zeros(1), ("triton", "torch")) == "triton"


def test_named_gpu_backend_on_cpu_says_why():
    with pytest.raises(_backend.BackendUnavailableError, match="needs a CUDA tensor"):
        _backend.resolve("cudnn", torch.zeros(1), ("triton", "cudnn", "torch"))


def test_missing_triton_names_the_install_command(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(_backend.BackendUnavailableError, match="pip install"):
        _backend.resolve("triton", torch.zeros(1), ("triton", "torch"))
    assert _backend.resolve("auto", torch.zeros(1), ("triton", "torch")) == "torch"


def test_resolve_rejects_unknown_names_and_non_tensors():
    with pytest.raises(ValueError, match="backend must be"):
        _backend.resolve("fast", torch.zeros(1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        _backend.resolve("auto", [0.0])


def test_summary_lists_every_probe():
    info = _backend.summary()
    assert {"triton", "triton_interpret", "cuda", "cudnn", "cupy", "cuda_ext"} <= set(info)
