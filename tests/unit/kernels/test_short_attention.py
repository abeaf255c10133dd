"""Short-sequence fused attention: Triton vs the plain reference vs torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavid import kernels as K


def _mask(lead, tk, device, pattern):
    m = torch.ones(*lead, tk, dtype=torch.bool)
    if pattern == "padded":  # ragged valid lengths, padding at the end (text-style batches)
        flat = m.view(-1, tk)
        for i in range(flat.shape[0]):
            flat[i, max(1, tk - 1 - 3 * i) :] = False
    elif pattern == "holes":  # arbitrary keys dropped, and one sequence with no valid key
        g = torch.Generator().manual_seed(7)
        m = torch.rand(*lead, tk, generator=g) > 0.4
        m.view(-1, tk)[0] = False
    return m.to(device)


@pytest.mark.parametrize(
    "lead, h, tq, tk, dh, mask",
    [
        ((3,), 2, 13, 13, 24, "padded"),  # T=13, non-power-of-two head dim
        ((2, 3), 1, 8, 8, 64, None),  # two leading dims (B, N), the temporal case
        ((4,), 3, 1, 1, 16, None),  # T = 1: attention is the identity on v
        ((2,), 2, 5, 19, 40, "holes"),  # Tq != Tk, scattered mask, an all-masked sequence
        ((), 2, 96, 96, 32, None),  # the longest temporal length in the spec
    ],
)
def test_short_attention_matches_reference(
    device, dtype, fwd_tol, bwd_tol, leaf, lead, h, tq, tk, dh, mask
):
    q = leaf((*lead, h, tq, dh), device, dtype, seed=1)
    k = leaf((*lead, h, tk, dh), device, dtype, seed=2)
    v = leaf((*lead, h, tk, dh), device, dtype, seed=3)
    m = None if mask is None else _mask(lead, tk, device, mask)
    g_out = torch.randn((*lead, h, tq, dh), generator=torch.Generator().manual_seed(4))
    g_out = g_out.to(device, dtype)

    o = K.short_attention(q, k, v, m, impl="triton")
    assert "ShortAttentionFn" in type(o.grad_fn).__name__
    assert o.shape == q.shape
    got = torch.autograd.grad((o * g_out).sum(), (q, k, v))
    o_ref = K.short_attention_ref(q, k, v, m)
    want = torch.autograd.grad((o_ref * g_out).sum(), (q, k, v))

    torch.testing.assert_close(o, o_ref, **fwd_tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **bwd_tol)
    if tk == 1:
        torch.testing.assert_close(o, v.expand_as(o), **fwd_tol)
    if m is not None:
        dead = ~m.any(-1)
        assert torch.all(o[dead] == 0)
        # Padded keys receive no gradient at all (they took no part).
        dk = got[1].transpose(-3, -2)  # [..., Tk, H, Dh]
        assert torch.all(dk[~m] == 0)


def test_reference_matches_sdpa_with_padding_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 11, 20, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :2] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(K.short_attention_ref(q, k, v, mask), want)
    torch.testing.assert_close(K.short_attention(q, k, v, mask, impl="torch"), want)


def test_strided_views_are_read_in_place_and_output_is_token_major(interpreted):
    # q/k/v as views of one packed [Z, T, 3, H, Dh] tensor, as a qkv projection produces.
    qkv = torch.randn(6, 9, 3, 2, 16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [Z, H, T, Dh] strided views
    assert not q.is_contiguous()
    o = K.short_attention(q, k, v, impl="triton")
    o_ref = K.short_attention_ref(q, k, v)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    # [Z, H, T, Dh] whose memory is [Z, T, H, Dh]: merging the heads is a free view.
    assert o.transpose(1, 2).is_contiguous()
    g = torch.autograd.grad(o.square().sum(), qkv)[0]
    g_ref = torch.autograd.grad(o_ref.square().sum(), qkv)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_custom_scale_and_long_sequences_fall_back_to_sdpa(interpreted):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) for _ in range(3))
    o = K.short_attention(q, k, v, scale=0.3, impl="triton")
    torch.testing.assert_close(o, K.short_attention_ref(q, k, v, scale=0.3), atol=2e-5, rtol=2e-5)
    long = torch.randn(1, 1, K.MAX_SHORT_T + 1, 8, requires_grad=True)
    o = K.short_attention(long, long, long, impl="triton")
    assert "ShortAttentionFn" not in type(o.grad_fn).__name__  # SDPA took over
    torch.testing.assert_close(o, K.short_attention_ref(long, long, long), atol=1e-5, rtol=1e-5)


def test_shape_errors_name_the_shapes():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="must be"):
        K.short_attention(q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="Tk=5"):
        K.short_attention(q, q, q, torch.ones(2, 6, dtype=torch.bool))
