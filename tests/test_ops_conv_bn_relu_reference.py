"""Fused conv3d + BatchNorm + ReLU: the PyTorch reference against a naive unfold/einsum
oracle, BatchNorm folding and weight packing, and the public function's input checks
and ``backend="torch"`` path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conv_bn_relu_cases import (
    CASES,
    Case,
    make_params,
    module_for,
    naive_conv_bn_relu,
)

from fastcascade.ops.conv_bn_relu import (
    FoldedConv,
    conv_bn_relu,
    conv_bn_relu_ref,
    fold_bn,
    pack_weight,
    unpack_weight,
)


# -- the reference against an independent oracle ------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive_oracle(case):
    x, params = make_params(case)
    ref = conv_bn_relu_ref(x.double(), *(p.double() for p in params[:6]), params[6], case.padding)
    oracle = naive_conv_bn_relu(x, *params, case.padding)
    assert ref.shape == oracle.shape
    torch.testing.assert_close(ref, oracle, rtol=1e-12, atol=1e-12)
    assert (oracle > 0).any() and (oracle == 0).any()  # the ReLU did something both ways


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


def test_unpack_weight_inverts_pack_weight():
    w = torch.randn(24, 5, 3, 3, 3)
    assert torch.equal(unpack_weight(pack_weight(w), 5, 24), w)


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
