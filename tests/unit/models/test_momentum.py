"""Momentum encoders + feature queues for VTC (ALBEF / BLIP): EMA, ring-buffer queue, soft-target
InfoNCE over batch + queue, the off switch, BLIP import of momentum keys, and the engine hook
that runs the EMA once per optimizer step (a real DeepSpeed run)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavid.errors import ConfigError
from megavid.models import build_model
from megavid.models.losses import enqueue_features, vtc_loss_momentum
from megavid.models.videolm import MOMENTUM_PAIRS
from tests.helpers.multiprocess import python_module, run_job


def _momentum_pairs(model):
    for name, name_m in MOMENTUM_PAIRS:
        online, target = getattr(model, name), getattr(model, name_m)
        for (n, p), (n_m, p_m) in zip(online.named_parameters(), target.named_parameters()):
            assert n == n_m
            yield (f"{name}.{n}", p), (f"{name_m}.{n}", p_m)


def test_ema_update_equals_hand_computed_ema_and_momentum_is_not_optimised(make_cfg) -> None:
    from megavid.config import OptimConfig
    from megavid.engine.optim import build_param_groups

    model = build_model(make_cfg(momentum=0.9, queue_size=8))
    # momentum towers start as copies of the online ones (ALBEF copy_params)
    for (n, p), (_, p_m) in _momentum_pairs(model):
        assert torch.equal(p, p_m), n
        assert not p_m.requires_grad
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # stands in for an optimizer step
    before = {n: (p.detach().clone(), p_m.detach().clone()) for (n, p), (_, p_m) in _momentum_pairs(model)}
    model.momentum_update()
    model.momentum_update()  # twice: m2 = 0.81 m0 + 0.19 p
    for (n, p), (_, p_m) in _momentum_pairs(model):
        p0, m0 = before[n]
        torch.testing.assert_close(p_m, 0.81 * m0 + 0.19 * p0, rtol=0, atol=1e-6)
    trained = {id(p) for g in build_param_groups(model, OptimConfig()) for p in g["params"]}
    momentum_ids = {id(p) for _, name_m in MOMENTUM_PAIRS for p in getattr(model, name_m).parameters()}
    online_ids = {id(p) for n, p in model.named_parameters() if n.split(".")[0] not in {m for _, m in MOMENTUM_PAIRS}}
    assert trained == online_ids and not trained & momentum_ids


def test_enqueue_wraps_around_by_hand() -> None:
    Q = 5
    queue = torch.zeros(2, Q)
    ptr = torch.zeros(1, dtype=torch.long)
    f = lambda *vals: torch.tensor([[v, -v] for v in vals], dtype=torch.float)  # noqa: E731
    enqueue_features(queue, ptr, f(1, 2, 3))
    assert queue[0].tolist() == [1, 2, 3, 0, 0] and int(ptr) == 3
    enqueue_features(queue, ptr, f(4, 5, 6))  # 4, 5 at the end, 6 wraps to column 0
    assert queue[0].tolist() == [6, 2, 3, 4, 5] and queue[1].tolist() == [-6, -2, -3, -4, -5]
    assert int(ptr) == 1
    enqueue_features(queue, ptr, f(7, 8, 9, 10, 11, 12, 13))  # more than Q: the last 5, from column 1
    assert queue[0].tolist() == [13, 9, 10, 11, 12] and int(ptr) == 1


@pytest.mark.slow
def test_forward_enqueues_the_momentum_features(make_cfg, make_batch) -> None:
    cfg = make_cfg(momentum=0.995, queue_size=6)
    model = build_model(cfg).train()
    video, ids, mask = make_batch(cfg, B=4)
    with torch.no_grad():
        v_m, t_m = model.encode_momentum(video, ids, mask)
        ref_v, ref_t = model.video_queue.clone(), model.text_queue.clone()
        model(video, ids, mask)
        assert int(model.queue_ptr) == 4
        torch.testing.assert_close(model.video_queue[:, :4], v_m.t())
        torch.testing.assert_close(model.text_queue[:, :4], t_m.t())
        torch.testing.assert_close(model.video_queue[:, 4:], ref_v[:, 4:])
        model(video, ids, mask)  # 2 more at the end, 2 wrap around
        assert int(model.queue_ptr) == 2
        torch.testing.assert_close(model.text_queue[:, [4, 5, 0, 1]], t_m.t())
        model.eval()(video, ids, mask)  # evaluation passes leave the queue alone
        assert int(model.queue_ptr) == 2


def _hand_loss(v, t, v_m, t_m, vq, tq, temp, alpha):
    """Soft-target InfoNCE with python floats: keys = momentum batch features then the queue."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def one_direction(q_online, q_mom, keys):
        total = 0.0
        for i in range(len(q_online)):
            logits = [dot(q_online[i], k) / temp for k in keys]
            logits_m = [dot(q_mom[i], k) / temp for k in keys]
            z, z_m = sum(math.exp(x) for x in logits), sum(math.exp(x) for x in logits_m)
            for j in range(len(keys)):
                target = alpha * math.exp(logits_m[j]) / z_m + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (logits[j] - math.log(z))
        return total / len(q_online)

    text_keys = t_m + [list(c) for c in zip(*tq)]
    video_keys = v_m + [list(c) for c in zip(*vq)]
    return 0.5 * (one_direction(v, v_m, text_keys) + one_direction(t, t_m, video_keys))


