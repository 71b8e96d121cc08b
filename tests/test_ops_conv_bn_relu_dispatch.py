"""Fused conv3d + BatchNorm + ReLU as a module calls it: the CPU and training keep
PyTorch's path, the GPU's dispatch path (providers, fallbacks) on the CPU, and what an
eval-mode call reuses (folded weights, prepared plans) until a change invalidates it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conv_bn_relu_cases import (
    Case,
    expected_ref,
    make_params,
    module_for,
    needs_interpreter,
)

import fastcascade.model.unet3d as unet3d
from fastcascade.model import ConvBNReLU
from fastcascade.ops import _backend
from fastcascade.ops import conv_bn_relu as cbr
from fastcascade.ops.conv_bn_relu import (
    configs,
    conv_bn_relu,
    conv_bn_relu_ref,
    dispatch,
    fallback,
    fold_bn,
    folding,
    kernel,
)


# -- the module: CPU and training keep PyTorch's path ----------------------------------------
@pytest.fixture
def no_fused(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused path must not run here")

    monkeypatch.setattr(unet3d, "conv_bn_relu", fail)


def test_module_eval_on_cpu_keeps_pytorch_path(no_fused):
    case = Case(1, 3, 5, (6, 6, 6), "valid")
    m = module_for(case)
    x, _ = make_params(case)
    y = m(x)
    assert torch.equal(y, F.relu(m.bn(m.conv(x))))


def test_module_training_uses_batch_statistics_not_the_kernel(no_fused):
    case = Case(2, 3, 5, (6, 6, 6), "same")
    m = module_for(case).train()
    before = m.bn.running_mean.clone()
    x, _ = make_params(case)
    y = m(x)
    pre = m.conv(x)
    expected = F.relu(F.batch_norm(pre, None, None, m.bn.weight, m.bn.bias, training=True))
    torch.testing.assert_close(y, expected)
    assert not torch.equal(m.bn.running_mean, before)


def test_public_function_refuses_batch_statistics():
    m = module_for(Case(1, 2, 3, (5, 5, 5), "valid")).train()
    with pytest.raises(ValueError, match="batch statistics"):
        conv_bn_relu(torch.randn(1, 2, 5, 5, 5), m, backend="torch")


@needs_interpreter
def test_folded_weights_cached_and_refolded_when_parameters_change():
    case = Case(1, 4, 6, (5, 5, 5), "valid")
    m = module_for(case)
    first = cbr.folded(m, torch.float32)
    assert cbr.folded(m, torch.float32) is first
    assert cbr.folded(m, torch.float16) is not first
    x, _ = make_params(case)
    with torch.no_grad():
        m.bn.running_mean.add_(0.25)  # in place: bumps the version counter
    refolded = cbr.folded(m, torch.float32)
    assert refolded is not first
    with torch.no_grad():
        y = conv_bn_relu(x, m, backend="triton", input_precision="ieee")
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    m.load_state_dict(module_for(case, seed=1).state_dict())
    assert cbr.folded(m, torch.float32) is not refolded
    with torch.no_grad():
        y = conv_bn_relu(x, m, backend="triton", input_precision="ieee")
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


# -- the GPU's dispatch path on the CPU ------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors take the GPU's dispatch path: every tensor counts as a CUDA tensor with
    cuDNN present and the interpreter off, and ``torch.cudnn_convolution_relu`` is a CPU
    stand-in (conv3d + bias + ReLU) that records the input shape of each call."""
    calls = []

    def cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups):
        calls.append(tuple(x.shape))
        return F.relu(F.conv3d(x, w, b, stride, padding, dilation, groups))

    monkeypatch.setattr(_backend, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(_backend, "cudnn_available", lambda: True)
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", cudnn_convolution_relu)
    monkeypatch.setattr(kernel, "_TABLE_CONFIGS", {})
    monkeypatch.setattr(fallback, "FALLBACKS", {})
    return calls


def _all(provider: str) -> dict:
    return {k: {**v, "provider": provider} for k, v in configs.CONFIGS.items()}


def _raiser(message: str, calls: list, error=RuntimeError):
    def fused(*args, **kwargs):
        calls.append(1)
        raise error(message)

    return fused


NO_ENGINE = "GET was unable to find an engine to execute this computation"


@pytest.fixture
def no_fallbacks(monkeypatch):
    monkeypatch.setattr(fallback, "FALLBACKS", {})


def test_fallback_is_the_folded_conv_and_decided_once_per_shape(no_fallbacks):
    """A fake provider without an engine for the shape: the folded conv3d + ReLU runs,
    the provider is not asked again for that shape, and is asked for another one."""
    case = Case(1, 1, 6, (6, 5, 7), "valid")
    x, params = make_params(case)
    w, b = fold_bn(*params)
    path = fallback.FusedPath("fake", (RuntimeError,), fallback.cudnn_lacks_engine)
    calls = []
    fused = _raiser(NO_ENGINE, calls)
    for _ in range(3):
        y = path.run(x, 6, 0, fused, lambda: (w, b))
        assert torch.equal(y, F.relu(F.conv3d(x, w, b)))
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, conv_bn_relu_ref(x, *params), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    assert fallback.fallbacks() == {
        ("fake", x.shape, 6, torch.float32, x.device, 0): f"RuntimeError: {NO_ENGINE}"
    }
    x2 = torch.cat([x, x])  # another shape: asked again
    path.run(x2, 6, 0, fused, lambda: (w, b))
    path.run(x2, 6, 0, fused, lambda: (w, b))
    assert len(calls) == 2 and len(fallback.fallbacks()) == 2


@pytest.mark.parametrize(
    "error, message",
    [
        (RuntimeError, "CUDA error: an illegal memory access was encountered"),
        (RuntimeError, "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
        (ValueError, NO_ENGINE),  # the right words, the wrong kind of error
    ],
    ids=["illegal-access", "execution-failed", "out-of-memory", "not-a-runtime-error"],
)
def test_other_errors_propagate_and_are_not_remembered(no_fallbacks, error, message):
    x, params = make_params(Case(1, 2, 4, (5, 5, 5), "valid"))
    path = fallback.FusedPath("fake", (RuntimeError,), fallback.cudnn_lacks_engine)
    calls = []
    for attempt in (1, 2):
        with pytest.raises(error, match=message.split(".")[0]):
            path.run(x, 4, 0, _raiser(message, calls, error), lambda: fold_bn(*params))
        assert len(calls) == attempt  # tried again: nothing was cached
    assert fallback.fallbacks() == {}


def test_what_counts_as_a_missing_kernel():
    engine = [
        NO_ENGINE,
        "FIND was unable to find an engine to execute this computation",
        "Unable to find an engine to execute this computation",
    ]
    assert all(fallback.cudnn_lacks_engine(RuntimeError(m)) for m in engine)
    assert not fallback.cudnn_lacks_engine(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"))
    assert not fallback.cudnn_lacks_engine(torch.OutOfMemoryError("CUDA out of memory"))
    resources = "Triton Error [CUDA]: too many resources requested for launch"
    assert fallback.triton_out_of_resources(RuntimeError(resources))
    assert not fallback.triton_out_of_resources(RuntimeError("Triton Error [CUDA]: unknown error"))
    assert not fallback.triton_out_of_resources(RuntimeError(NO_ENGINE))
    if _backend.triton_available():
        from triton.runtime.errors import OutOfResources

        assert fallback.triton_out_of_resources(OutOfResources(262144, 232448, "shared memory"))
        assert OutOfResources in fallback.TRITON.errors


@pytest.mark.parametrize("cin, dtype", [(1, torch.bfloat16), (6, torch.float32)], ids=str)
def test_cudnn_without_an_engine_falls_back_through_the_dispatch(fake_gpu, monkeypatch, cin, dtype):
    """The whole dispatch with cuDNN's fused op raising: conv3d + ReLU with the folded
    weights, cuDNN asked once per shape, through the eager path and the custom op alike."""
    monkeypatch.setattr(configs, "CONFIGS", _all("cudnn"))
    calls = []
    monkeypatch.setattr(torch, "cudnn_convolution_relu", _raiser(NO_ENGINE, calls))
    case = Case(1, cin, 6, (6, 6, 5), "valid")
    m = module_for(case)
    x = make_params(case)[0].to(dtype)
    with torch.no_grad():
        expected = expected_ref(m, x.float())
        w, b = (t.to(dtype) for t in fold_bn(*make_params(case)[1]))
        for _ in range(3):
            y = conv_bn_relu(x, m)
            assert torch.equal(y, F.relu(F.conv3d(x, w, b)))
        assert len(calls) == 1
        y_op = dispatch._cudnn_op(x, w.contiguous(memory_format=torch.channels_last_3d), b, 0)
        assert torch.equal(y_op, y) and len(calls) == 1  # the custom op: the same decision
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)
    assert list(fallback.fallbacks()) == [("cudnn", x.shape, 6, dtype, x.device, 0)]


def test_cudnn_errors_other_than_no_engine_propagate_from_the_dispatch(fake_gpu, monkeypatch):
    monkeypatch.setattr(configs, "CONFIGS", _all("cudnn"))
    calls = []
    message = "CUDA error: an illegal memory access was encountered"
    monkeypatch.setattr(torch, "cudnn_convolution_relu", _raiser(message, calls))
    case = Case(1, 4, 8, (5, 5, 5), "same")
    m, x = module_for(case), make_params(case)[0]
    with torch.no_grad():
        for _ in range(2):
            with pytest.raises(RuntimeError, match="illegal memory access"):
                conv_bn_relu(x, m)
    assert len(calls) == 2 and fallback.fallbacks() == {}


@pytest.mark.skipif(not _backend.triton_available(), reason="needs Triton")
def test_triton_out_of_resources_falls_back_once(fake_gpu, monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(configs, "CONFIGS", _all("triton"))
    calls = []

    def launch(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(kernel, "_launch", launch)
    case = Case(2, 1, 16, (5, 6, 5), "same")  # a shape of the table
    m, (x, params) = module_for(case), make_params(case)
    with torch.no_grad():
        ys = [conv_bn_relu(x, m) for _ in range(3)]
    assert len(calls) == 1 and fake_gpu == []  # neither Triton again nor cuDNN instead
    w, b = fold_bn(*params)
    assert all(torch.equal(y, F.relu(F.conv3d(x, w, b, padding=1))) for y in ys)
    torch.testing.assert_close(ys[0], conv_bn_relu_ref(x, *params, "same"), rtol=1e-5, atol=1e-5)
    assert list(fallback.fallbacks()) == [("triton", x.shape, 16, torch.float32, x.device, 1)]


# -- what an eval-mode call reuses -----------------------------------------------------------
def test_eval_calls_fold_once_and_skip_the_custom_op(fake_gpu, monkeypatch):
    folds = []
    real_fold = folding.fold_bn
    monkeypatch.setattr(folding, "fold_bn", lambda *a: folds.append(1) or real_fold(*a))

    def no_op(*args):
        raise AssertionError("an eager call goes around the custom op")

    monkeypatch.setattr(dispatch, "_cudnn_op", no_op)
    case = Case(1, 3, 5, (6, 6, 6), "valid")
    m, x = module_for(case), make_params(case)[0]
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(conv_bn_relu(x, m), expected_ref(m, x))
        plan = folding.prepared(m)
        assert folding.prepared(m) is plan
    with torch.inference_mode():
        conv_bn_relu(x, m)
    assert len(folds) == 1 and len(fake_gpu) == 5
    assert plan.providers == {("auto", False, torch.float32, "tf32"): (configs.CONFIGS, "cudnn")}


def _replace_weight(m):
    m.conv.weight = torch.nn.Parameter(m.conv.weight.detach() * 0.5)


def _replace_bn(m):
    twin = copy.deepcopy(m.bn)
    with torch.no_grad():
        twin.bias.add_(0.3)
    m.bn = twin


CHANGED = Case(1, 3, 5, (6, 6, 6), "valid")
CHANGES = {
    "weight-in-place": lambda m: m.conv.weight.mul_(2.0),
    "bias-in-place": lambda m: m.conv.bias.add_(0.5),
    "running-var-in-place": lambda m: m.bn.running_var.fill_(4.0),
    "bn-weight-in-place": lambda m: m.bn.weight.mul_(-1.0),
    "weight-data": lambda m: setattr(m.conv.weight, "data", m.conv.weight.data * 3.0),
    "new-parameter": _replace_weight,
    "new-batchnorm": _replace_bn,
    "eps": lambda m: setattr(m.bn, "eps", 0.5),
    "load-state-dict": lambda m: m.load_state_dict(module_for(CHANGED, seed=7).state_dict()),
    "double-then-float": lambda m: m.double().float(),
    "training-forward": lambda m: _train_step(m),
    "swap-on-conversion": lambda m: _swapped(m),
}


def _train_step(m):
    m.train()
    m.bn(m.conv(torch.randn(2, 3, 6, 6, 6)))  # new running statistics
    m.eval()


class PlainBlock(torch.nn.Module):
    """Not a ConvBNReLU (none of its overrides): only the stamp notices changes."""

    def __init__(self, block: ConvBNReLU):
        super().__init__()
        self.conv, self.bn = block.conv, block.bn


def _swapped(m):
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.double()
        with torch.no_grad():
            m.conv.weight.mul_(0.25)
        m.float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


@pytest.mark.parametrize("kind", ["ConvBNReLU", "plain-module"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_the_first_call_changes_the_output(fake_gpu, change, kind):
    m, x = module_for(CHANGED), make_params(CHANGED)[0]
    if kind == "plain-module":
        m = PlainBlock(m).eval()
    with torch.no_grad():
        before = conv_bn_relu(x, m)
        torch.testing.assert_close(before, expected_ref(m, x))
        plan = folding.prepared(m)
        CHANGES[change](m)
        after = conv_bn_relu(x, m)
    torch.testing.assert_close(after, expected_ref(m, x), rtol=1e-5, atol=1e-5)
    if change != "double-then-float":  # the one change that keeps the values
        assert not torch.allclose(after, before)
    assert folding.prepared(m) is not plan


def test_train_mode_invalidates_and_eval_prepares_again(fake_gpu):
    case = Case(1, 2, 4, (5, 5, 5), "same")
    m, x = module_for(case), make_params(case)[0]
    with torch.no_grad():
        conv_bn_relu(x, m)
        m.train()
        with pytest.raises(ValueError, match="batch statistics"):
            conv_bn_relu(x, m)
        m(x)  # training-mode forward: new running statistics
        m.eval()
        torch.testing.assert_close(conv_bn_relu(x, m), expected_ref(m, x))


def test_gradients_wanted_after_a_cached_call_take_pytorchs_path(fake_gpu):
    case = Case(1, 2, 4, (5, 5, 5), "valid")
    m, x = module_for(case), make_params(case)[0]
    with torch.no_grad():
        conv_bn_relu(x, m)
    y = conv_bn_relu(x, m)  # grad mode on, parameters requiring it: PyTorch's path
    assert y.grad_fn is not None and len(fake_gpu) == 1
    m.requires_grad_(False)  # frozen: nothing needs a gradient, the fused path again
    assert conv_bn_relu(x, m).grad_fn is None and len(fake_gpu) == 2


def test_provider_choice_follows_a_replaced_table(fake_gpu, monkeypatch):
    launches = []
    monkeypatch.setattr(kernel, "_launch", lambda *a, **k: launches.append(1) or torch.zeros(1))
    case = Case(1, 16, 32, (5, 5, 5), "valid")  # a shape of the table
    m, x = module_for(case), make_params(case)[0]
    with torch.no_grad():
        monkeypatch.setattr(configs, "CONFIGS", _all("cudnn"))
        conv_bn_relu(x, m)
        monkeypatch.setattr(configs, "CONFIGS", _all("triton"))
        conv_bn_relu(x, m)
    assert (len(fake_gpu), len(launches)) == (1, 1)
