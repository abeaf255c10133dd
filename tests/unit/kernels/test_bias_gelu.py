"""Fused bias + exact GELU: Triton vs the plain reference vs torch's F.gelu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavid import kernels as K


@pytest.mark.parametrize("shape", [(3, 11, 45), (1, 7), (3, 700)])  # 3*700 > one 1024 block
def test_bias_gelu_matches_reference(device, dtype, fwd_tol, bwd_tol, leaf, shape):
    x = leaf(shape, device, dtype, scale=2.0, seed=1)
    b = leaf(shape[-1:], device, dtype, seed=2)
    g_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)

    y = K.bias_gelu(x, b, impl="triton")
    assert "BiasGeluFn" in type(y.grad_fn).__name__
    got = torch.autograd.grad((y * g_out).sum(), (x, b))
    y_ref = K.bias_gelu_ref(x, b)
    want = torch.autograd.grad((y_ref * g_out).sum(), (x, b))

    torch.testing.assert_close(y, y_ref, **fwd_tol)
    torch.testing.assert_close(got[0], want[0], **bwd_tol)
    # dbias sums over rows: scale the tolerance by the number of rows summed.
    rows = x.numel() // shape[-1]
    tol = {k: v * rows**0.5 for k, v in bwd_tol.items()}
    torch.testing.assert_close(got[1], want[1], **tol)


def test_reference_is_exact_erf_gelu():
    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(5, 19, generator=g) * 3, torch.randn(19, generator=g)
    torch.testing.assert_close(K.bias_gelu_ref(x, b), F.gelu(x + b, approximate="none"))
    # ... and not the tanh approximation, which differs by ~1e-3 at these magnitudes.
    assert (K.bias_gelu_ref(x, b) - F.gelu(x + b, approximate="tanh")).abs().max() > 1e-4


def test_linear_gelu_module_matches_linear_then_gelu(interpreted):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    fused = K.LinearGELU(24, 40, impl="triton")
    fused.load_state_dict(lin.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = fused(x)
    want = F.gelu(lin(x))
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
    g1 = torch.autograd.grad(y.sum(), (x, fused.weight, fused.bias))
    g2 = torch.autograd.grad(want.sum(), (x, lin.weight, lin.bias))
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