def test_loss_with_queue_equals_hand_computed_soft_infonce() -> None:
    s = 1 / math.sqrt(2)
    v = [[1.0, 0.0], [s, s]]
    t = [[0.0, 1.0], [1.0, 0.0]]
    v_m = [[0.6, 0.8], [0.8, 0.6]]
    t_m = [[s, -s], [1.0, 0.0]]
    vq = [[0.0, -1.0, 0.6], [1.0, 0.0, -0.8]]  # [P=2, Q=3] columns are features
    tq = [[-1.0, 0.0, s], [0.0, 1.0, s]]
    temp, alpha = 0.5, 0.4
    T = lambda x: torch.tensor(x, requires_grad=False)  # noqa: E731
    vo, to = T(v).requires_grad_(), T(t).requires_grad_()
    loss, sim, vg, tg = vtc_loss_momentum(vo, to, T(v_m), T(t_m), torch.tensor(temp), alpha, T(vq), T(tq))
    assert loss.item() == pytest.approx(_hand_loss(v, t, v_m, t_m, vq, tq, temp, alpha), rel=1e-5)
    loss.backward()
    assert vo.grad is not None and to.grad is not None
    torch.testing.assert_close(sim, T(v) @ T(t).t())
    assert torch.equal(vg, T(v_m)) and torch.equal(tg, T(t_m))
    # alpha=0 and no queue: plain symmetric InfoNCE against the momentum keys
    loss0, *_ = vtc_loss_momentum(T(v), T(t), T(v), T(t), torch.tensor(temp), 0.0)
    logits = T(v) @ T(t).t() / temp
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.t(), torch.arange(2)))
    torch.testing.assert_close(loss0, ref)


def test_model_vtc_loss_uses_queue_and_momentum_features(make_cfg, make_batch) -> None:
    cfg = make_cfg(momentum=0.9, queue_size=3, distill_alpha=0.3)
    model = build_model(cfg).train()
    with torch.no_grad():  # let online and momentum towers differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    video, ids, mask = make_batch(cfg, B=2)
    vq, tq = model.video_queue.clone(), model.text_queue.clone()
    with torch.no_grad():
        _, v = model.encode_video(video)
        _, t = model.encode_text(ids, mask)
        v_m, t_m = model.encode_momentum(video, ids, mask)
        out = model(video, ids, mask)
    ref = _hand_loss(v.tolist(), t.tolist(), v_m.tolist(), t_m.tolist(), vq.tolist(), tq.tolist(),
                     float(model.get_temperature().detach()), 0.3)
    assert out["loss_vtc"].item() == pytest.approx(ref, rel=1e-4)


