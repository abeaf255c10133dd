"""Attention and normalisation primitives shared by the TimeSformer and BERT towers.

Two attention paths, chosen by ``model_cfg.attn_impl``:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels on GPU, a fused CPU kernel otherwise);
- ``"math"``: the explicit ``softmax(q k^T / sqrt(d) + mask) v`` reference, used by the tests as
  an independent check of the fused path and for debugging.

Key padding masks are ``[B, Lk]`` with 1/True for tokens to attend to (the BERT convention of
``attention_mask``); they are broadcast over heads and queries here, so callers never build
additive ``-inf`` masks themselves.

LayerNorm comes from NVIDIA apex (``FusedLayerNorm``) when apex is importable, else torch's.
apex is never a dependency; both have the same ``weight``/``bias`` parameters, so checkpoints
do not care which one was used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttnImpl = Literal["sdpa", "math"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "math")

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
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(
            qkv[0], qkv[1], qkv[2], key_mask_BL, impl=self.impl,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(B, L, D))
