"""BERT text encoder whose last layers fuse video tokens by cross-attention.

Papers: BERT (Devlin et al., NAACL 2019, https://arxiv.org/abs/1810.04805); the text/fusion
split follows ALBEF (Li et al. 2021), BLIP (Li et al. 2022) and ALPRO (Li et al., CVPR 2022):
of ``num_layers`` post-LN BERT layers, the first ``num_layers - fusion_layers`` are a text-only
encoder (its cls feeds the contrastive loss) and the last ``fusion_layers`` add, after
self-attention, a cross-attention to the video tokens (VTM, MLM and QA run through them).

Numerically identical to ``transformers.BertModel`` (same post-LN order, erf GELU, absolute
position and token-type embeddings); the self-attention q/k/v projections are one fused
``qkv`` GEMM here, and ``checkpoint_filter_fn`` concatenates HF's separate ones. HF's pooler
(``pooler_output``) is kept as frozen tensors (:class:`BertPooler`): imported, saved, never
trained.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megavid.models.attention import CHECKPOINT_MODES, attention, build_layer_norm, checkpoint_part, split_heads

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, LayerNorm, dropout."""

    def __init__(
        self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.norm = build_layer_norm(hidden, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids_BL: torch.Tensor, token_type_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids_BL.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text length {L} exceeds model.text.max_position_embeddings="
                f"{self.position_embeddings.num_embeddings}; lower data.max_text_len"
            )
        pos = torch.arange(L, device=input_ids_BL.device)
        x = self.word_embeddings(input_ids_BL) + self.position_embeddings(pos)[None]
        if token_type_ids_BL is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids_BL)
        return self.dropout(self.norm(x))


