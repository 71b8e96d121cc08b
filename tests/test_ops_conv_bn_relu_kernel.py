"""Fused conv3d + BatchNorm + ReLU: the Triton kernel (interpreter on the CPU) against the
PyTorch reference, its ``torch.library`` registration and ``torch.compile``, and
(``-m gpu``) the real thing on a GPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conv_bn_relu_cases import (
    CASES,
    Case,
    expected_ref,
    make_params,
    module_for,
    needs_interpreter,
    unet_layer_shapes,
)
from launch_guard import record_launches

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
    fallback,
    fold_bn,
    kernel,
)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so a voxel the kernel skips fails."""
    empty = kernel._empty_channels_last

    def poisoned(shape, like):
        return empty(shape, like).fill_(float("nan"))

    monkeypatch.setattr(kernel, "_empty_channels_last", poisoned)


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
        torch.testing.assert_close(compiled(x), expected_ref(m, x), rtol=1e-5, atol=1e-5)


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


@needs_interpreter
def test_kernel_launches_inside_the_inputs_device_guard(monkeypatch, nan_outputs):
    launches = record_launches(monkeypatch, kernel, "_conv3x3x3_bias_relu_kernel")
    case = CASES[-1]
    x, params = make_params(case)
    w, b = fold_bn(*params)
    y = conv_bn_relu(x, (w, b), case.padding, backend="triton", input_precision="ieee")
    assert len(launches) == 1 and launches[0]
    assert torch.equal(launches[0][-1], x)
    ref = conv_bn_relu_ref(x, *params[:6], params[6], case.padding)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
