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
