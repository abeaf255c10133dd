"""Plain torch references of the fused kernels.

Each function here spells the maths out with elementary ops, computes in fp32 and casts the
result back to the input dtype, exactly as the Triton kernels do. They are the oracles of the
kernel tests and the fallback of last resort; the ``torch`` implementation in
:mod:`megavid.kernels` uses torch's own fused ops (``F.layer_norm``, ``F.gelu``, SDPA) instead,
which compute the same functions faster.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "bias_gelu_ref",
    "divided_spatial_attention_ref",
    "divided_temporal_attention_ref",
    "layer_norm_ref",
    "short_attention_ref",
]


def _f32(t: Tensor) -> Tensor:
    """Upcast to at least fp32 (fp64 stays fp64, so fp64 tests compare at fp64 precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add followed by LayerNorm over the last dimension.

    Args:
        x: ``[..., D]`` input (e.g. the output of an attention or MLP branch).
        weight: ``[D]`` LayerNorm scale.
        bias: ``[D]`` LayerNorm shift, or None.
        eps: added to the variance.
        residual: optional ``[..., D]`` running residual stream added to ``x`` first.

    Returns:
        ``(y, new_residual)``: ``new_residual = x + residual`` (``x`` itself when no residual)
        and ``y = LayerNorm(new_residual)``, both in the promoted dtype of x and residual (as
        torch's ``F.layer_norm(x + residual)``). The sum is rounded to that dtype before
        normalising because the rounded stream is what the next block adds to.
    """
    if residual is None:
        new_residual = x
    else:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        new_residual = (_f32(x) + _f32(residual)).to(dtype)
    h = _f32(new_residual)
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    y = (h - mean) * torch.rsqrt(var + eps) * _f32(weight)
    if bias is not None:
        y = y + _f32(bias)
    return y.to(new_residual.dtype), new_residual


def bias_gelu_ref(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x + bias)`` with the exact erf GELU (BERT's and ViT's), computed in fp32.

    Args:
        x: ``[..., D]`` input, typically a Linear output computed without its bias.
        bias: ``[D]`` bias added before the activation.
    """
    z = _f32(x) + _f32(bias)
    return (0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))).to(x.dtype)


def short_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention written out: ``softmax(q k^T * scale + mask) v`` in fp32.

    Args:
        q: ``[..., H, Tq, Dh]`` queries.
        k: ``[..., H, Tk, Dh]`` keys.
        v: ``[..., H, Tk, Dh]`` values.
        mask: optional key padding mask ``[..., Tk]`` (bool, True = attend), shared by all
            heads and queries of a sequence.
        scale: logit scale, default ``Dh ** -0.5``.

    Returns:
        ``[..., H, Tq, Dh]`` in ``q.dtype``. A query whose keys are all masked gets zeros
        (the fused kernel's convention) instead of NaN.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(_f32(q), _f32(k).transpose(-1, -2)) * scale
    if mask is not None:
        keep = mask.bool()[..., None, None, :]  # [..., 1, 1, Tk]
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return torch.matmul(p, _f32(v)).to(q.dtype)


def divided_temporal_attention_ref(qkv: Tensor, num_frames: int, num_heads: int) -> Tensor:
    """Temporal attention of a divided space-time block, with the copies spelled out.

    This is the layout of TimeSformer (and ``transformers.TimesformerModel``): tokens are
    ``[cls, (patch 0, frame 0..T-1), (patch 1, frame 0..T-1), ...]``, and each patch position
    attends over its T frames. The cls token takes no part in temporal attention.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` output of the qkv projection over all tokens.
        num_frames: T.
        num_heads: H.

    Returns:
        ``[B, N*T, D]`` attention output of the patch tokens (before the output projection).
    """
    b, l, three_d = qkv.shape
    d = three_d // 3
    n = (l - 1) // num_frames
    dh = d // num_heads
    x = qkv[:, 1:].reshape(b * n, num_frames, 3, num_heads, dh).permute(2, 0, 3, 1, 4)
    o = short_attention_ref(x[0], x[1], x[2])  # [B*N, H, T, Dh]
    return o.transpose(1, 2).reshape(b, n * num_frames, d)


def divided_spatial_attention_ref(
    qkv: Tensor, num_frames: int, num_heads: int, attention: Callable | None = None
) -> Tensor:
    """Spatial attention of a divided space-time block, done as TimeSformer does it.

    Each frame's sequence is ``[cls, its N patches]``: the cls row is repeated once per frame
    and concatenated, the patches are permuted from ``(n t)`` to ``(t n)`` order, and after
    attention the per-frame cls outputs are averaged and the patches permuted back.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` qkv projection of all tokens.
        num_frames: T.
        num_heads: H.
        attention: ``f(q, k, v) -> o`` on ``[Z, H, S, Dh]`` (default
            :func:`short_attention_ref`; the ``torch`` implementation passes SDPA).

    Returns:
        ``[B, 1 + N*T, D]`` attention output in the input's token order (before the output
        projection; the projection is linear, so averaging before it equals averaging after).
    """
    attention = short_attention_ref if attention is None else attention
    b, l, three_d = qkv.shape
    d = three_d // 3
    n = (l - 1) // num_frames
    dh = d // num_heads
    cls = qkv[:, :1].expand(b, num_frames, three_d).reshape(b * num_frames, 1, three_d)
    patches = qkv[:, 1:].reshape(b, n, num_frames, three_d).transpose(1, 2)
    seq = torch.cat([cls, patches.reshape(b * num_frames, n, three_d)], dim=1)  # [BT, 1+N, 3D]
    x = seq.reshape(b * num_frames, n + 1, 3, num_heads, dh).permute(2, 0, 3, 1, 4)
    o = attention(x[0], x[1], x[2]).transpose(1, 2).reshape(b, num_frames, n + 1, d)
    cls_o = _f32(o[:, :, 0]).mean(1).to(o.dtype)  # [B, D]
    patch_o = o[:, :, 1:].transpose(1, 2).reshape(b, n * num_frames, d)
    return torch.cat([cls_o[:, None], patch_o], dim=1)
