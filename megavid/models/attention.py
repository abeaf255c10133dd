"""Attention and normalisation primitives shared by the TimeSformer and BERT towers.

Two attention paths, chosen by ``model_cfg.attn_impl``:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels on GPU, a fused CPU kernel otherwise);
- ``"math"``: the explicit ``softmax(q k^T / sqrt(d) + mask) v`` reference, used by the tests as
  an independent check of the fused path and for debugging.

Key padding masks are ``[B, Lk]`` with 1/True for tokens to attend to (the BERT convention of
``attention_mask``); they are broadcast over heads and queries here, so callers never build
additive ``-inf`` masks themselves.

Activation checkpointing inside a block is selective (``CHECKPOINT_MODES``): a block or layer
whose ``checkpoint_mode`` names one of its parts (attention, MLP) recomputes only that part in
backward (:func:`checkpoint_part`), or the whole block for ``"full"``.

LayerNorm comes from NVIDIA apex (``FusedLayerNorm``) when apex is importable, else torch's.
apex is never a dependency; both have the same ``weight``/``bias`` parameters, so checkpoints
do not care which one was used.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

AttnImpl = Literal["sdpa", "math"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "math")
CHECKPOINT_MODES: tuple[str, ...] = ("full", "attention", "mlp")
"""What activation checkpointing recomputes in a checkpointed block: all of it, its attention
branches (norm, qkv, attention, output projection), or its MLP."""

try:  # pragma: no cover - apex is not installed in CI
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm

    HAS_APEX = True
except Exception:  # noqa: BLE001 - any import failure (missing, broken CUDA ext) means "no apex"
    _ApexLayerNorm = None
    HAS_APEX = False


def build_layer_norm(dim: int, eps: float) -> nn.Module:
    """A LayerNorm over the last dimension: apex's fused kernel when importable, else torch's.

    Args:
        dim: normalised size.
        eps: variance epsilon (1e-6 for the ViT/TimeSformer family, 1e-12 for BERT).
    """
    if HAS_APEX:  # pragma: no cover
        return _ApexLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


def checkpoint_part(block: nn.Module, part: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, recomputed in backward (non-reentrant checkpoint) when ``block`` is in
    training, grad is on and ``block.checkpoint_mode == part``.

    Args:
        block: a TimeSformer ``Block`` or ``BertLayer`` (anything with ``checkpoint_mode``).
        part: one of ``CHECKPOINT_MODES``; "full" wraps a whole block's forward.
        fn: the computation of that part.
        *args: its inputs (tensors, or tuples of them).
    """
    if block.checkpoint_mode == part and block.training and torch.is_grad_enabled():
        # Non-reentrant: correct gradients even when no input requires grad (frozen stem).
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def split_heads(proj_BLC: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Split a fused projection ``[B, L, parts * H * Dh]`` (q/k/v or k/v) into ``parts``
    per-head views ``[B, H, L, Dh]``, without a copy.

    ``unbind`` on the ``parts`` dim of the ``[B, L, parts, H, Dh]`` view: in backward the
    gradients are stacked straight into the projection's ``[B, L, parts * H * Dh]`` layout (one
    write). Indexing ``qkv[0], qkv[1], qkv[2]`` instead zero-fills a projection-sized gradient
    per index and sums them, and a ``permute(2, 0, 3, 1, 4)`` first adds a transposing copy.
    """
    B, L, C = proj_BLC.shape
    head_dim = C // (parts * num_heads)
    return tuple(t.transpose(1, 2) for t in proj_BLC.view(B, L, parts, num_heads, head_dim).unbind(2))


def _expand_key_mask(key_mask_BL: torch.Tensor | None) -> torch.Tensor | None:
    if key_mask_BL is None:
        return None
    # [B, Lk] -> [B, 1, 1, Lk] boolean (True = attend): broadcast over heads and queries.
    return key_mask_BL.bool()[:, None, None, :]


def attention(
    q_BHLD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    *,
    impl: str = "sdpa",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional key padding mask.

    Args:
        q_BHLD: queries [B, heads, L, head_dim].
        k_BHSD: keys [B, heads, S, head_dim].
        v_BHSD: values [B, heads, S, head_dim].
        key_mask_BS: [B, S], nonzero/True where the key is a real token; None: attend to all.
        impl: "sdpa" (torch fused kernel) or "math" (explicit reference).
        dropout_p: attention-probability dropout (pass 0 outside training).

    Returns:
        [B, heads, L, head_dim].
    """
    mask = _expand_key_mask(key_mask_BS)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask, dropout_p=dropout_p)
    if impl != "math":
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(ATTN_IMPLS)}")
    scores = (q_BHLD @ k_BHSD.transpose(-2, -1)) * (1.0 / math.sqrt(q_BHLD.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v_BHSD


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm layout: ``qkv``, ``proj``).

    Args:
        dim: model width.
        num_heads: attention heads.
        qkv_bias: bias on the qkv projection.
        impl: "sdpa" or "math".
        attn_drop: attention-probability dropout in training.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, impl: str = "sdpa", attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor, key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = split_heads(self.qkv(x_BLD), 3, self.num_heads)
        out = attention(q, k, v, key_mask_BL, impl=self.impl, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))
