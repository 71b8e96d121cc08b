"""Fused conv3d + BatchNorm + ReLU: the Triton kernel (interpreter on the CPU) against the
PyTorch reference, the reference against a naive unfold/einsum oracle, BatchNorm folding,
the module's dispatch, the backend choice, and (``-m gpu``) the real thing on a GPU."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fastcascade.model.unet3d as unet3d
from fastcascade.config import CLASS_NAMES
from fastcascade.model import ConvBNReLU, UNet3D
from fastcascade.ops import _backend
from fastcascade.ops import conv_bn_relu as cbr
from fastcascade.ops.conv_bn_relu import (
    FoldedConv,
    configs,
    conv_bn_relu,
    conv_bn_relu_ref,
    dispatch,
    fallback,
    fold_bn,
    folding,
    kernel,
    pack_weight,
    unpack_weight,
)

needs_interpreter = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.interpreter_on()),
    reason="needs Triton with TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


# -- helpers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    batch: int
    cin: int
    cout: int
    size: tuple[int, int, int]
    padding: str

    def __str__(self) -> str:
        x, y, z = self.size
        return f"b{self.batch}-cin{self.cin}-cout{self.cout}-{x}x{y}x{z}-{self.padding}"


# Tiny on purpose (the interpreter runs programs one by one); each row hits one awkward
# corner: C_in = 1 and 3 (flattened-K path), channel counts off multiples of 16, an even
# channel count (no channel mask), batch 2, more voxels than one BLOCK_M (686 > 512), more
# output channels than one BLOCK_N (72 > 64), odd sizes, both paddings.
CASES = [
    Case(1, 1, 8, (7, 6, 5), "valid"),
    Case(2, 3, 12, (5, 7, 6), "same"),
    Case(2, 20, 24, (7, 7, 7), "valid"),
    Case(1, 17, 72, (6, 5, 7), "same"),
    Case(1, 32, 16, (5, 5, 5), "same"),
    Case(1, 5, 3, (3, 4, 3), "valid"),
]


def make_params(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cin, cout = case.cin, case.cout
    x = torch.randn(case.batch, cin, *case.size, generator=g)
    w = torch.randn(cout, cin, 3, 3, 3, generator=g) / math.sqrt(27 * cin)
    b = torch.randn(cout, generator=g) * 0.1
    gamma = torch.rand(cout, generator=g) + 0.5
    beta = torch.randn(cout, generator=g) * 0.1
    mean = torch.randn(cout, generator=g) * 0.1
    var = torch.rand(cout, generator=g) + 0.5
    return x, (w, b, gamma, beta, mean, var, 1e-5)


def naive_conv_bn_relu(x, w, b, gamma, beta, mean, var, eps, padding):
    """Independent oracle in float64: explicit patches and an einsum, BN by its formula."""
    x = x.double()
    if padding == "same":
        x = F.pad(x, (1, 1, 1, 1, 1, 1))
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # N C X' Y' Z' 3 3 3
    y = torch.einsum("ncxyzijk,ocijk->noxyz", patches, w.double())
    per_channel = lambda t: t.double().view(1, -1, 1, 1, 1)  # noqa: E731
    y = (y + per_channel(b) - per_channel(mean)) / torch.sqrt(per_channel(var) + eps)
    return (y * per_channel(gamma) + per_channel(beta)).clamp_min(0)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so a voxel the kernel skips fails."""
    empty = kernel._empty_channels_last

    def poisoned(shape, like):
        return empty(shape, like).fill_(float("nan"))

    monkeypatch.setattr(kernel, "_empty_channels_last", poisoned)


def module_for(case: Case, seed: int = 0) -> ConvBNReLU:
    _, (w, b, gamma, beta, mean, var, _eps) = make_params(case, seed)
    m = ConvBNReLU(case.cin, case.cout, case.padding)
    with torch.no_grad():
        m.conv.weight.copy_(w)
        m.conv.bias.copy_(b)
        m.bn.weight.copy_(gamma)
        m.bn.bias.copy_(beta)
        m.bn.running_mean.copy_(mean)
        m.bn.running_var.copy_(var)
    return m.eval()


