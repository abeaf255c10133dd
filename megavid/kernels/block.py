"""A whole divided space-time TimeSformer block built from the fused ops."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import divided_spatial_attention, divided_temporal_attention
from .gelu import LinearGELU, bias_gelu
from .norm import FusedLayerNorm, layer_norm


def divided_block_forward(
    x_BLD: Tensor,
    num_frames: int,
    num_heads: int,
    *,
    temporal_norm: nn.LayerNorm,
    temporal_qkv: nn.Linear,
    temporal_proj: nn.Linear,
    temporal_fc: nn.Linear,
    norm1: nn.LayerNorm,
    qkv: nn.Linear,
    proj: nn.Linear,
    norm2: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    drop_path: Callable[[Tensor], Tensor] | None = None,
    impl: str = "auto",
) -> Tensor:
    """One pre-norm divided space-time TimeSformer block on ``[B, 1+N*T, D]``, fused.

    Computes what TimeSformer's block computes (temporal attention + ``temporal_fc`` on the
    patches, spatial attention with a per-frame cls copy whose outputs are averaged, MLP),
    without ever copying the token tensor for the cls token or the space/time permutations:
    both attentions run on the qkv projection of all ``1+N*T`` tokens in their original order
    (:func:`divided_temporal_attention`, :func:`divided_spatial_attention`), each residual add
    is fused into the LayerNorm that follows it, and fc1's bias into the GELU. The modules are
    passed in (not looked up by name) so any parameter naming works: megavid's ``Block``
    (``temporal_norm1``, ``temporal_attn.qkv``, ...), or ``transformers.TimesformerLayer``.

    Args:
        x_BLD: ``[B, 1 + N*T, D]`` tokens, cls first, patch-major / frame-minor.
        num_frames: T.
        num_heads: H.
        temporal_norm, temporal_qkv, temporal_proj, temporal_fc: the temporal branch.
        norm1, qkv, proj: the spatial branch.
        norm2, fc1, fc2: the MLP (exact GELU between fc1 and fc2).
        drop_path: stochastic depth applied to each branch output (``DropPath`` module), or
            None. Attention dropout is not supported (callers keep their unfused path for it).
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.

    Under DeepSpeed ZeRO-3, parameters are gathered when their module is *called*: run
    :func:`~megavid.kernels.fuse.apply_fused_kernels` first, so the norms are
    :class:`FusedLayerNorm` and fc1 a :class:`LinearGELU`, which are called as modules here
    (plain ``nn.LayerNorm``/``nn.Linear`` are read by attribute, fine for ZeRO 0-2).

    Returns:
        ``[B, 1 + N*T, D]``.
    """
    dp = drop_path if drop_path is not None else (lambda t: t)

    def norm(mod: nn.Module, t: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if isinstance(mod, FusedLayerNorm):  # a module call: ZeRO-3 gathers its parameters
            return mod(t, residual) if residual is not None else (mod(t), t)
        return layer_norm(t, mod.weight, mod.bias, mod.eps, residual, impl=impl)

    # Temporal branch on all tokens (the cls row costs 1/(N*T) extra work and is discarded).
    h, _ = norm(temporal_norm, x_BLD, None)
    o = divided_temporal_attention(temporal_qkv(h), num_frames, num_heads, impl=impl)
    r = temporal_fc(dp(temporal_proj(o)))  # [B, N*T, D]
    # The cls row takes no temporal update: one zero row in front of the (small) branch
    # output, instead of slicing and re-concatenating the token tensor.
    r = F.pad(r, (0, 0, 1, 0))
    h, x = norm(norm1, r, x_BLD)
    # Spatial branch: the kernel gathers each frame's [cls, patches] by index math and writes
    # the (frame-averaged) cls output in row 0; proj is linear, so averaging first is exact.
    o = divided_spatial_attention(qkv(h), num_frames, num_heads, impl=impl)
    h, x = norm(norm2, dp(proj(o)), x)
    if isinstance(fc1, LinearGELU):
        h = fc1(h)
    else:
        h = bias_gelu(F.linear(h, fc1.weight), fc1.bias, impl=impl)
    return x + dp(fc2(h))
