"""VideoLM: objectives against hand-computed references, attention paths, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from megavid.errors import ConfigError
from megavid.models import MODEL_REGISTRY, build_model
from megavid.models.attention import attention
from megavid.models.losses import build_mlm_inputs, sample_hard_negatives, vtc_loss
from tests.helpers.autograd import saved_tensor_bytes


def test_sdpa_and_math_attention_agree_with_padding() -> None:
    q, k, v = torch.randn(3, 4, 7, 8), torch.randn(3, 4, 9, 8), torch.randn(3, 4, 9, 8)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    a = attention(q, k, v, mask, impl="sdpa")
    b = attention(q, k, v, mask, impl="math")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # independent check of the masking: batch 2 sees only key 0, so the output is v[:, :, 0]
    torch.testing.assert_close(a[2], v[2, :, :1].expand(4, 7, 8), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_sdpa_and_math_models_agree(make_cfg, make_batch, attention_type: str) -> None:
    cfg_s = make_cfg(vtm_weight=1.0, mlm_weight=0.0, **{"video.attention_type": attention_type})
    cfg_m = make_cfg(vtm_weight=1.0, mlm_weight=0.0, attn_impl="math", **{"video.attention_type": attention_type})
    ms, mm = build_model(cfg_s), build_model(cfg_m)
    mm.load_state_dict(ms.state_dict())
    video, ids, mask = make_batch(cfg_s)
    torch.manual_seed(1)
    a = ms(video, ids, mask)
    torch.manual_seed(1)
    b = mm(video, ids, mask)
    for key in ("loss_vtc", "loss_vtm"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_vtc_loss_matches_hand_computed() -> None:
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor(0.1)
    loss, sim = vtc_loss(v, t, temp)
    # plain-python InfoNCE, both directions
    s = [[sum(float(v[i, d]) * float(t[j, d]) for d in range(8)) / 0.1 for j in range(4)] for i in range(4)]
    v2t = -sum(s[i][i] - math.log(sum(math.exp(x) for x in s[i])) for i in range(4)) / 4
    t2v = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(4))) for j in range(4)) / 4
    assert abs(loss.item() - 0.5 * (v2t + t2v)) < 1e-5
    torch.testing.assert_close(sim, v @ t.t())


def test_vtc_with_gather_scores_the_global_batch() -> None:
    # Simulated 2 ranks: rank 0's gather returns [own, other]. The global loss over 8 pairs
    # must equal the single-process loss on the concatenated batch.
    v = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    temp = torch.tensor(0.07)
    ref, _ = vtc_loss(v, t, temp)
    v0, t0 = v[:4], t[:4]

    def gather(x: torch.Tensor) -> torch.Tensor:  # what rank 0 of 2 receives
        return torch.cat((x, v[4:] if x is v0 else t[4:]))

    loss, sim = vtc_loss(v0, t0, temp, gather)
    torch.testing.assert_close(loss, ref)
    assert sim.shape == (4, 4)  # hard negatives stay local


def test_hard_negatives_exclude_self_and_follow_similarity() -> None:
    torch.manual_seed(0)
    B = 5
    sim = torch.zeros(B, B)
    sim[0, 3] = 1.0  # video 0 looks a lot like text 3; text 0 like video 3 (transposed)
    sim[3, 0] = 1.0
    counts = torch.zeros(B)
    for _ in range(100):
        neg_t, neg_v = sample_hard_negatives(sim, 0.05)
        assert (neg_t != torch.arange(B)).all() and (neg_v != torch.arange(B)).all()
        counts[neg_t[0]] += 1
    # softmax(1/0.05 vs 0) over 4 candidates: text 3 has probability ~1
    assert counts[3] > 95


def test_mlm_masking_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 64), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[:, 50:] = 0
    ids[:, 50:] = 0
    out, labels = build_mlm_inputs(ids, mask, mask_token_id=4, vocab_size=1000, special_ids=(0, 1, 2),
                                   probability=0.15, generator=g)
    chosen = labels != -100
    eligible = (mask.bool()) & (ids > 2)
    assert not (chosen & ~eligible).any()  # never specials or padding
    frac = chosen.sum().item() / eligible.sum().item()
    assert 0.14 < frac < 0.16
    n = chosen.sum().item()
    masked = (out == 4) & chosen
    kept = (out == ids) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.03  # includes the rare random==original
    torch.testing.assert_close(labels[chosen], ids[chosen])
    assert (out[~chosen] == ids[~chosen]).all()


def test_forward_reports_each_enabled_loss_and_weights_them(make_cfg, make_batch) -> None:
    cfg = make_cfg(vtc_weight=1.0, vtm_weight=0.5, mlm_weight=2.0, num_answers=7)
    model = build_model(cfg)
    video, ids, mask = make_batch(cfg)
    answers = torch.tensor([0, 3, 6, 1])
    out = model(video, ids, mask, answer_labels=answers)
    assert {"loss", "loss_vtc", "loss_vtm", "loss_mlm", "loss_qa", "temp"} <= set(out)
    expect = out["loss_vtc"] + 0.5 * out["loss_vtm"] + 2.0 * out["loss_mlm"] + out["loss_qa"]
    torch.testing.assert_close(out["loss"], expect)
    # at init: VTM ~ ln 2, MLM ~ ln(vocab), QA ~ ln(7) (near-uniform heads)
    assert abs(out["loss_vtm"].item() - math.log(2)) < 0.1
    assert abs(out["loss_mlm"].item() - math.log(cfg.text.vocab_size)) < 0.5
    assert abs(out["loss_qa"].item() - math.log(7)) < 0.1
    out["loss"].backward()
    assert model.mlm_head.dense.weight.grad is not None and model.vtm_head.weight.grad is not None
    tokens, feat = model.encode_video(video)
    assert feat.shape == (4, cfg.proj_dim) and torch.allclose(feat.norm(dim=-1), torch.ones(4))
    assert model.qa_logits(tokens, ids, mask).shape == (4, 7)
    # the QA head reads the fused [CLS] state beside the pooled video feature (VTC's pooling)
    with torch.no_grad():
        fused = model.text_encoder(ids, mask, tokens)[:, 0]
        pooled = tokens[:, 1:].mean(1) if cfg.video_pool == "mean" else tokens[:, 0]
        by_hand = model.qa_head[2](model.qa_head[1](
            fused @ model.qa_head[0].weight[:, :fused.shape[1]].T
            + pooled @ model.qa_head[0].weight[:, fused.shape[1]:].T + model.qa_head[0].bias))
        torch.testing.assert_close(model.qa_logits(tokens, ids, mask), by_hand)


def test_mlm_head_is_tied_to_word_embeddings(make_cfg, make_batch) -> None:
    cfg = make_cfg(vtc_weight=0.0, mlm_weight=1.0)
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names)
    video, ids, mask = make_batch(cfg, B=2, L=12)
    model(video, ids, mask)["loss"].backward()
    # the embedding matrix gets gradient from the MLM output projection (rows of predicted
    # words), beyond the rows of the input tokens
    g = model.text_encoder.embeddings.word_embeddings.weight.grad
    unused = sorted(set(range(cfg.text.vocab_size)) - set(ids.flatten().tolist()))
    assert g[unused].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("every_n", [1, 2])
def test_grad_checkpointing_same_loss_and_grads(make_cfg, make_batch, every_n: int) -> None:
    cfg = make_cfg(vtm_weight=1.0, mlm_weight=1.0)
    ref, ckpt = build_model(cfg), build_model(cfg)
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_grad_checkpointing(every_n)
    video, ids, mask = make_batch(cfg, B=3)
    assert not video.requires_grad  # the case the reentrant form gets wrong
    results = []
    for m in (ref, ckpt):
        torch.manual_seed(3)  # same MLM masks and VTM negatives
        out = m(video, ids, mask)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for n, g in results[0][1].items():
        if g is None:
            assert results[1][1][n] is None, n
            continue
        torch.testing.assert_close(results[1][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
    # checkpointing really stores fewer activations
    def forward(m):
        return lambda: (torch.manual_seed(3), m(video, ids, mask)["loss"])

    assert saved_tensor_bytes(forward(ckpt)) < 0.9 * saved_tensor_bytes(forward(ref))


def test_no_weight_decay_names(make_cfg) -> None:
    model = build_model(make_cfg())
    nwd = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert nwd <= set(params)
    assert {"temp", "video_encoder.pos_embed", "video_encoder.time_embed", "video_encoder.cls_token",
            "text_encoder.embeddings.word_embeddings.weight", "vtm_head.bias"} <= nwd
    assert "video_encoder.blocks.0.attn.qkv.weight" not in nwd


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registered_model_forward_backward(make_cfg, make_batch, name: str) -> None:
    cfg = make_cfg(name=name, vtm_weight=1.0, mlm_weight=1.0)
    model = build_model(cfg)
    video, ids, mask = make_batch(cfg, B=3)
    out = model(video, ids, mask)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and "qa_head" not in n]
    assert not no_grad, no_grad


def test_config_mistakes_raise(make_cfg) -> None:
    with pytest.raises(ConfigError, match="unknown model.name"):
        build_model(make_cfg(name="clip4clip"))
    with pytest.raises(ConfigError, match="fusion_layers"):
        build_model(make_cfg(vtm_weight=1.0, **{"text.fusion_layers": 0}))
    with pytest.raises(ConfigError, match="objective"):
        build_model(make_cfg(vtc_weight=0.0))


def test_fused_kernel_path_matches_unfused(make_cfg, make_batch) -> None:
    # model.kernel_impl wires in megavid.kernels (fused LayerNorm, bias+GELU, the fused divided
    # block); on CPU "auto" runs their torch backends: same loss and gradients as the plain path.
    pytest.importorskip("megavid.kernels")
    cfg = make_cfg(vtm_weight=1.0, mlm_weight=1.0)
    ref = build_model(cfg)
    fused = build_model(make_cfg(vtm_weight=1.0, mlm_weight=1.0, kernel_impl="auto"))
    fused.load_state_dict(ref.state_dict())
    assert sum(getattr(b, "kernel_impl", "torch") == "auto" for b in fused.video_encoder.blocks) == cfg.video.depth
    assert type(fused.text_encoder.layers[0].fc1).__name__ == "LinearGELU"
    video, ids, mask = make_batch(cfg, B=3)
    outs = []
    for m in (ref, fused):
        torch.manual_seed(7)
        out = m(video, ids, mask)
        out["loss"].backward()
        outs.append(out)
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"], atol=1e-5, rtol=1e-5)
    g_ref = dict(ref.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n].grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_feature_pooling_options(make_cfg, make_batch, pool: str) -> None:
    """video_pool/text_pool pick the cls outputs or the (masked) token means, computed by hand."""
    torch.manual_seed(0)
    cfg = make_cfg(video_pool=pool, text_pool=pool)
    model = build_model(cfg).eval()
    video, ids, mask = make_batch(cfg)[:3]
    with torch.no_grad():
        tokens, v_feat = model.encode_video(video)
        hidden, t_feat = model.encode_text(ids, mask)
    if pool == "cls":
        v_ref, t_ref = tokens[:, 0], hidden[:, 0]
    else:
        v_ref = tokens[:, 1:].sum(1) / tokens[:, 1:].shape[1]
        m = mask.float()
        t_ref = torch.stack([(hidden[b] * m[b, :, None]).sum(0) / m[b].sum() for b in range(len(ids))])
    torch.testing.assert_close(v_feat, torch.nn.functional.normalize(model.vision_proj(v_ref), dim=-1))
    torch.testing.assert_close(t_feat, torch.nn.functional.normalize(model.text_proj(t_ref), dim=-1))
