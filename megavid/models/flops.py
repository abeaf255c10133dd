"""Analytic FLOP counts (model FLOPs, the MFU convention): 2 FLOPs per multiply-accumulate of
every matmul and convolution, attention score and value products included; elementwise ops,
norms, softmax and embedding lookups excluded.

Training = forward + backward = 3x forward, except the patch-embedding convolution, whose input
(the pixels) needs no gradient, so its backward costs 1x (weight gradient only). Attention is
counted once forward (QK^T and AV) and twice backward, as model FLOPs: kernels that recompute
the scores in backward (flash) do more hardware work than this.

Checked against ``torch.utils.flop_counter.FlopCounterMode`` in tests/unit/models/test_flops.py.
"""

from __future__ import annotations

from typing import Any


def _attn_flops(L: int, S: int, D: int) -> float:
    """QK^T and AV of one attention of L queries over S keys at total width D (all heads)."""
    return 2.0 * L * S * D * 2


def transformer_layer_flops(L: int, D: int, hidden: int) -> float:
    """Forward FLOPs of one self-attention + MLP layer over L tokens of width D (MLP width hidden)."""
    return 2.0 * L * D * 3 * D + _attn_flops(L, L, D) + 2.0 * L * D * D + 2.0 * L * D * hidden * 2


def timesformer_forward_flops(model: Any) -> tuple[float, float]:
    """(forward FLOPs of one clip through the TimeSformer, of which in the patch embedding).

    Args:
        model: a :class:`~megavid.models.timesformer.TimeSformer`.
    """
    D, T, N = model.embed_dim, model.num_frames, model.num_patches
    hidden = int(D * model.mlp_ratio)
    p = model.patch_embed.patch_size
    in_chans = model.patch_embed.proj.in_channels
    stem = 2.0 * T * N * in_chans * p * p * D
    M = N * T
    if model.attention_type == "divided_space_time":
        temporal = 2.0 * M * D * 3 * D + N * _attn_flops(T, T, D) + 2.0 * M * D * D + 2.0 * M * D * D
        spatial = T * (2.0 * (N + 1) * D * 3 * D + _attn_flops(N + 1, N + 1, D) + 2.0 * (N + 1) * D * D)
        mlp = 2.0 * (1 + M) * D * hidden * 2
        block = temporal + spatial + mlp
    elif model.attention_type == "joint_space_time":
        block = transformer_layer_flops(1 + M, D, hidden)
    else:  # space_only: a ViT per frame
        block = T * transformer_layer_flops(1 + N, D, hidden)
    return stem + model.depth * block, stem


def bert_forward_flops(model: Any, L: int, *, text: bool = True, fusion: bool = False, video_tokens: int = 0) -> float:
    """Forward FLOPs of one text of length L through the text and/or fusion layers.

    Args:
        model: a :class:`~megavid.models.bert.BertTextFusion`.
        L: text length.
        text: count the text-only layers.
        fusion: count the fusion layers (self-attention, cross-attention, MLP).
        video_tokens: S, the number of video tokens the fusion layers attend to.
    """
    H, I, E = model.hidden_size, model.intermediate_size, model.encoder_width
    n_text = model.num_text_layers
    n_fusion = len(model.layers) - n_text
    layer = transformer_layer_flops(L, H, I)
    cross = 2.0 * L * H * H + 2.0 * video_tokens * E * 2 * H + _attn_flops(L, video_tokens, H) + 2.0 * L * H * H
    out = 0.0
    if text:
        out += n_text * layer
    if fusion:
        out += n_fusion * (layer + cross)
    return out


def videolm_train_flops(model: Any, text_len: int, mlm_tokens: float | None = None) -> float:
    """Training FLOPs (forward + backward) per sample of ``VideoLM.forward`` with its enabled
    objectives (VTC, VTM, MLM); the B x B similarity products of VTC (O(B) per sample) are left out.

    Args:
        model: a :class:`~megavid.models.videolm.VideoLM`.
        text_len: padded text length L.
        mlm_tokens: masked tokens per sample (default: ``mlm_probability * (L - 2)``, the
            expectation for unpadded texts with [CLS] and [SEP]).
    """
    video, text = model.video_encoder, model.text_encoder
    Dv, Dt = video.embed_dim, text.hidden_size
    P = model.vision_proj.out_features
    S = 1 + video.num_patches * video.num_frames
    L = text_len
    v_fwd, stem = timesformer_forward_flops(video)
    fwd = v_fwd + 2.0 * Dv * P
    if model.vtc_weight > 0 or model.vtm_weight > 0:
        fwd += bert_forward_flops(text, L, text=True) + 2.0 * Dt * P
    if model.vtm_weight > 0:
        # one positive and two hard-negative pairs per sample through the fusion layers
        fwd += 3 * (bert_forward_flops(text, L, text=False, fusion=True, video_tokens=S) + 2.0 * Dt * 2)
    if model.mlm_weight > 0:
        n = model.mlm_probability * max(L - 2, 0) if mlm_tokens is None else mlm_tokens
        fwd += bert_forward_flops(text, L, text=True, fusion=True, video_tokens=S)
        fwd += n * (2.0 * Dt * Dt + 2.0 * Dt * text.vocab_size)
    return 3.0 * fwd - stem
