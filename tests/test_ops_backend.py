"""Choosing a backend (``ops/_backend.py``): what runs where, and what a missing backend
says."""

import types

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


def test_next_pow2_is_the_smallest_power_of_two_at_least_n():
    want = {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 16: 16, 17: 32, 1000: 1024, 1024: 1024}
    assert {n: _backend.next_pow2(n) for n in want} == want
    for n in range(1, 300):
        p = _backend.next_pow2(n)
        assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n)


def test_on_device_is_a_no_op_off_cuda(monkeypatch):
    def no_cuda(*_):
        raise AssertionError("on_device touched torch.cuda for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_device", no_cuda)
    for t in (torch.zeros(2), torch.empty(3, device="meta")):
        with _backend.on_device(t):
            pass


def test_on_device_switches_to_the_tensors_cuda_device(monkeypatch):
    # No GPU here: a stand-in tensor on cuda:1 and a recording torch.cuda.device.
    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    with _backend.on_device(on_gpu1):
        assert entered == [torch.device("cuda", 1)]