# -- the reference against an independent oracle ------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive_oracle(case):
    x, params = make_params(case)
    ref = conv_bn_relu_ref(x.double(), *(p.double() for p in params[:6]), params[6], case.padding)
    oracle = naive_conv_bn_relu(x, *params, case.padding)
    assert ref.shape == oracle.shape
    torch.testing.assert_close(ref, oracle, rtol=1e-12, atol=1e-12)
    assert (oracle > 0).any() and (oracle == 0).any()  # the ReLU did something both ways


# -- the kernel (interpreter) against the reference ----------------------------------------
@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_fp32_exact_matches_reference(case, nan_outputs):
    x, params = make_params(case)
    w, b = fold_bn(*params)
    y = conv_bn_relu(x, (w, b), case.padding, backend="triton", input_precision="ieee")
    ref = conv_bn_relu_ref(x, *params[:6], params[6], case.padding)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert not y.isnan().any()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_kernel_fp16_error_within_twice_pytorchs(case, nan_outputs):
    x, params = make_params(case)
    w, b = fold_bn(*params)
    ref = conv_bn_relu_ref(x.double(), *(p.double() for p in params[:6]), params[6], case.padding)
    y = conv_bn_relu(x.half(), (w, b), case.padding, backend="triton")
    assert y.dtype == torch.float16 and not y.isnan().any()
    pad = 1 if case.padding == "same" else 0
    torch_half = F.relu(F.conv3d(x.half(), w.half(), b.half(), padding=pad))
    ours = (y.double() - ref).abs().max().item()
    theirs = (torch_half.double() - ref).abs().max().item()
    # Floor: one fp16 rounding of the largest output, for when PyTorch happens to be exact.
    assert ours <= max(2 * theirs, 2**-10 * ref.abs().max().item()), (ours, theirs)


@needs_interpreter
def test_kernel_tf32_mode_and_strided_input(nan_outputs):
    """tf32 mode runs (the interpreter multiplies exactly; GPUs round inputs to tf32),
    and a channels-last *view* with odd spatial strides is read through its strides."""
    case = Case(1, 16, 20, (6, 7, 8), "valid")
    x, params = make_params(case)
    big = torch.randn(1, 16, 6, 7, 11).contiguous(memory_format=torch.channels_last_3d)
    big[..., 2:10] = x
    view = big[..., 2:10]
    assert view.stride(1) == 1 and not view.is_contiguous(memory_format=torch.channels_last_3d)
    w, b = fold_bn(*params)
    y = conv_bn_relu(view, (w, b), "valid", backend="triton", input_precision="tf32")
    ref = conv_bn_relu_ref(x, *params[:6], params[6], "valid")
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)


@needs_interpreter
def test_module_through_kernel_matches_pytorch_module(nan_outputs):
    case = Case(2, 6, 10, (5, 6, 7), "same")
    m = module_for(case)
    x, _ = make_params(case)
    with torch.no_grad():
        y = conv_bn_relu(x, m, backend="triton", input_precision="ieee")
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_named_fast_backend_refuses_when_gradients_are_needed():
    case = Case(1, 2, 4, (5, 5, 5), "valid")
    m = module_for(case)  # parameters require grad, grad mode is on
    x, _ = make_params(case)
    with pytest.raises(ValueError, match="does not propagate gradients"):
        conv_bn_relu(x, m, backend="triton")
    # "auto" keeps PyTorch's path there, so gradients reach the convolution.
    conv_bn_relu(x, m).sum().backward()
    assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0


