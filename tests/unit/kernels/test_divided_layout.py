"""Divided space-time layout: temporal and spatial attention read straight from the
``[B, 1+N*T, 3*D]`` qkv projection, against the copy-based reference and against
``transformers.TimesformerLayer`` as an independent oracle of the whole block."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megavid import kernels as K

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_temporal_qkv_are_views_of_the_projection():
    b, n, t, h, dh = 2, 3, 4, 2, 8
    qkv = torch.randn(b, 1 + n * t, 3 * h * dh)
    q, k, v = K.divided_temporal_qkv(qkv, t, h)
    for x in (q, k, v):
        assert x.shape == (b, n, h, t, dh)
        assert x.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # no copy
    # Independent index check: patch p, frame f, head j, channel c of k is token 1 + p*T + f,
    # channel D + j*Dh + c of the projection.
    p, f, j, c = 2, 3, 1, 5
    assert k[1, p, j, f, c] == qkv[1, 1 + p * t + f, h * dh + j * dh + c]


@pytest.mark.parametrize("b, n, t, h, dh", [(2, 3, 13, 2, 24), (1, 4, 1, 1, 16)])
def test_divided_temporal_attention(device, dtype, fwd_tol, bwd_tol, leaf, b, n, t, h, dh):
    qkv = leaf((b, 1 + n * t, 3 * h * dh), device, dtype, seed=1)
    o = K.divided_temporal_attention(qkv, t, h, impl="triton")
    assert "DividedTemporalAttentionFn" in type(o.grad_fn).__name__
    assert o.is_contiguous()  # [B, N*T, D], ready for the output projection
    o_ref = K.divided_temporal_attention_ref(qkv, t, h)
    torch.testing.assert_close(o, o_ref, **fwd_tol)
    g_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    (g,) = torch.autograd.grad((o * g_out).sum(), qkv)
    (g_ref,) = torch.autograd.grad((o_ref * g_out).sum(), qkv)
    torch.testing.assert_close(g, g_ref, **bwd_tol)
    assert torch.all(g[:, 0] == 0)  # the cls token takes no part in temporal attention


@pytest.mark.parametrize(
    "b, n, t, h, dh",
    [
        (2, 20, 3, 2, 24),  # 21-token sequences: one 32-wide tile
        (1, 5, 1, 1, 16),  # T = 1: plain ViT attention with a cls token
        (1, 70, 2, 1, 8),  # 71 tokens: several query and key tiles (online softmax)
    ],
)
def test_divided_spatial_attention(device, dtype, fwd_tol, bwd_tol, leaf, b, n, t, h, dh):
    qkv = leaf((b, 1 + n * t, 3 * h * dh), device, dtype, seed=1)
    o = K.divided_spatial_attention(qkv, t, h, impl="triton")
    assert "DividedSpatialAttentionFn" in type(o.grad_fn).__name__
    o_ref = K.divided_spatial_attention_ref(qkv, t, h)
    torch.testing.assert_close(o, o_ref, **fwd_tol)
    g_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    (g,) = torch.autograd.grad((o * g_out).sum(), qkv)
    (g_ref,) = torch.autograd.grad((o_ref * g_out).sum(), qkv)
    torch.testing.assert_close(g, g_ref, **bwd_tol)


def test_spatial_torch_impl_matches_reference():
    qkv = torch.randn(2, 1 + 6 * 3, 3 * 16, dtype=torch.float64)
    torch.testing.assert_close(
        K.divided_spatial_attention(qkv, 3, 2, impl="torch"),
        K.divided_spatial_attention_ref(qkv, 3, 2),
    )


def _hf_layer(num_frames: int):
    from transformers import TimesformerConfig
    from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

    cfg = TimesformerConfig(
        image_size=16, patch_size=8, num_frames=num_frames, hidden_size=40,
        num_attention_heads=2, intermediate_size=72, num_hidden_layers=1,
        attention_type="divided_space_time", hidden_act="gelu", layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = TimesformerLayer(cfg, 0).eval()
    with torch.no_grad():  # non-trivial norms and temporal_fc (HF zero-inits nothing, but be sure)
        for mod in layer.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return layer, cfg


def _fused_block(layer, x, num_frames: int, impl: str):
    """HF's layer through megavid.kernels.divided_block_forward, with HF's own modules."""
    return K.divided_block_forward(
        x, num_frames, layer.config.num_attention_heads,
        temporal_norm=layer.temporal_layernorm,
        temporal_qkv=layer.temporal_attention.attention.qkv,
        temporal_proj=layer.temporal_attention.output.dense,
        temporal_fc=layer.temporal_dense,
        norm1=layer.layernorm_before, qkv=layer.attention.attention.qkv,
        proj=layer.attention.output.dense,
        norm2=layer.layernorm_after, fc1=layer.intermediate.dense, fc2=layer.output.dense,
        impl=impl,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_divided_block_matches_transformers_timesformer_layer(impl, interpreted):
    t = 3
    layer, cfg = _hf_layer(t)
    n = (cfg.image_size // cfg.patch_size) ** 2
    x = torch.randn(1, 1 + n * t, cfg.hidden_size, requires_grad=True)
    want = layer(x)[0]
    got = _fused_block(layer, x, t, impl)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)
    params = [layer.temporal_dense.weight, layer.attention.attention.qkv.weight,
              layer.layernorm_before.weight, layer.intermediate.dense.bias]  # fmt: skip
    g_out = torch.randn_like(want)
    g_want = torch.autograd.grad((want * g_out).sum(), [x, *params])
    g_got = torch.autograd.grad((got * g_out).sum(), [x, *params])
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-4)


def test_apply_fused_kernels_on_timm_vit_keeps_weights_and_outputs(interpreted):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        embed_dim=48, num_heads=2, num_classes=5,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    keys = list(model.state_dict())
    counts = K.apply_fused_kernels(model, impl="triton")
    # 2 blocks x (norm1, norm2) + the final norm; 2 MLPs.
    assert counts == {"layer_norm": 5, "bias_gelu": 2}
    assert list(model.state_dict()) == keys
    assert isinstance(model.blocks[0].mlp.fc1, K.LinearGELU)
    torch.testing.assert_close(model(x), want, atol=5e-5, rtol=5e-5)


def test_divided_block_forward_matches_megavid_timesformer_block(interpreted):
    # The integration the models engineer wires in: megavid's own Block, its own modules.
    timesformer = pytest.importorskip("megavid.models.timesformer")
    torch.manual_seed(0)
    blk = timesformer.Block(48, 2, attention_type="divided_space_time").eval()
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
        blk.temporal_fc.weight.normal_(0.0, 0.05)  # zero-initialised by inflation otherwise
    x = torch.randn(1, 1 + 4 * 3, 48)
    want = blk(x, 3)

    def fused():
        return K.divided_block_forward(
            x, 3, 2, temporal_norm=blk.temporal_norm1, temporal_qkv=blk.temporal_attn.qkv,
            temporal_proj=blk.temporal_attn.proj, temporal_fc=blk.temporal_fc, norm1=blk.norm1,
            qkv=blk.attn.qkv, proj=blk.attn.proj, norm2=blk.norm2, fc1=blk.mlp.fc1,
            fc2=blk.mlp.fc2, drop_path=blk.drop_path, impl="triton",
        )  # fmt: skip

    torch.testing.assert_close(fused(), want, atol=3e-5, rtol=3e-5)
    # After apply_fused_kernels the norms and fc1 are called as modules (the ZeRO-3 path).
    assert K.apply_fused_kernels(blk, impl="triton") == {"layer_norm": 3, "bias_gelu": 1}
    torch.testing.assert_close(fused(), want, atol=3e-5, rtol=3e-5)
