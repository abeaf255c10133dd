"""TimeSformer against transformers.TimesformerModel and timm's ViT (independent oracles)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megavid.models.timesformer import TimeSformer, resize_time_embed
from megavid.models.variants import TIMESFORMER_VARIANTS, create_timesformer
from megavid.models.weights import load_video_into


def _hf_pair(attention_type: str, *, frames: int = 3, img: int = 32, patch: int = 8):
    cfg = transformers.TimesformerConfig(
        image_size=img, patch_size=patch, num_frames=frames, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, attention_type=attention_type,
    )
    hf = transformers.TimesformerModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial weights everywhere (HF zero-inits some)
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    ours = TimeSformer(
        img_size=img, patch_size=patch, num_frames=frames, embed_dim=64, depth=2, num_heads=4,
        attention_type=attention_type,
    ).eval()
    return hf, ours


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_matches_transformers_timesformer(attention_type: str, impl: str) -> None:
    hf, ours = _hf_pair(attention_type)
    for m in ours.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    report = load_video_into(ours, hf.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        tokens, pooled = ours(x)
    if attention_type == "space_only":
        # HF returns per-frame sequences [B*T, 1+N, D]; ours is [B, 1+N*T, D] (patch-major) with
        # the frame-averaged cls first.
        B, T, D = 2, 3, 64
        r = ref.reshape(B, T, -1, D)
        ref = torch.cat((r[:, :, 0].mean(1, keepdim=True), r[:, :, 1:].transpose(1, 2).reshape(B, -1, D)), 1)
    assert tokens.shape == ref.shape == (2, 1 + 16 * 3, 64)
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref[:, 0], atol=1e-4, rtol=1e-4)


def test_inflated_vit_equals_image_model_on_identical_frames() -> None:
    timm = pytest.importorskip("timm")
    # the vit_tiny_patch16_224 architecture at 64² and 4 blocks, to keep the test fast
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(0, 0.2)  # make position matter
    model = TimeSformer(img_size=64, patch_size=16, num_frames=2, embed_dim=192, depth=4, num_heads=3).eval()
    report = load_video_into(model, vit.state_dict())
    assert not report.missing
    for blk in model.blocks:
        assert torch.count_nonzero(blk.temporal_fc.weight) == 0
        torch.testing.assert_close(blk.temporal_attn.qkv.weight, blk.attn.qkv.weight)
    frame = torch.randn(2, 3, 64, 64)
    clip = frame[:, None].expand(2, 2, 3, 64, 64)
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(frame), pre_logits=True)
        _, pooled = model(clip)
    torch.testing.assert_close(pooled, ref, atol=1e-4, rtol=1e-4)


def test_pos_embed_resized_like_timm() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    model = TimeSformer(img_size=64, patch_size=16, num_frames=4, embed_dim=192, depth=1, num_heads=3)
    load_video_into(model, vit.state_dict())
    ref = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), ref, atol=1e-5, rtol=1e-5)


def test_time_embed_nearest_resize() -> None:
    t = torch.arange(4.0).reshape(1, 4, 1).expand(1, 4, 3)
    out = resize_time_embed(t, 8)
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # each frame's embedding twice


def test_hf_checkpoint_to_more_frames() -> None:
    hf, _ = _hf_pair("divided_space_time", frames=2)
    ours = TimeSformer(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2, num_heads=4)
    load_video_into(ours, hf.state_dict())
    te = hf.embeddings.time_embeddings.detach()
    torch.testing.assert_close(ours.time_embed.detach(), te[:, [0, 0, 1, 1]])


@pytest.mark.parametrize("name", sorted(TIMESFORMER_VARIANTS))
def test_every_variant_forward_backward(name: str) -> None:
    # Registry-driven (timm test_models style): every variant at a small input size, and at
    # most 2 blocks so that the base width runs in seconds on 2 CPU cores.
    model = create_timesformer(name, img_size=32, num_frames=2, depth=2)
    x = torch.randn(2, 2, 3, 32, 32)
    tokens, pooled = model(x)
    assert tokens.shape == (2, 1 + (32 // model.patch_embed.patch_size) ** 2 * 2, model.embed_dim)
    pooled.square().mean().backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert all(p.grad is not None for n, p in model.named_parameters() if "temporal_fc" not in n)


def test_unknown_variant_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="timesformer_tiny_test"):
        create_timesformer("timesformer_huge")


def test_rgb_diff_channels_are_frame_differences_and_rgb_imports_unchanged() -> None:
    """model.video.rgb_diff: (1) an RGB checkpoint (transformers' TimesformerModel) loaded into
    an rgb_diff model gives transformers' outputs (zero weights on the difference channels);
    (2) with the RGB weights zeroed instead, the model equals a plain model fed the frame
    differences computed here by hand (x[t] - x[t-1], zeros for the first frame)."""
    hf, _ = _hf_pair("divided_space_time")
    diff_model = TimeSformer(img_size=32, patch_size=8, num_frames=3, embed_dim=64, depth=2,
                             num_heads=4, rgb_diff=True).eval()
    report = load_video_into(diff_model, hf.state_dict())
    assert not report.missing and not report.unexpected
    assert diff_model.patch_embed.proj.weight.shape[1] == 6
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(diff_model(x)[0], hf(x).last_hidden_state, atol=1e-4, rtol=1e-4)

    plain = TimeSformer(img_size=32, patch_size=8, num_frames=3, embed_dim=64, depth=2, num_heads=4).eval()
    sd = {k: v.clone() for k, v in diff_model.state_dict().items()}
    w = torch.randn_like(sd["patch_embed.proj.weight"][:, 3:])
    sd["patch_embed.proj.weight"] = torch.cat((torch.zeros_like(w), w), dim=1)
    diff_model.load_state_dict(sd)
    plain.load_state_dict({**sd, "patch_embed.proj.weight": w})
    by_hand = torch.stack([torch.zeros_like(x[:, 0])] + [x[:, t] - x[:, t - 1] for t in range(1, 3)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(diff_model(x)[0], plain(by_hand)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_chans", [3, 6])
def test_patch_embed_in_bf16_is_the_convolution(in_chans: int) -> None:
    """The patch embedding in bf16 (as DeepSpeed bf16 runs it) against an fp64 convolution of
    the same bf16 values. torch 2.14's oneDNN bf16 conv2d on AMX CPUs gets this shape wrong
    (cosine ~0.01 for 6 channels, 16x16 -> 128): PatchEmbed must not go through it."""
    import torch.nn.functional as F

    from megavid.models.timesformer import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(64, 16, in_chans, 128).to(torch.bfloat16)
    x = torch.randn(2, 4, in_chans, 66, 64).to(torch.bfloat16)  # 2 rows past the last patch
    ref = F.conv2d(x.reshape(8, in_chans, 66, 64).double(), pe.proj.weight.double(),
                   pe.proj.bias.double(), stride=16).flatten(2).transpose(1, 2)
    got = pe(x)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape == (8, 16, 128)
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel  # bf16 rounding of the output: ~3e-3


def test_divided_training_gradients_match_transformers() -> None:
    """The split (cls, patches) layout the tower runs its divided blocks in: forward and every
    parameter's gradient in training mode equal transformers' TimesformerModel (fp32)."""
    from megavid.models.timesformer import checkpoint_filter_fn

    hf, ours = _hf_pair("divided_space_time")
    load_video_into(ours, hf.state_dict())
    hf.train()
    ours.train()
    x = torch.randn(2, 3, 3, 32, 32)
    w = torch.randn(2, 1 + 16 * 3, 64)
    ref = hf(x).last_hidden_state
    (ref * w).sum().backward()
    tokens, _ = ours(x)
    (tokens * w).sum().backward()
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)
    ref_grads = checkpoint_filter_fn({n: p.grad for n, p in hf.named_parameters()}, ours)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


def test_split_layout_equals_packed_block_with_drop_path() -> None:
    """A divided block on the split (cls, patches) layout computes what it computes on the
    packed [B, 1+N*T, D] tokens, drop-path masks included (one mask per sample shared by its
    cls and patch rows in the MLP branch, drawn in the same order)."""
    from megavid.models.timesformer import Block

    blk = Block(32, 4, drop_path=0.5).train()
    with torch.no_grad():
        blk.temporal_fc.weight.normal_(0.0, 0.1)
    x = torch.randn(4, 1 + 5 * 3, 32)
    torch.manual_seed(1)
    packed = blk(x, 3)
    torch.manual_seed(1)
    cls, patches = blk((x[:, :1], x[:, 1:]), 3)
    torch.testing.assert_close(torch.cat((cls, patches), dim=1), packed, atol=0, rtol=0)
    # the branches were really dropped (for some samples)
    assert not torch.allclose(packed, blk.eval()(x, 3))


def test_divided_block_copies_little_of_the_token_tensor() -> None:
    """Bytes written by copy ops (clone, cat, stack, copy_, zero-filled slice/select gradients)
    per divided block, forward + backward, counted by a TorchDispatchMode, in units of the token
    tensor [B, 1+N*T, D]. The cls token kept apart from the patches (no slice + cat per block)
    and q/k/v split by unbind (one stacked gradient instead of three zero-filled ones) took this
    from 32.5 to 9.2 token tensors per block; what is left: the spatial frame-major cat and its
    gradient, and the q/k/v gradients stacked into the projections' layout."""
    from torch.utils._python_dispatch import TorchDispatchMode

    copy_ops = {"aten.copy_.default", "aten.cat.default", "aten.stack.default", "aten.clone.default",
                "aten._to_copy.default", "aten.slice_backward.default", "aten.select_backward.default",
                "aten.zeros.default", "aten.new_zeros.default", "aten.zeros_like.default", "aten.fill_.Scalar",
                "aten.zero_.default", "aten.index.Tensor", "aten.expand_copy.default"}

    class CopyBytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func) in copy_ops:
                t = out if isinstance(out, torch.Tensor) else args[0]
                self.total += t.numel() * t.element_size()
            return out

    def copied(depth: int) -> int:
        torch.manual_seed(0)
        m = TimeSformer(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=depth, num_heads=4).train()
        x = torch.randn(2, 4, 3, 32, 32)
        with CopyBytes() as c:
            tokens, _ = m(x)
            tokens.square().sum().backward()
        return c.total

    token_bytes = 2 * (1 + 16 * 4) * 64 * 4
    per_block = (copied(3) - copied(1)) / 2 / token_bytes
    assert per_block < 11, per_block


def test_kernel_impl_is_a_constructor_argument():
    # model.kernel_impl reaches the divided blocks at construction, like attn_impl: the fused
    # block computes what the unfused one does (CPU "auto": the kernels' torch backends).
    pytest.importorskip("megavid.kernels")
    from megavid.models import apply_kernels

    args = dict(img_size=32, patch_size=8, num_frames=3, embed_dim=48, depth=2, num_heads=4)
    plain = TimeSformer(**args).eval()
    fused = TimeSformer(**args, kernel_impl="auto").eval()
    fused.load_state_dict(plain.state_dict())
    assert [b.kernel_impl for b in fused.blocks] == ["auto", "auto"]
    assert [b.kernel_impl for b in plain.blocks] == ["torch", "torch"]
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], plain(x)[0], atol=1e-5, rtol=1e-5)
    assert apply_kernels(fused, "auto")["divided_block"] == 2
    with pytest.raises(ValueError, match="built with kernel_impl='torch'; build the TimeSformer with kernel_impl='auto'"):
        apply_kernels(plain, "auto")