@needs_interpreter
def test_small_network_through_the_kernel_matches_pytorch(monkeypatch, nan_outputs):
    """Channels-last kernel outputs flow through max-pooling, crops, concatenation and
    up-convolutions of a whole (tiny) U-Net exactly as PyTorch's outputs do."""
    torch.manual_seed(0)
    net = UNet3D(num_classes=3, base_channels=2, levels=2).eval()
    x = torch.randn(1, 1, 18, 18, 18)
    with torch.no_grad():
        ref = net(x)
        fused = lambda self, t: conv_bn_relu(t, self, backend="triton", input_precision="ieee")  # noqa: E731
        monkeypatch.setattr(ConvBNReLU, "forward", fused)
        y = net(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# -- BatchNorm folding --------------------------------------------------------------------
def test_fold_identity_batchnorm_is_bit_exact():
    w = torch.randn(6, 4, 3, 3, 3)
    b = torch.randn(6)
    wf, bf = fold_bn(w, b, torch.ones(6), torch.zeros(6), torch.zeros(6), torch.ones(6), 0.0)
    assert torch.equal(wf, w) and torch.equal(bf, b)


def test_fold_matches_float64_formula_exactly():
    _, (w, b, gamma, beta, mean, var, eps) = make_params(Case(1, 5, 7, (3, 3, 3), "valid"))
    wf, bf = fold_bn(w, b, gamma, beta, mean, var, eps)
    scale = gamma.double() / torch.sqrt(var.double() + eps)
    assert wf.dtype == w.dtype and bf.dtype == w.dtype
    assert torch.equal(wf, (w.double() * scale.view(-1, 1, 1, 1, 1)).float())
    assert torch.equal(bf, ((b.double() - mean.double()) * scale + beta.double()).float())


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_folded_convolution_equals_conv_then_batchnorm(padding):
    case = Case(2, 4, 6, (6, 5, 4), padding)
    x, params = make_params(case)
    wf, bf = fold_bn(*(p.double() for p in params[:6]), params[6])
    y = F.relu(F.conv3d(x.double(), wf, bf, padding=1 if padding == "same" else 0))
    torch.testing.assert_close(y, naive_conv_bn_relu(x, *params, padding), rtol=1e-12, atol=1e-12)


def test_fold_without_bias_or_affine():
    w = torch.randn(3, 2, 3, 3, 3)
    mean, var = torch.randn(3), torch.rand(3) + 0.1
    wf, bf = fold_bn(w, None, None, None, mean, var, 1e-3)
    inv = 1 / torch.sqrt(var.double() + 1e-3)
    torch.testing.assert_close(bf, (-mean.double() * inv).float())
    torch.testing.assert_close(wf, (w.double() * inv.view(-1, 1, 1, 1, 1)).float())


def test_fold_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="running_var must have shape"):
        fold_bn(torch.randn(3, 2, 3, 3, 3), None, None, None, torch.zeros(3), torch.ones(4), 1e-5)


def test_pack_weight_layout():
    w = torch.randn(5, 3, 3, 3, 3)
    packed = pack_weight(w)
    assert packed.shape == (81, 16) and packed.is_contiguous()  # columns padded to 16
    assert not packed[:, 5:].any()
    for dx, dy, dz, ci in [(0, 0, 0, 0), (2, 1, 0, 2), (1, 2, 2, 1), (2, 2, 2, 2)]:
        assert torch.equal(packed[(9 * dx + 3 * dy + dz) * 3 + ci, :5], w[:, ci, dx, dy, dz])


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


def _expected(m, x):
    bn = m.bn
    return conv_bn_relu_ref(
        x, m.conv.weight, m.conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        bn.eps, "same" if tuple(m.conv.padding) == (1, 1, 1) else "valid",
    )  # fmt: skip


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


def test_unpack_weight_inverts_pack_weight():
    w = torch.randn(24, 5, 3, 3, 3)
    assert torch.equal(unpack_weight(pack_weight(w), 5, 24), w)


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
        expected = _expected(m, x.float())
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
            torch.testing.assert_close(conv_bn_relu(x, m), _expected(m, x))
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
        torch.testing.assert_close(before, _expected(m, x))
        plan = folding.prepared(m)
        CHANGES[change](m)
        after = conv_bn_relu(x, m)
    torch.testing.assert_close(after, _expected(m, x), rtol=1e-5, atol=1e-5)
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
        torch.testing.assert_close(conv_bn_relu(x, m), _expected(m, x))


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


@needs_interpreter
@pytest.mark.slow
def test_compiled_module_call_matches_eager():
    case = Case(1, 3, 16, (5, 5, 5), "valid")
    m, x = module_for(case), make_params(case)[0]

    def block(t):
        return conv_bn_relu(t, m, backend="triton", input_precision="ieee")

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))
        torch.testing.assert_close(compiled(x), _expected(m, x), rtol=1e-5, atol=1e-5)