def test_momentum_off_is_unchanged(make_cfg, make_batch) -> None:
    cfg = make_cfg(vtm_weight=1.0, mlm_weight=1.0)
    assert cfg.momentum == 0.0 and cfg.queue_size == 0
    torch.manual_seed(3)
    off = build_model(cfg).eval()
    assert not any(k.endswith("_queue") or "_m." in k for k in off.state_dict())
    video, ids, mask = make_batch(cfg, B=3)
    with torch.no_grad():
        _, v = off.encode_video(video)
        _, t = off.encode_text(ids, mask)
        torch.manual_seed(5)
        out = off(video, ids, mask)
    # the plain symmetric InfoNCE, written out
    logits = v @ t.t() / off.get_temperature()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    torch.testing.assert_close(out["loss_vtc"], ref)
    # the same online weights with momentum on, alpha=0, no queue: momentum == online at start, so
    # every loss (VTM/MLM draw the same random numbers) is the same as without momentum
    torch.manual_seed(3)
    on = build_model(make_cfg(vtm_weight=1.0, mlm_weight=1.0, momentum=0.5, distill_alpha=0.0)).eval()
    for (n, p), (n2, p2) in zip(off.named_parameters(), on.named_parameters()):
        assert n == n2 and torch.equal(p, p2)
    with torch.no_grad():
        torch.manual_seed(5)
        out_on = on(video, ids, mask)
    for k in ("loss_vtc", "loss_vtm", "loss_mlm", "loss"):
        torch.testing.assert_close(out_on[k], out[k], rtol=1e-6, atol=1e-6)


def test_fp32_momentum_state_under_bf16_and_state_dict_round_trips(make_cfg, make_batch) -> None:
    cfg = make_cfg(momentum=0.995, queue_size=4)
    model = build_model(cfg).bfloat16()  # what DeepSpeed's bf16 mode does to the module
    assert model.video_encoder.cls_token.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, n in MOMENTUM_PAIRS for p in getattr(model, n).parameters())
    assert model.video_queue.dtype == torch.float32
    m_before = model.video_encoder_m.cls_token.clone()
    with torch.no_grad():
        model.video_encoder.cls_token.add_(1.0)
    model.momentum_update()
    # a 0.005 step survives in fp32 (in bf16 it would round away)
    torch.testing.assert_close(model.video_encoder_m.cls_token - m_before,
                               0.005 * (model.video_encoder.cls_token.float() - m_before), rtol=1e-3, atol=1e-6)
    video, ids, mask = make_batch(cfg, B=2)
    out = model.train()(video.bfloat16(), ids, mask)
    assert torch.isfinite(out["loss"])
    # without momentum a momentum checkpoint loads (its momentum state dropped) ...
    plain = build_model(make_cfg())
    plain.load_state_dict(build_model(cfg).state_dict(), strict=True)
    # ... and a plain checkpoint loads into a momentum model, momentum towers = its online weights
    mom = build_model(cfg)
    mom.load_state_dict(plain.state_dict(), strict=True)
    plain_params = dict(plain.named_parameters())
    for (n, p), (_, p_m) in _momentum_pairs(mom):
        assert torch.equal(p, p_m) and torch.equal(p_m, plain_params[n]), n


def test_bad_momentum_configs_raise(make_cfg) -> None:
    with pytest.raises(ConfigError, match="queue_size"):
        build_model(make_cfg(queue_size=8))
    with pytest.raises(ConfigError, match="momentum"):
        build_model(make_cfg(momentum=1.0))
    with pytest.raises(ConfigError, match="distill_alpha"):
        build_model(make_cfg(momentum=0.9, distill_alpha=1.5))


