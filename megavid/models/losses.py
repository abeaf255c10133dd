"""Video-text losses: contrastive (VTC), matching with hard negatives (VTM), masked LM (MLM).

Cross-rank gathering: the models never import torch.distributed. The engine passes a
``gather`` callable that all-gathers a tensor along dim 0 across ranks *with gradient* (whose
backward sums the incoming gradients, as ``torch.distributed.nn.functional.all_gather`` does).
:func:`vtc_loss` then scores the full gathered batch on every rank: every rank computes the same
global loss, the gather's backward hands each rank ``world_size`` times the gradient of its own
samples, and the engine's gradient averaging divides that back, so the update equals the
single-process update on the global batch. This needs no rank index inside the model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]

TEMP_MIN, TEMP_MAX = 1e-3, 0.5


def vtc_loss(
    video_feat_BP: torch.Tensor,
    text_feat_BP: torch.Tensor,
    temp: torch.Tensor,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between L2-normalised video and text features.

    Args:
        video_feat_BP: [B, P] normalised video features (local batch).
        text_feat_BP: [B, P] normalised text features (pair i <-> i).
        temp: scalar temperature (already clamped).
        gather: optional all-gather-with-grad across ranks (see module docstring).

    Returns:
        (loss, local video->text similarity [B, B] without temperature, detached), the latter
        for VTM hard-negative sampling.
    """
    # fp32 logits: in pure bf16 runs the similarities differ by less than bf16's resolution.
    v, t = video_feat_BP.float(), text_feat_BP.float()
    if gather is not None:
        v, t = gather(v), gather(t)
    logits_v2t = v @ t.t() / temp
    targets = torch.arange(v.shape[0], device=v.device)
    loss = 0.5 * (F.cross_entropy(logits_v2t, targets) + F.cross_entropy(logits_v2t.t(), targets))
    with torch.no_grad():
        sim_local = video_feat_BP.float() @ text_feat_BP.float().t()
    return loss, sim_local


def sample_hard_negatives(sim_v2t_BB: torch.Tensor, temp: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one hard negative per row and per column from VTC similarities (ALBEF/ALPRO).

    Negatives are drawn from ``softmax(sim / temp)`` with the positive (diagonal) excluded, so a
    more similar wrong pair is more likely to be chosen.

    Args:
        sim_v2t_BB: [B, B] video->text similarities (B >= 2).
        temp: temperature.

    Returns:
        (negative text index per video [B], negative video index per text [B]).
    """
    with torch.no_grad():
        B = sim_v2t_BB.shape[0]
        eye = torch.eye(B, dtype=torch.bool, device=sim_v2t_BB.device)
        s = (sim_v2t_BB.float() / temp).masked_fill(eye, float("-inf"))
        w_v2t = s.softmax(dim=1)
        w_t2v = s.t().softmax(dim=1)
        # Guard against NaN/inf (e.g. a non-finite step): fall back to uniform over negatives.
        for w in (w_v2t, w_t2v):
            bad = ~torch.isfinite(w).all(dim=1)
            if bad.any():
                w[bad] = (~eye[bad]).float() / (B - 1)
        neg_text = torch.multinomial(w_v2t, 1).squeeze(1)
        neg_video = torch.multinomial(w_t2v, 1).squeeze(1)
    return neg_text, neg_video


def build_mlm_inputs(
    input_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the real, non-special tokens; of those 80%
    become [MASK], 10% a random token, 10% stay.

    Args:
        input_ids_BL: token ids.
        attention_mask_BL: 1 for real tokens.
        mask_token_id: the tokenizer's [MASK] id.
        vocab_size: size of the vocabulary for random replacement.
        special_ids: ids never masked ([CLS], [SEP], [PAD]).
        probability: fraction of eligible tokens to predict.
        generator: optional RNG (on the ids' device) for reproducible masks.

    Returns:
        (masked ids, labels with -100 where nothing is predicted).
    """
    dev = input_ids_BL.device
    eligible = attention_mask_BL.bool()
    for sid in special_ids:
        eligible &= input_ids_BL != sid

    def rand() -> torch.Tensor:
        return torch.rand(input_ids_BL.shape, device=dev, generator=generator)

    chosen = (rand() < probability) & eligible
    labels = torch.where(chosen, input_ids_BL, torch.full_like(input_ids_BL, -100))
    r = rand()
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, input_ids_BL.shape, device=dev, generator=generator)
    ids = torch.where(to_mask, torch.full_like(input_ids_BL, mask_token_id), input_ids_BL)
    ids = torch.where(to_random, random_ids, ids)
    return ids, labels


