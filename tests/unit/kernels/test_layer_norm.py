"""Fused residual add + LayerNorm: Triton vs the plain reference vs torch's F.layer_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavid import kernels as K


@pytest.mark.parametrize(
    "shape, with_residual, with_bias",
    [
        ((13, 37), True, True),  # non-power-of-two D, residual path
        ((2, 5, 200), False, True),  # no residual: new_residual is x itself
        ((1, 96), True, False),  # a single row, no bias
        ((3, 1, 1), True, True),  # D = 1: y = bias exactly (variance 0)
    ],
)
def test_layer_norm_matches_reference(
    device, dtype, fwd_tol, bwd_tol, leaf, shape, with_residual, with_bias
):
    d = shape[-1]
    x = leaf(shape, device, dtype, seed=1)
    res = leaf(shape, device, dtype, seed=2) if with_residual else None
    w = leaf((d,), device, dtype, scale=0.5, seed=3)
    b = leaf((d,), device, dtype, seed=4) if with_bias else None
    inputs = [t for t in (x, res, w, b) if t is not None]
    # Both outputs feed the loss, so the gradient flowing into new_residual is tested too.
    g_out = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    g_res = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)

    y, h = K.layer_norm(x, w, b, 1e-5, res, impl="triton")
    assert "LayerNormFn" in type(y.grad_fn).__name__  # the Triton kernel ran, not a fallback
    got = torch.autograd.grad((y * g_out).sum() + (h * g_res).sum(), inputs)
    y_ref, h_ref = K.layer_norm_ref(x, w, b, 1e-5, res)
    want = torch.autograd.grad((y_ref * g_out).sum() + (h_ref * g_res).sum(), inputs)

    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the same rounded sum
    torch.testing.assert_close(y, y_ref, **fwd_tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **bwd_tol)
    if not with_residual:
        assert h is x


def test_reference_matches_torch_layer_norm():
    # The oracle's oracle: the plain reference equals torch's own kernel (fp64 ground truth).
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(7, 45, generator=g), torch.randn(7, 45, generator=g)
    w, b = torch.randn(45, generator=g), torch.randn(45, generator=g)
    y, h = K.layer_norm_ref(x, w, b, 1e-6, r)
    want = F.layer_norm((x + r).double(), (45,), w.double(), b.double(), 1e-6)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_torch_impl_matches_reference():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 3, 33, generator=g), torch.randn(4, 3, 33, generator=g)
    w, b = torch.randn(33, generator=g), torch.randn(33, generator=g)
    y, h = K.layer_norm(x, w, b, 1e-5, r, impl="torch")
    y_ref, h_ref = K.layer_norm_ref(x, w, b, 1e-5, r)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref)


def test_fused_layer_norm_module_is_a_drop_in(interpreted):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(50, eps=1e-6)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    fused = K.FusedLayerNorm(50, eps=1e-6, impl="triton")
    fused.load_state_dict(ref.state_dict())  # strict: the same keys and shapes
    x = torch.randn(6, 50)
    torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=2e-5)
    r = torch.randn(6, 50)
    y, h = fused(x, r)  # the residual form, through __call__
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r), atol=2e-5, rtol=2e-5)


def test_mixed_dtypes_promote_like_torch(leaf, interpreted):
    # An fp32 residual stream with fp16 branch outputs (autocast-style): the stream stays fp32.
    x = leaf((6, 40), "cpu", torch.float16, seed=1)
    r = leaf((6, 40), "cpu", torch.float32, seed=2)
    w = leaf((40,), "cpu", torch.float32, seed=3)
    b = leaf((40,), "cpu", torch.float32, seed=4)
    y, h = K.layer_norm(x, w, b, 1e-5, r, impl="triton")
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, x.float() + r)
    want = F.layer_norm(x.float() + r, (40,), w, b, 1e-5)
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
    gx, gr = torch.autograd.grad(y.square().sum(), (x, r))
    gx_ref, gr_ref = torch.autograd.grad(want.square().sum(), (x, r))
    assert gx.dtype == torch.float16 and gr.dtype == torch.float32
    torch.testing.assert_close(gr, gr_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref.half(), atol=1e-2, rtol=1e-2)