# -- input validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(1, 3, 5, 5)), ValueError, r"\(N, C, X, Y, Z\)"),
        (dict(x=torch.zeros(1, 3, 5, 5, 5, dtype=torch.int32)), ValueError, "float"),
        (dict(x=torch.randn(1, 4, 5, 5, 5)), ValueError, "expects 3"),
        (dict(padding="reflect"), ValueError, "padding must be one of"),
        (dict(input_precision="tf32x3"), ValueError, "input_precision"),
        (dict(x=torch.randn(1, 3, 2, 5, 5)), ValueError, "at least 3 voxels"),
        (dict(params=torch.randn(8, 3, 3, 3, 3)), TypeError, "module_or_params"),
        (dict(params=(torch.randn(8, 3, 1, 1, 1), torch.randn(8))), ValueError, "3, 3, 3"),
        (dict(backend="cupy"), ValueError, "backend must be"),
    ],
    ids=["4d", "int", "channels", "padding", "precision", "small", "bare-weight", "1x1", "cupy"],
)
def test_invalid_inputs_are_explained(kwargs, error, match):
    args = dict(
        x=torch.randn(1, 3, 5, 5, 5),
        params=(torch.randn(8, 3, 3, 3, 3), torch.randn(8)),
        padding="valid",
        backend="torch",
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        conv_bn_relu(
            args["x"],
            args["params"],
            args["padding"],
            args["backend"],
            input_precision=kwargs.get("input_precision", "tf32"),
        )


def test_module_padding_must_agree():
    m = module_for(Case(1, 2, 3, (5, 5, 5), "same"))
    with pytest.raises(ValueError, match="differs from the module"):
        conv_bn_relu(torch.randn(1, 2, 5, 5, 5), m, "valid", backend="torch")


def test_folded_conv_padding_must_agree():
    w, b = fold_bn(*make_params(Case(1, 2, 3, (5, 5, 5), "same"))[1])
    with pytest.raises(ValueError, match="differs from the FoldedConv"):
        conv_bn_relu(torch.randn(1, 2, 5, 5, 5), FoldedConv.from_params(w, b, "same"), "valid")


def test_exact_fp32_turns_cudnn_tf32_off_for_the_call_only(monkeypatch):
    seen = []
    conv3d = F.conv3d
    monkeypatch.setattr(
        F, "conv3d", lambda *a, **k: seen.append(torch.backends.cudnn.allow_tf32) or conv3d(*a, **k)
    )
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    m = module_for(Case(1, 2, 3, (5, 5, 5), "same"))
    x = torch.randn(1, 2, 5, 5, 5)
    conv_bn_relu(x, m, backend="torch", input_precision="ieee")
    conv_bn_relu(x, m, backend="torch", input_precision="tf32")
    assert seen == [False, True]
    assert torch.backends.cudnn.allow_tf32 is True


def test_torch_backend_with_folded_params_matches_reference():
    case = Case(1, 3, 4, (5, 6, 7), "same")
    x, params = make_params(case)
    w, b = fold_bn(*params)
    ref = conv_bn_relu_ref(x, *params[:6], params[6], case.padding)
    for given in ((w, b), FoldedConv.from_params(w, b, "same")):
        torch.testing.assert_close(conv_bn_relu(x, given, "same", backend="torch"), ref)


# -- the committed configuration table -------------------------------------------------------
def unet_layer_shapes(base: int, levels: int = 4) -> set[tuple[int, int]]:
    with torch.device("meta"):
        net = UNet3D(num_classes=len(CLASS_NAMES), base_channels=base, levels=levels)
    return {
        (m.conv.in_channels, m.conv.out_channels)
        for m in net.modules()
        if isinstance(m, ConvBNReLU)
    }


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


# -- torch.library registration -----------------------------------------------------------------
@needs_interpreter
def test_custom_op_passes_opcheck():
    case = Case(1, 3, 16, (4, 5, 3), "valid")
    x, params = make_params(case)
    folded = FoldedConv.from_params(*fold_bn(*params), "valid")
    torch.library.opcheck(
        torch.ops.fastcascade.conv3x3x3_bias_relu.default,
        (x, folded.packed, folded.bias32, 0, "ieee"),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_interpreter
@pytest.mark.slow
def test_compiled_function_with_the_custom_op_matches_eager():
    case = Case(1, 4, 16, (5, 5, 5), "same")
    x, params = make_params(case)
    folded = FoldedConv.from_params(*fold_bn(*params), "same")

    def block(t):
        return conv_bn_relu(t * 2.0, folded, backend="triton", input_precision="ieee") + 1.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


# -- GPU (opt-in: pytest -m gpu, with TRITON_INTERPRET=0) ------------------------------------------
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if _backend.interpreter_on():
        pytest.skip("run GPU tests with TRITON_INTERPRET=0 (the interpreter is on)")


PAPER_LAYERS = sorted(unet_layer_shapes(32))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)],
    ids=["bf16", "fp16"],
)
@pytest.mark.parametrize("padding", ["valid", pytest.param("same", marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape", PAPER_LAYERS, ids=lambda s: f"{s[0]}to{s[1]}")
def test_gpu_half_precision_error_within_twice_pytorchs(shape, padding, dtype):
    _needs_cuda()
    cin, cout = shape
    case = Case(2, cin, cout, (13, 11, 9), padding)
    x, params = make_params(case)
    x, params = x.cuda(), tuple(p.cuda() if torch.is_tensor(p) else p for p in params)
    m = module_for(case).cuda()
    ref = conv_bn_relu_ref(x.double(), *(p.double() for p in params[:6]), params[6], padding)
    x_cl = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        torch_err = _rel_err(F.relu(m.bn(m.conv(x_cl))), ref)  # PyTorch's own, same dtype
    for backend in ("triton", "cudnn"):
        with torch.no_grad():
            y = conv_bn_relu(x_cl, m, backend=backend)
        assert y.dtype == dtype and not y.isnan().any()
        assert _rel_err(y, ref) <= 2 * torch_err + 1e-6, (backend, _rel_err(y, ref), torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(1, 8), (1, 32), (6, 12), (12, 36), (36, 6)], ids=lambda s: f"{s[0]}to{s[1]}"
)
def test_gpu_cudnn_shapes_without_a_fused_engine_still_run(shape, monkeypatch):
    """cuDNN has no fused conv+bias+ReLU engine for some of these in bf16 (which ones
    depends on the cuDNN version; the run prints them): each runs, unfused where needed,
    within twice PyTorch's own bf16 error, the same at the second call."""
    _needs_cuda()
    monkeypatch.setattr(fallback, "FALLBACKS", {})
    cin, cout = shape
    case = Case(1, cin, cout, (12, 10, 9), "valid")
    x, params = make_params(case)
    x, params = x.cuda(), tuple(p.cuda() if torch.is_tensor(p) else p for p in params)
    m = module_for(case).cuda()
    ref = conv_bn_relu_ref(x.double(), *(p.double() for p in params[:6]), params[6])
    x_cl = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_err = _rel_err(F.relu(m.bn(m.conv(x_cl))), ref)
        first, second = (conv_bn_relu(x_cl, m, backend="cudnn") for _ in range(2))
    print(f"{cin}->{cout} bf16 fell back:", fallback.fallbacks() or "no")
    assert torch.equal(first, second)
    assert _rel_err(first, ref) <= 2 * torch_err + 1e-6, (_rel_err(first, ref), torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_fp32_exact_and_tf32(case, nan_outputs):
    _needs_cuda()
    x, params = make_params(case)
    ref = conv_bn_relu_ref(x, *params[:6], params[6], case.padding).cuda()
    w, b = fold_bn(*params)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    exact = conv_bn_relu(x, (w, b), case.padding, backend="triton", input_precision="ieee")
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    tf32 = conv_bn_relu(x, (w, b), case.padding, backend="triton", input_precision="tf32")
    torch.testing.assert_close(tf32, ref, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
def test_gpu_opt_in_autotuning(monkeypatch):
    _needs_cuda()
    monkeypatch.setattr(_backend, "autotune_enabled", lambda: True)
    monkeypatch.setattr(configs, "_AUTOTUNED", {})
    case = Case(1, 32, 64, (20, 18, 16), "valid")
    x, params = make_params(case)
    ref = conv_bn_relu_ref(x, *params[:6], params[6], "valid").cuda()
    w, b = fold_bn(*params)
    x_cl = x.cuda().to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    y = conv_bn_relu(x_cl, (w.cuda(), b.cuda()), "valid", backend="triton")
    assert len(configs._AUTOTUNED) == 1
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets_past_two_to_the_31():
    _needs_cuda()
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    cin, cout, size = 16, 16, (520, 520, 500)  # 2.16e9 input elements
    assert cin * math.prod(size) > 2**31
    x = torch.empty((1, cin, *size), dtype=torch.bfloat16, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last_3d).normal_()
    w = torch.randn(cout, cin, 3, 3, 3, device="cuda") / math.sqrt(27 * cin)
    b = torch.randn(cout, device="cuda")
    y = conv_bn_relu(x, (w, b), "valid", backend="triton")
    tail = x[:, :, -6:, -6:, -6:].float()  # the last voxels: offsets beyond 2^31
    ref = F.relu(F.conv3d(tail, w, b))
    torch.testing.assert_close(y[:, :, -4:, -4:, -4:].float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_module_dispatch(monkeypatch):
    _needs_cuda()
    calls = []
    real = unet3d.conv_bn_relu

    def spy(x, module):
        calls.append(module)
        return real(x, module)

    monkeypatch.setattr(unet3d, "conv_bn_relu", spy)
    case = Case(2, 4, 8, (8, 8, 8), "valid")
    m = module_for(case).cuda()
    x = make_params(case)[0].cuda()
    with torch.no_grad():
        eval_out = m(x)
    assert calls == [m]
    torch.testing.assert_close(eval_out, F.relu(m.bn(m.conv(x))), rtol=2e-3, atol=2e-3)
    # Eval mode with gradients wanted (fine-tuning with frozen BatchNorm): PyTorch's path.
    twin = copy.deepcopy(m)
    m(x).square().sum().backward()
    F.relu(twin.bn(twin.conv(x))).square().sum().backward()
    torch.testing.assert_close(m.conv.weight.grad, twin.conv.weight.grad)
    m.train()
    calls.clear()
    m(x)
    assert calls == [], "training mode must not use the fused kernel"


def _check_whole_network(hu: torch.Tensor, monkeypatch) -> None:
    """The paper's network (random weights, BatchNorm statistics taken from this tile) on
    a 132x132x116 HU tile in bf16, through the committed table and through our kernel
    everywhere: logits within 2x PyTorch's own bf16 error against exact fp32, and argmax
    agreement with fp32 no worse than PyTorch's bf16 (minus 0.5%: near-ties flip either way)."""
    x = ((hu.clamp(-1000, 1000) + 1000) / 1000 - 1)[None, None].cuda()
    x = x.contiguous(memory_format=torch.channels_last_3d)
    torch.manual_seed(0)
    net = UNet3D(num_classes=len(CLASS_NAMES)).cuda()
    for m in net.modules():  # cumulative statistics of this tile: activations stay O(1)
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
    results = {}
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        net.train()(x)
        net.eval()
        with monkeypatch.context() as mp:
            mp.setattr(unet3d, "conv_bn_relu", lambda t, m: F.relu(m.bn(m.conv(t))))
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                ref = net(x).double()  # PyTorch's path in exact fp32
            with bf16:
                results["pytorch"] = net(x).double()
        with bf16:
            results["table"] = net(x).double()
            all_triton = {k: {**v, "provider": "triton"} for k, v in cbr.CONFIGS.items()}
            monkeypatch.setattr(configs, "CONFIGS", all_triton)
            results["triton"] = net(x).double()
    errs = {k: _rel_err(v, ref) for k, v in results.items()}
    agree = {k: (v.argmax(1) == ref.argmax(1)).double().mean().item() for k, v in results.items()}
    print("relative error vs fp32:", errs, "argmax agreement:", agree)
    for k in ("table", "triton"):
        assert errs[k] <= 2 * errs["pytorch"] + 1e-6, (k, errs)
        assert agree[k] >= agree["pytorch"] - 0.005, (k, agree)


@pytest.mark.gpu
def test_gpu_whole_network_on_a_case_a_tile(case_a_paths, monkeypatch):
    _needs_cuda()
    nib = pytest.importorskip("nibabel")
    ct = torch.from_numpy(nib.load(str(case_a_paths[0])).get_fdata(dtype="float32"))
    tile = torch.full((132, 132, 116), -1024.0)  # air around a scan smaller than the tile
    cx, cy, cz = (min(a, b) for a, b in zip(ct.shape, tile.shape, strict=True))
    tile[:cx, :cy, :cz] = ct[:cx, :cy, :cz]
    _check_whole_network(tile, monkeypatch)


@pytest.mark.gpu
def test_gpu_whole_network_on_a_synthetic_tile(monkeypatch):
    """The same without case A: smooth random structures in HU."""
    _needs_cuda()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, 132, 132, 116, generator=g)
    smooth = F.avg_pool3d(F.avg_pool3d(noise, 9, 1, 4), 9, 1, 4)[0, 0]
    _check_whole_network(smooth / smooth.std() * 300.0, monkeypatch)
