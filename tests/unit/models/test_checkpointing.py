"""Selective activation checkpointing (``set_grad_checkpointing(every_n, mode)``).

Oracles: the same model without checkpointing (loss and every parameter's gradient, autograd in
fp32), and the bytes autograd saves for backward in one forward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (tensors a checkpointed region would have saved are
recomputed instead, so they never reach the hook).
"""

from __future__ import annotations

import pytest
import torch

from megavid.models import build_model
from megavid.models.timesformer import TimeSformer
from tests.helpers.autograd import saved_tensor_bytes

MODES = ("full", "attention", "mlp")


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    torch.manual_seed(3)  # same MLM masks and VTM negatives on every model
    out = model(*batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}


def test_videolm_modes_same_loss_and_grads_and_save_between_none_and_full(make_cfg, make_batch) -> None:
    cfg = make_cfg(vtm_weight=1.0, mlm_weight=1.0)
    batch = make_batch(cfg, B=3)
    ref = build_model(cfg)
    loss_ref, grads_ref = _loss_and_grads(ref, batch)
    saved = {"none": saved_tensor_bytes(lambda: (torch.manual_seed(3), ref(*batch)))}
    for mode in MODES:
        model = build_model(cfg)
        model.load_state_dict(ref.state_dict())
        model.set_grad_checkpointing(1, mode)
        assert all(b.checkpoint_mode == mode for b in model.video_encoder.blocks)
        assert all(layer.checkpoint_mode == mode for layer in model.text_encoder.layers)
        loss, grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
        for n, g in grads_ref.items():
            if g is None:
                assert grads[n] is None, n
            else:
                torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=n)
        saved[mode] = saved_tensor_bytes(lambda: (torch.manual_seed(3), model(*batch)))
    # selective modes keep part of each block's activations: between full and none
    assert saved["full"] < saved["attention"] < saved["none"], saved
    assert saved["full"] < saved["mlp"] < saved["none"], saved
    # every other block in attention mode saves more than every block in attention mode
    model = build_model(cfg)
    model.set_grad_checkpointing(2, "attention")
    assert [b.checkpoint_mode for b in model.video_encoder.blocks] == ["attention", None]
    assert saved["attention"] < saved_tensor_bytes(lambda: (torch.manual_seed(3), model(*batch))) < saved["none"]


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_timesformer_attention_mode_every_attention_type(attention_type: str) -> None:
    ref = TimeSformer(img_size=32, patch_size=8, num_frames=3, embed_dim=48, depth=2, num_heads=4,
                      attention_type=attention_type)
    ck = TimeSformer(img_size=32, patch_size=8, num_frames=3, embed_dim=48, depth=2, num_heads=4,
                     attention_type=attention_type)
    ck.load_state_dict(ref.state_dict())
    ck.set_grad_checkpointing(1, "attention")
    with torch.no_grad():  # temporal_fc starts at zero: give the temporal branch a gradient path
        for m in (ref, ck):
            for b in m.blocks:
                if hasattr(b, "temporal_fc"):
                    b.temporal_fc.weight.fill_(0.01)
    x = torch.randn(2, 3, 3, 32, 32)
    outs = []
    for m in (ref, ck):
        tokens, _ = m(x)
        tokens.square().mean().backward()
        outs.append(tokens.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    for (n, p), q in zip(ck.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert saved_tensor_bytes(lambda: ck(x)) < saved_tensor_bytes(lambda: ref(x))


def test_unknown_mode_and_fused_divided_block_refused(make_cfg, make_batch) -> None:
    model = build_model(make_cfg())
    with pytest.raises(ValueError, match="unknown checkpointing mode 'attn'"):
        model.set_grad_checkpointing(1, "attn")
    # the fused divided block is one function: only whole-block checkpointing applies to it
    pytest.importorskip("megavid.kernels")
    fused = build_model(make_cfg(kernel_impl="auto"))
    fused.set_grad_checkpointing(1, "mlp")
    video, ids, mask = make_batch(make_cfg(), B=2)
    with pytest.raises(ValueError, match="needs the unfused divided block"):
        fused.encode_video(video)