class CrossAttention(nn.Module):
    """Multi-head attention from text queries to video keys/values (fused k/v projection).

    Args:
        hidden: text width.
        encoder_width: width of the video tokens.
        num_heads: heads.
        impl: "sdpa" or "math".
        attn_drop: attention-probability dropout in training.
    """

    def __init__(self, hidden: int, encoder_width: int, num_heads: int, impl: str, attn_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.impl = impl
        self.attn_drop = attn_drop
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(encoder_width, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_BLD: torch.Tensor, enc_BSE: torch.Tensor, enc_mask_BS: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q = self.q(x_BLD).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = split_heads(self.kv(enc_BSE), 2, self.num_heads)
        out = attention(q, k, v, enc_mask_BS, impl=self.impl, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class BertSelfAttention(nn.Module):
    """BERT self-attention with a fused qkv projection and a key padding mask."""

    def __init__(self, hidden: int, num_heads: int, impl: str, attn_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.impl = impl
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.kernel_impl = "torch"
        """megavid.kernels implementation of the short-sequence attention ('torch': ``impl``)."""

    def forward(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = split_heads(self.qkv(x_BLD), 3, self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.kernel_impl != "torch" and dropout_p == 0.0:
            from megavid.kernels import short_attention

            # Texts are short (L <= 128): one tile per (sequence, head), q/k/v read through the
            # strides of the qkv projection; the output memory is [B, L, H, Dh], so the
            # transpose + reshape below is free. Longer texts run SDPA inside short_attention.
            mask = None if mask_BL is None else mask_BL.bool()
            out = short_attention(q, k, v, mask, impl=self.kernel_impl)
        else:
            out = attention(q, k, v, mask_BL, impl=self.impl, dropout_p=dropout_p)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class BertLayer(nn.Module):
    """Post-LN BERT layer; with ``encoder_width`` > 0 a cross-attention follows self-attention.

    Args:
        hidden: width.
        num_heads: heads.
        intermediate: FFN width.
        eps: LayerNorm epsilon.
        dropout: hidden dropout.
        attn_dropout: attention dropout.
        impl: "sdpa" or "math".
        encoder_width: video token width for cross-attention (0: text-only layer).
    """

    def __init__(
        self, hidden: int, num_heads: int, intermediate: int, *, eps: float, dropout: float,
        attn_dropout: float, impl: str, encoder_width: int = 0,
    ) -> None:
        super().__init__()
        self.attn = BertSelfAttention(hidden, num_heads, impl, attn_dropout)
        self.attn_norm = build_layer_norm(hidden, eps)
        self.has_cross = encoder_width > 0
        if self.has_cross:
            self.cross_attn = CrossAttention(hidden, encoder_width, num_heads, impl, attn_dropout)
            self.cross_norm = build_layer_norm(hidden, eps)
        self.fc1 = nn.Linear(hidden, intermediate)
        # a module (not F.gelu) so that megavid.kernels.apply_fused_kernels can fuse fc1's bias
        # into the GELU
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate, hidden)
        self.mlp_norm = build_layer_norm(hidden, eps)
        self.dropout = nn.Dropout(dropout)
        self.kernel_impl = "torch"
        """megavid.kernels implementation ('torch': off); with fused LayerNorms
        (``apply_fused_kernels``) each residual add is fused into the post-norm that follows."""
        self.checkpoint_mode: str | None = None
        """Activation checkpointing of this layer in training (set by the tower's
        ``set_grad_checkpointing``): None (off), 'full' (the whole layer), 'attention' (self- and
        cross-attention), 'mlp' (fc1, GELU, fc2)."""

    def forward(
        self,
        x_BLD: torch.Tensor,
        mask_BL: torch.Tensor | None,
        enc_BSE: torch.Tensor | None = None,
        enc_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return checkpoint_part(self, "full", self._forward, x_BLD, mask_BL, enc_BSE, enc_mask_BS)

    def _add_norm(self, norm: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``norm(residual + h)``: one fused kernel when ``norm`` is megavid.kernels' LayerNorm."""
        if self.kernel_impl != "torch":
            from megavid.kernels import FusedLayerNorm

            if isinstance(norm, FusedLayerNorm):
                return norm(h, residual)[0]
        return norm(residual + h)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def _forward(
        self,
        x_BLD: torch.Tensor,
        mask_BL: torch.Tensor | None,
        enc_BSE: torch.Tensor | None,
        enc_mask_BS: torch.Tensor | None,
    ) -> torch.Tensor:
        h = checkpoint_part(self, "attention", self.attn, x_BLD, mask_BL)
        x = self._add_norm(self.attn_norm, self.dropout(h), x_BLD)
        if self.has_cross:
            h = checkpoint_part(self, "attention", self.cross_attn, x, enc_BSE, enc_mask_BS)
            x = self._add_norm(self.cross_norm, self.dropout(h), x)
        h = checkpoint_part(self, "mlp", self._mlp, x)
        return self._add_norm(self.mlp_norm, self.dropout(h), x)


class BertPooler(nn.Module):
    """HF ``BertPooler``: ``tanh(dense(hidden of [CLS]))``, held as frozen fp32 buffers.

    Buffers, not parameters: no objective uses the pooler (VTC, VTM and MLM read hidden
    states), so it must not enter the optimizer, ZeRO's flat partitions or the parameter order
    a resume checks, and under ZeRO-3 it stays whole on every rank (no gather to call it).
    Being buffers, they are saved in checkpoints and exports like the weights. A cast to 16-bit
    floats (DeepSpeed's bf16/fp16 module cast) leaves them fp32, so a bf16 run's export keeps
    the imported pooler exactly. Zero until imported (a model trained from scratch has no
    pooler: its output is 0), which also leaves the random init of every other weight as it
    was before the pooler existed.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(hidden, hidden))
        self.register_buffer("bias", torch.zeros(hidden))

    def forward(self, hidden_BLH: torch.Tensor) -> torch.Tensor:
        """[B, H] pooled output, in the dtype of ``hidden_BLH``."""
        cls = hidden_BLH[:, 0].to(self.weight.dtype)
        return torch.tanh(F.linear(cls, self.weight, self.bias)).to(hidden_BLH.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "BertPooler":
        fp32 = {n: t for n, t in self._buffers.items() if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for n, t in self._buffers.items():
            if n in fp32 and t.dtype in (torch.float16, torch.bfloat16):
                t.data = fp32[n].to(t.device)  # the values before the cast, wherever it moved
        return self


def _fill_absent_pooler(module: "BertTextFusion", state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: a state dict without the pooler (a checkpoint written before
    megavid kept it) keeps the module's current pooler, and says so; everything else loads
    as strictly as before (DeepSpeed resume, ``load_state_dict(strict=True)``)."""
    absent = [prefix + k for k in POOLER_KEYS if prefix + k not in state_dict]
    if not absent:
        return
    log.info("%s not in the checkpoint (written before megavid kept the BERT pooler): kept at "
             "its current values", ", ".join(absent))
    current = module.pooler.state_dict()
    for k in POOLER_KEYS:
        state_dict.setdefault(prefix + k, current[k.removeprefix("pooler.")])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class BertTextFusion(nn.Module):
    """BERT embeddings + ``num_layers`` layers, the last ``fusion_layers`` with cross-attention.

    Args:
        vocab_size: WordPiece vocabulary size.
        hidden_size: width.
        num_layers: total layers (text + fusion).
        fusion_layers: how many of the last layers cross-attend to video tokens.
        num_heads: heads.
        intermediate_size: FFN width.
        max_position_embeddings: longest text.
        type_vocab_size: token types.
        layer_norm_eps: LayerNorm epsilon.
        hidden_dropout: dropout on residual branches and embeddings.
        attention_dropout: attention-probability dropout.
        encoder_width: video token width (needed when fusion_layers > 0).
        attn_impl: "sdpa" or "math".
    """

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_layers: int = 12,
        fusion_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        encoder_width: int = 768,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.num_text_layers = num_layers - fusion_layers
        self.encoder_width = encoder_width
        self.embeddings = BertEmbeddings(
            vocab_size, hidden_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_dropout
        )
        self.layers = nn.ModuleList(
            BertLayer(
                hidden_size, num_heads, intermediate_size, eps=layer_norm_eps, dropout=hidden_dropout,
                attn_dropout=attention_dropout, impl=attn_impl,
                encoder_width=encoder_width if i >= self.num_text_layers else 0,
            )
            for i in range(num_layers)
        )
        self.pooler = BertPooler(hidden_size)
        self.grad_checkpointing = 0
        self.grad_checkpointing_mode = "full"
        init_weights(self)
        self.register_load_state_dict_pre_hook(_fill_absent_pooler)

    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        """Recompute (part of) every ``every_n``-th layer in backward (0: off); non-reentrant.

        Args:
            every_n: layers i with ``i % every_n == 0`` are checkpointed (1: all layers).
            mode: what those layers recompute: "full" (the whole layer), "attention" (self-
                and cross-attention) or "mlp" (the feed-forward).
        """
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"unknown checkpointing mode {mode!r}; valid: {', '.join(CHECKPOINT_MODES)}")
        self.grad_checkpointing = int(every_n)
        self.grad_checkpointing_mode = mode
        for i, layer in enumerate(self.layers):
            layer.checkpoint_mode = mode if every_n > 0 and i % every_n == 0 else None

    def no_weight_decay(self) -> set[str]:
        return {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"}

    def forward_text(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None,
        token_type_ids_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings and the text-only layers: hidden states [B, L, H].

        Args:
            input_ids_BL: token ids.
            attention_mask_BL: 1 for real tokens, 0 for padding (None: all real).
            token_type_ids_BL: segment ids (None: all 0).
        """
        x = self.embeddings(input_ids_BL, token_type_ids_BL)
        for layer in self.layers[: self.num_text_layers]:
            x = layer(x, attention_mask_BL)
        return x

    def forward_fusion(
        self,
        hidden_BLH: torch.Tensor,
        attention_mask_BL: torch.Tensor | None,
        video_BSE: torch.Tensor,
        video_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fusion layers on text hidden states, cross-attending to video tokens: [B, L, H].

        Args:
            hidden_BLH: output of :meth:`forward_text`.
            attention_mask_BL: text padding mask.
            video_BSE: video tokens [B, S, encoder_width].
            video_mask_BS: video padding mask (None: all tokens real).
        """
        x = hidden_BLH
        for layer in self.layers[self.num_text_layers:]:
            x = layer(x, attention_mask_BL, video_BSE, video_mask_BS)
        return x

    def pooler_output(self, hidden_BLH: torch.Tensor) -> torch.Tensor:
        """HF ``BertModel``'s ``pooler_output`` of hidden states: [B, H] (frozen; no objective
        uses it).

        Args:
            hidden_BLH: hidden states whose first token is [CLS], e.g. :meth:`forward_text`'s.
        """
        return self.pooler(hidden_BLH)

    def forward(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None,
        video_BSE: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text layers, then (when video tokens are given) the fusion layers."""
        x = self.forward_text(input_ids_BL, attention_mask_BL)
        if video_BSE is not None:
            x = self.forward_fusion(x, attention_mask_BL, video_BSE)
        return x


# --------------------------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------------------------
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT init: normal(0, 0.02) linears and embeddings, zero biases, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------
_LAYER_MAP = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "attn_norm",
    "crossattention.self.query": "cross_attn.q",
    "crossattention.output.dense": "cross_attn.proj",
    "crossattention.output.LayerNorm": "cross_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "mlp_norm",
}
# HF keys with no counterpart here: non-persistent buffers some checkpoints still carry, and
# the MLM head of BertForPreTraining (converted by the callers that have one).
BERT_IGNORED_PREFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.")
POOLER_KEYS = ("pooler.weight", "pooler.bias")
"""Our pooler's keys (HF ``pooler.dense.*``); absent from BLIP-style text encoders (built
without a pooling layer) and from megavid checkpoints written before it was kept."""


def checkpoint_filter_fn(state_dict: dict[str, Any], model: BertTextFusion | None = None) -> dict[str, torch.Tensor]:
    """Convert an HF ``BertModel`` (or BLIP/ALPRO ``text_encoder``) state dict to our keys.

    Separate query/key/value projections are concatenated into ``qkv`` (self-attention) and
    key/value into ``kv`` (cross-attention); a ``bert.`` prefix is removed; ``pooler.dense``
    becomes ``pooler``; position-id buffers are dropped (see ``BERT_IGNORED_PREFIXES``).

    Args:
        state_dict: HF-format tensors.
        model: unused; kept for the timm ``checkpoint_filter_fn(state_dict, model)`` signature.
    """
    sd = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(BERT_IGNORED_PREFIXES)}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("embeddings."):
            out[k.replace("embeddings.LayerNorm.", "embeddings.norm.")] = v
        elif k.startswith("pooler.dense."):
            out[k.replace("pooler.dense.", "pooler.")] = v
        elif k.startswith("encoder.layer."):
            idx, rest = k[len("encoder.layer."):].split(".", 1)
            name, leaf = rest.rsplit(".", 1)
            if name in ("attention.self.query", "attention.self.key", "attention.self.value"):
                continue  # fused below
            if name in ("crossattention.self.key", "crossattention.self.value"):
                continue
            out[f"layers.{idx}.{_LAYER_MAP.get(name, name)}.{leaf}"] = v
        else:
            out[k] = v
    # Fuse q/k/v (and cross k/v) where all parts are present; otherwise keep the parts under
    # their HF names so that the loader reports them instead of silently dropping them.
    layer_ids = sorted({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")}, key=int)
    for idx in layer_ids:
        for group, parts, target in (
            ("attention.self.", ("query", "key", "value"), "attn.qkv"),
            ("crossattention.self.", ("key", "value"), "cross_attn.kv"),
        ):
            for leaf in ("weight", "bias"):
                keys = [f"encoder.layer.{idx}.{group}{p}.{leaf}" for p in parts]
                if all(kk in sd for kk in keys):
                    out[f"layers.{idx}.{target}.{leaf}"] = torch.cat([sd[kk] for kk in keys], dim=0)
                else:
                    out.update({kk: sd[kk] for kk in keys if kk in sd})
    return out


def build_bert(text_cfg: Any, encoder_width: int, attn_impl: str = "sdpa") -> BertTextFusion:
    """BertTextFusion from a ``TextEncoderConfig``.

    Args:
        text_cfg: ``model.text`` section.
        encoder_width: video token width (``model.video.embed_dim`` unless text.encoder_width is set).
        attn_impl: ``model.attn_impl``.
    """
    return BertTextFusion(
        vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.hidden_size, num_layers=text_cfg.num_layers,
        fusion_layers=text_cfg.fusion_layers, num_heads=text_cfg.num_heads,
        intermediate_size=text_cfg.intermediate_size, max_position_embeddings=text_cfg.max_position_embeddings,
        type_vocab_size=text_cfg.type_vocab_size, layer_norm_eps=text_cfg.layer_norm_eps,
        hidden_dropout=text_cfg.hidden_dropout, attention_dropout=text_cfg.attention_dropout,
        encoder_width=text_cfg.encoder_width or encoder_width, attn_impl=attn_impl,
    )
