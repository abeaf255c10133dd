"""VideoLM: TimeSformer video tower + BERT text/fusion tower with VTC, VTM, MLM and QA heads.

The pretraining recipe of ALPRO (Li et al., "Align and Prompt: Video-and-Language Pre-training
with Entity Prompts", CVPR 2022) without prompts, equivalently ALBEF/BLIP on video:

- VTC: video cls and text cls are projected to ``proj_dim``, L2-normalised and contrasted with
  a symmetric InfoNCE at a learnable temperature (clamped to [1e-3, 0.5]);
- VTM: the fusion layers score (text, video) pairs as match / no match; each positive pair gets
  a hard negative video and a hard negative text drawn from the VTC similarities;
- MLM: 15% of the tokens are masked (80/10/10) and predicted from the fusion output by a head
  whose output matrix is the word embedding matrix (tied);
- QA: answer classification over ``num_answers`` from the fused cls state.

Optional momentum distillation (ALBEF, Li et al. NeurIPS 2021; BLIP): with ``model.momentum >
0`` the model keeps EMA copies of both towers and projections (``*_m``, never optimised) that
give VTC soft targets, and with ``model.queue_size > 0`` ring buffers of past momentum features
serve as extra negatives. The EMA runs in :meth:`VideoLM.momentum_update`, which the engine
calls after each optimizer step (``task.after_step``); the copies and queues stay fp32 whatever
the training dtype, because an EMA step of (1 - 0.995) x delta vanishes in bf16 rounding.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megavid.errors import ConfigError
from megavid.models.attention import build_layer_norm
from megavid.models.bert import BertTextFusion, build_bert
from megavid.models.losses import (
    TEMP_MAX,
    TEMP_MIN,
    Gather,
    build_mlm_inputs,
    enqueue_features,
    sample_hard_negatives,
    vtc_loss,
    vtc_loss_momentum,
)
from megavid.models.timesformer import TimeSformer, build_timesformer

log = logging.getLogger(__name__)

# Online module -> its momentum copy (BLIP / ALBEF names), and the queue buffers.
MOMENTUM_PAIRS = (("video_encoder", "video_encoder_m"), ("text_encoder", "text_encoder_m"),
                  ("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m"))
QUEUE_KEYS = ("video_queue", "text_queue", "queue_ptr")


class MlmHead(nn.Module):
    """BERT LM head: dense -> GELU -> LayerNorm -> tied word-embedding projection + bias."""

    def __init__(self, hidden: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = build_layer_norm(hidden, eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x_NH: torch.Tensor, word_embeddings_VH: torch.Tensor) -> torch.Tensor:
        # The decoder weight is the embedding matrix passed in, not a second parameter, so the
        # tie survives state-dict round trips and ZeRO-3 partitioning.
        return F.linear(self.norm(F.gelu(self.dense(x_NH))), word_embeddings_VH, self.bias)


class VideoLM(nn.Module):
    """The combined video-language model.

    Args:
        model_cfg: a ``ModelConfig`` (sizes, objectives and their weights, special token ids).
    """

    def __init__(self, model_cfg: Any) -> None:
        super().__init__()
        cfg = model_cfg
        if cfg.vtc_weight <= 0 and cfg.vtm_weight <= 0 and cfg.mlm_weight <= 0 and cfg.num_answers <= 0:
            raise ConfigError(
                "every objective is off (model.vtc_weight, vtm_weight, mlm_weight are 0 and "
                "model.num_answers is 0); set e.g. model.vtc_weight=1"
            )
        if (cfg.vtm_weight > 0 or cfg.mlm_weight > 0 or cfg.num_answers > 0) and cfg.text.fusion_layers == 0:
            raise ConfigError(
                "VTM, MLM and QA need fusion layers but model.text.fusion_layers=0; "
                "set model.text.fusion_layers>0 or turn those objectives off"
            )
        if cfg.text.fusion_layers == cfg.text.num_layers and cfg.vtc_weight > 0:
            raise ConfigError(
                f"VTC needs text-only layers but model.text.fusion_layers equals num_layers="
                f"{cfg.text.num_layers}; lower model.text.fusion_layers"
            )
        self.vtc_weight = cfg.vtc_weight
        self.vtm_weight = cfg.vtm_weight
        self.mlm_weight = cfg.mlm_weight
        self.qa_weight = cfg.qa_weight
        self.mlm_probability = cfg.mlm_probability
        self.mask_token_id = cfg.mask_token_id
        self.special_ids = (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id)
        self.video_encoder: TimeSformer = build_timesformer(cfg.video, cfg.attn_impl, cfg.kernel_impl)
        self.text_encoder: BertTextFusion = build_bert(cfg.text, cfg.video.embed_dim, cfg.attn_impl)
        Dv, Dt, P = cfg.video.embed_dim, cfg.text.hidden_size, cfg.proj_dim
        self.vision_proj = nn.Linear(Dv, P)
        self.text_proj = nn.Linear(Dt, P)
        self.text_pool = cfg.text_pool
        self.video_pool = cfg.video_pool
        # shape [1], not a 0-dim scalar: DeepSpeed's bf16 broadcast views params as bytes
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temperature)))
        # Heads are built whatever the loss weights, so that checkpoints have one layout across
        # pretraining, finetuning and evaluation (eval reranks with the VTM head).
        self.vtm_head = nn.Linear(Dt, 2)
        self.mlm_head = MlmHead(Dt, cfg.text.vocab_size, cfg.text.layer_norm_eps)
        self.num_answers = cfg.num_answers
        if cfg.num_answers > 0:
            # Input: the fused [CLS] state (the question read against the video) concatenated
            # with the pooled video feature (the VTC pooling of the same tokens). The pooled
            # feature gives the video tower a direct gradient, as a classifier on the clip has:
            # through cross-attention alone the tiny model learnt colour but, in 2 of 3 seeds,
            # not motion direction within 400 steps (tests/integration/test_tasks.py).
            self.qa_head = nn.Sequential(nn.Linear(Dt + Dv, 2 * Dt), nn.GELU(), nn.Linear(2 * Dt, cfg.num_answers))
        for m in [self.vision_proj, self.text_proj, self.vtm_head, self.mlm_head.dense] + (
            [self.qa_head[0], self.qa_head[2]] if cfg.num_answers > 0 else []
        ):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self._build_momentum(cfg)

    def _build_momentum(self, cfg: Any) -> None:
        momentum, queue_size, alpha = float(cfg.momentum), int(cfg.queue_size), float(cfg.distill_alpha)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"model.momentum={momentum} must be in [0, 1) (0: off; 0.995 is typical)")
        if queue_size < 0 or (queue_size > 0 and momentum == 0.0):
            raise ConfigError(
                f"model.queue_size={queue_size} needs model.momentum > 0 (the queue holds momentum "
                "features); set model.momentum=0.995 or model.queue_size=0"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"model.distill_alpha={alpha} must be in [0, 1]")
        if momentum > 0 and cfg.vtc_weight <= 0:
            raise ConfigError("model.momentum only serves VTC but model.vtc_weight=0; set model.momentum=0")
        self.momentum, self.queue_size, self.distill_alpha = momentum, queue_size, alpha
        self.register_load_state_dict_pre_hook(_adapt_momentum_keys)
        if momentum == 0.0:
            return
        # ALBEF's copy_params: the momentum towers start equal to the online ones.
        for name, name_m in MOMENTUM_PAIRS:
            module_m = copy.deepcopy(getattr(self, name))
            for p in module_m.parameters():
                p.requires_grad_(False)  # never optimised: excluded from the param groups
            setattr(self, name_m, module_m)
        if queue_size > 0:
            # Random unit vectors as the first negatives, as ALBEF/BLIP initialise their queues.
            P = cfg.proj_dim
            self.register_buffer("video_queue", F.normalize(torch.randn(P, queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(P, queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- towers ---------------------------------------------------------------------------------
    def encode_video(self, video_BTCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            video_BTCHW: normalised float clips.

        Returns:
            (tokens [B, 1 + N*T, Dv], projected L2-normalised feature [B, proj_dim]).
        """
        tokens, pooled = self.video_encoder(video_BTCHW)
        return tokens, F.normalize(self.vision_proj(self._pool_video(tokens, pooled)), dim=-1)

    def _pool_video(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # "mean": the mean of the patch tokens (after temporal attention), "cls": the cls output
        return tokens[:, 1:].mean(dim=1) if self.video_pool == "mean" else pooled

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            input_ids: [B, L] token ids.
            attention_mask: [B, L], 1 for real tokens.

        Returns:
            (text-layer hidden states [B, L, Dt], projected normalised cls feature [B, proj_dim]).
        """
        hidden = self.text_encoder.forward_text(input_ids, attention_mask)
        return hidden, F.normalize(self.text_proj(self._pool_text(hidden, attention_mask)), dim=-1)

    def _pool_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_pool == "mean":
            # masked mean over real tokens: MiniLM's own pooling, and a feature that differs
            # between sentences from the first step (a randomly initialised post-LN BERT's
            # [CLS] output is nearly the same for every sentence, and VTC then collapses)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return hidden[:, 0]

    def fuse(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, video_tokens: torch.Tensor) -> torch.Tensor:
        """Fusion layers: text hidden states cross-attending to video tokens -> [B, L, Dt]."""
        return self.text_encoder.forward_fusion(text_hidden, attention_mask, video_tokens)

    def vtm_logits(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, video_tokens: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match) of paired texts and videos.

        Args:
            text_hidden: output of :meth:`encode_text` [B, L, Dt].
            attention_mask: [B, L].
            video_tokens: output of :meth:`encode_video` [B, S, Dv].
        """
        return self.vtm_head(self.fuse(text_hidden, attention_mask, video_tokens)[:, 0])

    def qa_logits(self, video_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Answer logits [B, num_answers] of questions about videos (needs num_answers > 0)."""
        if self.num_answers <= 0:
            raise ConfigError("the model has no QA head; set model.num_answers to the answer vocabulary size")
        hidden = self.text_encoder.forward_text(input_ids, attention_mask)
        return self._qa_head_logits(hidden, attention_mask, video_tokens)

    def _qa_head_logits(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
                        video_tokens: torch.Tensor) -> torch.Tensor:
        fused_cls = self.fuse(text_hidden, attention_mask, video_tokens)[:, 0]
        video = self._pool_video(video_tokens, video_tokens[:, 0]).to(fused_cls.dtype)
        return self.qa_head(torch.cat([fused_cls, video], dim=-1))

    # -- momentum distillation -----------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> "VideoLM":
        # .bfloat16()/.half()/.to(dtype) (DeepSpeed casts the module at initialize) cast every
        # floating tensor; the EMA state is put back to fp32 so that small updates survive.
        super()._apply(fn, recurse)
        if getattr(self, "momentum", 0.0) > 0:
            for t in self._momentum_tensors():
                if t.is_floating_point() and t.dtype != torch.float32:
                    t.data = t.data.float()
        return self

    def _momentum_tensors(self) -> list[torch.Tensor]:
        out = [p for _, name_m in MOMENTUM_PAIRS for p in getattr(self, name_m).parameters()]
        out += [getattr(self, name_m).get_buffer(n) for _, name_m in MOMENTUM_PAIRS
                for n, _ in getattr(self, name_m).named_buffers()]
        if self.queue_size > 0:
            out += [self.video_queue, self.text_queue]
        return out

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step of the momentum towers: ``p_m = m * p_m + (1 - m) * p`` (no-op when off).

        Called by the engine after every optimizer step (``task.after_step``), so the momentum
        model trails the weights the optimizer just produced.
        """
        if self.momentum <= 0:
            return
        m = self.momentum
        for name, name_m in MOMENTUM_PAIRS:
            online, target = getattr(self, name), getattr(self, name_m)
            for (n, p), p_m in zip(online.named_parameters(), target.parameters()):
                if p.shape != p_m.shape or (p.numel() == 0 and p_m.numel() == 0):
                    # ZeRO-3 leaves empty placeholders between forward passes: nothing to average.
                    raise ConfigError(
                        f"model.momentum needs whole parameters but {name}.{n} is partitioned "
                        f"({tuple(p.shape)}); use train.zero_stage<=2 or model.momentum=0"
                    )
                p_m.mul_(m).add_(p.detach().to(p_m.dtype), alpha=1.0 - m)

    @torch.no_grad()
    def encode_momentum(
        self, video_BTCHW: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised momentum features (video [B, P], text [B, P]) in fp32, without grad."""
        # On CUDA the fp32 EMA weights compute at the batch's precision (autocast) like the
        # online towers; on CPU autocast bf16 measured 2.4x slower than plain fp32 (demo model,
        # B=32: 3.0 s vs 1.25 s), so the CPU runs the momentum towers in fp32.
        low = video_BTCHW.dtype in (torch.bfloat16, torch.float16)
        ctx = (torch.autocast("cuda", dtype=video_BTCHW.dtype)
               if low and video_BTCHW.device.type == "cuda" else nullcontext())
        with ctx:
            tokens_m, pooled = self.video_encoder_m(video_BTCHW.float())
            v_feat = F.normalize(self.vision_proj_m(self._pool_video(tokens_m, pooled)).float(), dim=-1)
            hidden = self.text_encoder_m.forward_text(input_ids, attention_mask)
            t_feat = F.normalize(self.text_proj_m(self._pool_text(hidden, attention_mask)).float(), dim=-1)
        return v_feat, t_feat

    def get_temperature(self) -> torch.Tensor:
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)[0]

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        video: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        gather: Gather | None = None,
        answer_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted sum of the enabled objectives.

        Args:
            video: normalised clips [B, T, C, H, W].
            input_ids: [B, L] (for QA: the question).
            attention_mask: [B, L].
            gather: all-gather-with-grad across ranks for VTC (None: local batch only).
            answer_labels: [B] answer indices; adds ``loss_qa`` when the model has a QA head.

        Returns:
            {"loss", "loss_<name>" per enabled objective, "temp"}.
        """
        out: dict[str, torch.Tensor] = {}
        total = video.new_zeros(())
        tokens, v_feat = self.encode_video(video)
        need_text = self.vtc_weight > 0 or self.vtm_weight > 0 or answer_labels is not None
        if need_text:
            t_hidden, t_feat = self.encode_text(input_ids, attention_mask)
        temp = self.get_temperature()
        sim = None
        if self.momentum > 0:
            v_feat_m, t_feat_m = self.encode_momentum(video, input_ids, attention_mask)
            use_queue = self.queue_size > 0
            loss_vtc, sim, v_m_all, t_m_all = vtc_loss_momentum(
                v_feat, t_feat, v_feat_m, t_feat_m, temp, self.distill_alpha,
                self.video_queue if use_queue else None, self.text_queue if use_queue else None, gather,
            )
            if use_queue and self.training:
                # after the loss: the batch's own features must not be their own negatives
                enqueue_features(self.video_queue, self.queue_ptr.clone(), v_m_all)
                enqueue_features(self.text_queue, self.queue_ptr, t_m_all)
            out["loss_vtc"] = loss_vtc
            total = total + self.vtc_weight * loss_vtc
        elif self.vtc_weight > 0 or self.vtm_weight > 0:
            loss_vtc, sim = vtc_loss(v_feat, t_feat, temp, gather)
            if self.vtc_weight > 0:
                out["loss_vtc"] = loss_vtc
                total = total + self.vtc_weight * loss_vtc
        if self.vtm_weight > 0:
            loss_vtm = self._vtm_loss(tokens, t_hidden, attention_mask, sim, temp)
            out["loss_vtm"] = loss_vtm
            total = total + self.vtm_weight * loss_vtm
        if self.mlm_weight > 0:
            loss_mlm = self._mlm_loss(tokens, input_ids, attention_mask)
            out["loss_mlm"] = loss_mlm
            total = total + self.mlm_weight * loss_mlm
        if answer_labels is not None and self.num_answers > 0:
            logits = self._qa_head_logits(t_hidden, attention_mask, tokens)
            loss_qa = F.cross_entropy(logits.float(), answer_labels)
            out["loss_qa"] = loss_qa
            total = total + self.qa_weight * loss_qa
        out["loss"] = total
        out["temp"] = temp.detach()
        return out

    def _vtm_loss(
        self, tokens: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor, sim: torch.Tensor, temp: torch.Tensor
    ) -> torch.Tensor:
        B = tokens.shape[0]
        if B < 2:
            # No negatives in a batch of one: contribute zero but keep the graph connected.
            return self.vtm_head(t_hidden[:, 0]).sum() * 0.0
        neg_text, neg_video = sample_hard_negatives(sim, temp.detach())
        # Rows: B positive pairs, B (text i, hard negative video), B (hard negative text, video i).
        video_all = torch.cat((tokens, tokens[neg_video], tokens), dim=0)
        text_all = torch.cat((t_hidden, t_hidden, t_hidden[neg_text]), dim=0)
        mask_all = torch.cat((mask, mask, mask[neg_text]), dim=0)
        logits = self.vtm_logits(text_all, mask_all, video_all)
        labels = torch.cat((torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long))).to(tokens.device)
        return F.cross_entropy(logits.float(), labels)

    def _mlm_loss(self, tokens: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, labels = build_mlm_inputs(
            input_ids, mask, mask_token_id=self.mask_token_id, vocab_size=self.text_encoder.vocab_size,
            special_ids=self.special_ids, probability=self.mlm_probability,
        )
        hidden = self.fuse(self.text_encoder.forward_text(ids, mask), mask, tokens)
        sel = labels != -100
        if not bool(sel.any()):
            return hidden.sum() * 0.0
        # Only masked positions go through the vocabulary projection (the costliest GEMM).
        logits = self.mlm_head(hidden[sel], self.text_encoder.embeddings.word_embeddings.weight)
        return F.cross_entropy(logits.float(), labels[sel])

    # -- engine hooks ---------------------------------------------------------------------------
    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        """Non-reentrant activation checkpointing of every ``every_n``-th block in both towers
        (0: off); ``mode`` picks what those blocks recompute ("full", "attention", "mlp").
        The momentum towers run without grad and are never checkpointed."""
        self.video_encoder.set_grad_checkpointing(every_n, mode=mode)
        self.text_encoder.set_grad_checkpointing(every_n, mode=mode)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay: biases, norms, embeddings, temperature."""
        return {
            n for n, p in self.named_parameters()
            if p.ndim < 2 or "embed" in n or n in ("temp", "video_encoder.cls_token")
        }

    def flops_per_sample(self, text_len: int = 32) -> float:
        """Analytic training FLOPs (forward + backward) per sample; see megavid.models.flops.

        Args:
            text_len: padded text length L of the batches (``data.max_text_len``).
        """
        from megavid.models.flops import bert_forward_flops, timesformer_forward_flops, videolm_train_flops

        flops = videolm_train_flops(self, text_len)
        if self.momentum > 0:
            # the momentum towers run forward only (no backward) on every sample
            P = self.vision_proj.out_features
            flops += timesformer_forward_flops(self.video_encoder)[0] + 2.0 * self.video_encoder.embed_dim * P
            flops += bert_forward_flops(self.text_encoder, text_len, text=True)
            flops += 2.0 * self.text_encoder.hidden_size * P
        return flops


def _adapt_momentum_keys(module: VideoLM, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: makes momentum state optional in checkpoints, both ways.

    Without momentum, a checkpoint's momentum towers and queues (a momentum-pretrained model
    being finetuned) are dropped. With momentum, a checkpoint saved without it gets momentum
    towers copied from its online weights and keeps the freshly initialised queues, as ALBEF
    starts its momentum model. Both are logged.
    """
    if module.momentum <= 0:
        names = tuple(f"{prefix}{m}." for _, m in MOMENTUM_PAIRS)
        dropped = [k for k in state_dict if k.startswith(names) or k in {prefix + q for q in QUEUE_KEYS}]
        for k in dropped:
            del state_dict[k]
        if dropped:
            log.warning("model.momentum=0: %d momentum tensors of the checkpoint are not used", len(dropped))
        return
    filled = 0
    for name, name_m in MOMENTUM_PAIRS:
        src, dst = f"{prefix}{name}.", f"{prefix}{name_m}."
        if any(k.startswith(dst) for k in state_dict):
            continue
        for k in [k for k in state_dict if k.startswith(src)]:
            state_dict[dst + k[len(src):]] = state_dict[k]
            filled += 1
    if module.queue_size > 0:
        for k in QUEUE_KEYS:
            if prefix + k not in state_dict:
                state_dict[prefix + k] = getattr(module, k).detach().clone()
                filled += 1
    if filled:
        log.warning("checkpoint has no momentum state: %d momentum tensors copied from the online "
                    "weights (queues kept at init)", filled)