def vtc_loss_momentum(
    video_feat_BP: torch.Tensor,
    text_feat_BP: torch.Tensor,
    video_feat_m_BP: torch.Tensor,
    text_feat_m_BP: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    video_queue_PQ: torch.Tensor | None = None,
    text_queue_PQ: torch.Tensor | None = None,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VTC with momentum distillation and a feature queue (ALBEF ``ita`` loss / BLIP).

    Each online feature is contrasted against the momentum features of the batch followed by
    the queue; its target is ``alpha * softmax(momentum similarities / temp) + (1 - alpha) *
    one-hot``, and the loss is the soft-target cross-entropy, averaged over both directions.

    Args:
        video_feat_BP: [B, P] normalised online video features (local batch, with grad).
        text_feat_BP: [B, P] normalised online text features.
        video_feat_m_BP: [B, P] normalised momentum video features (no grad).
        text_feat_m_BP: [B, P] normalised momentum text features.
        temp: scalar temperature (already clamped), shared by both similarity sets as in ALBEF.
        alpha: distillation weight in [0, 1] (0: one-hot targets, i.e. plain InfoNCE).
        video_queue_PQ: [P, Q] queued momentum video features (None: no queue).
        text_queue_PQ: [P, Q] queued momentum text features.
        gather: optional all-gather-with-grad across ranks: the loss then runs on the global
            batch on every rank (see the module docstring), and the queues stay identical.

    Returns:
        (loss, local online video->text similarity [B, B] detached (for VTM negatives),
        gathered momentum video features [Bg, P], gathered momentum text features [Bg, P]),
        the last two to enqueue after the loss.
    """
    v, t = video_feat_BP.float(), text_feat_BP.float()
    with torch.no_grad():
        v_m, t_m = video_feat_m_BP.detach().float(), text_feat_m_BP.detach().float()
    if gather is not None:
        v, t = gather(v), gather(t)
        with torch.no_grad():
            v_m, t_m = gather(v_m), gather(t_m)
    v_all, t_all = v_m, t_m  # [Bg, P]: the momentum keys the online queries are scored against
    if video_queue_PQ is not None and text_queue_PQ is not None:
        v_all = torch.cat((v_m, video_queue_PQ.detach().float().t()), dim=0)
        t_all = torch.cat((t_m, text_queue_PQ.detach().float().t()), dim=0)
    Bg = v.shape[0]
    with torch.no_grad():
        onehot = torch.zeros(Bg, t_all.shape[0], device=v.device)
        onehot[:, :Bg] = torch.eye(Bg, device=v.device)
        tgt_v2t = alpha * (v_m @ t_all.t() / temp).softmax(dim=1) + (1 - alpha) * onehot
        tgt_t2v = alpha * (t_m @ v_all.t() / temp).softmax(dim=1) + (1 - alpha) * onehot
    logits_v2t = v @ t_all.t() / temp
    logits_t2v = t @ v_all.t() / temp
    loss_v2t = -(F.log_softmax(logits_v2t, dim=1) * tgt_v2t).sum(1).mean()
    loss_t2v = -(F.log_softmax(logits_t2v, dim=1) * tgt_t2v).sum(1).mean()
    with torch.no_grad():
        sim_local = video_feat_BP.float() @ text_feat_BP.float().t()
    return 0.5 * (loss_v2t + loss_t2v), sim_local, v_m, t_m


def enqueue_features(queue_PQ: torch.Tensor, ptr: torch.Tensor, feats_NP: torch.Tensor) -> None:
    """Write ``feats_NP`` into the ring buffer ``queue_PQ`` (columns) at ``ptr``, in place.

    The oldest entries are overwritten first and writing wraps around the end, so a queue whose
    size is not a multiple of the (global) batch keeps working; a batch larger than the queue
    keeps only its last Q features.

    Args:
        queue_PQ: [P, Q] queue (a buffer).
        ptr: [1] int64 write position (a buffer), advanced modulo Q.
        feats_NP: [N, P] features to add.
    """
    with torch.no_grad():
        Q = queue_PQ.shape[1]
        feats_NP = feats_NP.detach()[-Q:]
        n = feats_NP.shape[0]
        start = int(ptr[0])
        cols = (start + torch.arange(n, device=queue_PQ.device)) % Q
        queue_PQ[:, cols] = feats_NP.t().to(queue_PQ.dtype)
        ptr[0] = (start + n) % Q