@pytest.mark.slow
def test_blip_import_loads_momentum_towers_and_queues(make_cfg) -> None:
    from test_weights_blip import _alpro_style_checkpoint

    from megavid.models.weights import load_blip_alpro_into

    cfg = make_cfg(mlm_weight=1.0, vtm_weight=1.0, momentum=0.995, queue_size=8, **{"video.embed_dim": 32})
    sd, _ = _alpro_style_checkpoint(cfg)
    del sd["text_encoder_m.bert.embeddings.word_embeddings.weight"]  # the helper's placeholder
    # BLIP keeps a full second copy of each tower under *_m (here perturbed, to tell them apart)
    for k in [k for k in sd if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))]:
        head, rest = k.split(".", 1)
        sd[f"{head}_m.{rest}"] = sd[k] + 1.0
    sd["video_queue"] = torch.randn(cfg.proj_dim, 8)
    sd["text_queue"] = torch.randn(cfg.proj_dim, 8)
    sd["queue_ptr"] = torch.tensor([5])
    sd["idx_queue"] = torch.zeros(1, 8)
    model = build_model(cfg)
    report = load_blip_alpro_into(model, sd)
    # the helper's text encoder (BertForMaskedLM) has no pooler: reported, kept at init
    assert report.missing == [f"{t}.pooler.{k}" for t in ("text_encoder", "text_encoder_m") for k in ("bias", "weight")]
    assert not report.unexpected
    torch.testing.assert_close(model.video_encoder_m.blocks[0].temporal_fc.weight,
                               sd["visual_encoder_m.model.blocks.0.temporal_fc.weight"])
    torch.testing.assert_close(model.text_encoder_m.embeddings.word_embeddings.weight,
                               sd["text_encoder_m.bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(model.vision_proj_m.weight, sd["vision_proj_m.weight"])
    torch.testing.assert_close(model.video_queue, sd["video_queue"])
    torch.testing.assert_close(model.text_queue, sd["text_queue"])
    assert int(model.queue_ptr) == 5 and "idx_queue" in report.ignored
    # ALPRO (no momentum towers) into a momentum model with another queue size: towers copied
    # from the loaded online weights, queue kept at init
    sd2, _ = _alpro_style_checkpoint(cfg)
    del sd2["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    sd2["video_queue"] = torch.zeros(cfg.proj_dim, 3)
    model2 = build_model(cfg)
    init_queue = model2.video_queue.clone()
    load_blip_alpro_into(model2, sd2)
    torch.testing.assert_close(model2.vision_proj_m.weight, sd2["vision_proj.weight"])
    for (n, p), (_, p_m) in _momentum_pairs(model2):
        assert torch.equal(p, p_m), n
    assert torch.equal(model2.video_queue, init_queue)



@pytest.mark.slow
def test_engine_runs_ema_once_per_optimizer_step(tmp_path) -> None:
    """A real DeepSpeed ZeRO-2 run with grad_accum=2: the saved momentum towers equal the EMA of
    the saved online weights after each optimizer step (not after each micro-batch)."""
    over = [
        "model=timesformer_tiny", "data.name=synthetic", "task.name=pretrain", "run.name=mom",
        f"run.output_dir={tmp_path}", "model.video.img_size=32", "model.video.num_frames=2",
        "model.video.depth=1", "model.video.embed_dim=32", "model.text.hidden_size=32",
        "model.text.num_layers=2", "model.text.fusion_layers=1", "model.text.intermediate_size=64",
        "model.proj_dim=16", "model.momentum=0.5", "model.queue_size=16",
        "data.img_size=32", "data.num_frames=2", "data.batch_size=4", "data.max_text_len=16",
        "train.zero_stage=2", "train.precision=fp32", "train.grad_accum=2", "train.max_steps=2",
        "train.ckpt_every=1", "train.keep_last=3", "train.tensorboard=false", "optim.lr=1e-2",
        "optim.warmup_steps=0", "run.seed=7",
    ]
    proc = run_job(python_module("megavid.cli", "pretrain", *over, "--overwrite"), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ckpt = tmp_path / "mom" / "checkpoints"

    def module_state(step: int) -> dict:
        path = ckpt / f"step_{step}" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]

    s1, s2 = module_state(1), module_state(2)
    # the initial weights: the trainer seeds with run.seed before building the model
    from megavid.config import compose
    from megavid.engine.trainer import seed_everything

    seed_everything(7)
    s0 = build_model(compose(over).model).state_dict()
    # queue: 2 steps x 2 micro-batches x 4 samples, wrapped around a 16-slot queue
    assert int(s2["queue_ptr"]) == 0 and int(s1["queue_ptr"]) == 8
    keys = [k for k in s0 if k.startswith(tuple(f"{m}." for _, m in MOMENTUM_PAIRS))]
    assert keys
    moved = 0
    for k_m in keys:
        k = k_m.replace("_m.", ".", 1)
        p0, p1, p2 = s0[k], s1[k], s2[k]
        torch.testing.assert_close(s1[k_m], 0.5 * p0 + 0.5 * p1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2[k_m], 0.25 * p0 + 0.25 * p1 + 0.5 * p2, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(p0, p2))
    assert moved > len(keys) // 2  # the online weights did train


def test_momentum_flops_within_5_percent_of_flop_counter(make_cfg, make_batch) -> None:
    """The momentum towers add one forward of both towers per sample to the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = make_cfg(attn_impl="math", momentum=0.9)  # math: the counter sees attention matmuls
    model = build_model(cfg)
    B, L = 3, 16
    video, ids, mask = make_batch(cfg, B=B, L=L)
    with FlopCounterMode(display=False) as fc:
        model.encode_momentum(video, ids, mask)
    off = build_model(make_cfg(attn_impl="math"))
    extra = model.flops_per_sample(text_len=L) - off.flops_per_sample(text_len=L)
    assert extra == pytest.approx(fc.get_total_flops() / B, rel=0.05)
