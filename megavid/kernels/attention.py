"""Attention ops: short sequences, and both attentions of a divided space-time block read
straight out of the ``[B, 1+N*T, 3*D]`` qkv projection (no cls copies, no permutations)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .backends import HAS_TRITON, get_backend
from .layout import divided_temporal_qkv
from .reference import divided_spatial_attention_ref

if HAS_TRITON:
    from ._triton_attention import divided_temporal_attention_triton, short_attention_triton
    from ._triton_spatial import divided_spatial_attention_triton

MAX_SHORT_T = 128
"""Longest sequence :func:`short_attention` runs in Triton; longer ones use SDPA."""


def _short_attention_torch(q, k, v, mask, scale):
    attn_mask = None if mask is None else mask.bool()[..., None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if mask is not None:
        # SDPA gives NaN (or garbage, by backend) for a query whose keys are all padded; the
        # contract (and the Triton kernel) says zeros. Unconditional: no host sync on the GPU.
        dead = ~mask.bool().any(-1)
        o = o.masked_fill(dead[..., None, None, None], 0.0)
    return o


def short_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Softmax attention over many short sequences (T <= 128), as SDPA computes it.

    q/k/v may be strided views with up to two leading dims (``[Z0, Z1, H, T, Dh]``): the
    Triton kernel reads them through their strides, so views of a packed qkv tensor need no
    copy. The Triton output's memory is laid out ``[..., T, H, Dh]`` (returned as a
    ``[..., H, T, Dh]`` view), so ``o.transpose(-3, -2).reshape(..., T, H * Dh)`` is free.

    Args:
        q: ``[..., H, Tq, Dh]`` queries.
        k: ``[..., H, Tk, Dh]`` keys.
        v: ``[..., H, Tk, Dh]`` values.
        mask: optional key padding mask ``[..., Tk]`` (bool, True = attend). A query whose
            keys are all masked gets zeros.
        scale: logit scale, default ``Dh ** -0.5``.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`. Sequences longer than
            :data:`MAX_SHORT_T` use SDPA.

    Returns:
        ``[..., H, Tq, Dh]``.
    """
    if q.dim() < 3 or k.shape[:-2] != q.shape[:-2] or v.shape != k.shape:
        raise ValueError(
            f"short_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
            "be [..., H, T, Dh] with equal leading dims and k.shape == v.shape"
        )
    if mask is not None and mask.shape[-1] != k.shape[-2]:
        raise ValueError(f"short_attention: mask {tuple(mask.shape)} must end in Tk={k.shape[-2]}")
    backend = get_backend(impl, q, "short_attention")
    if backend == "triton" and max(q.shape[-2], k.shape[-2]) <= MAX_SHORT_T:
        return short_attention_triton(q, k, v, mask, scale)
    return _short_attention_torch(q, k, v, mask, scale)


def divided_temporal_attention(
    qkv: Tensor, num_frames: int, num_heads: int, *, impl: str = "auto"
) -> Tensor:
    """Temporal attention of a divided space-time block, straight from the qkv projection.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` qkv projection of all tokens (cls first, ignored here).
        num_frames: T.
        num_heads: H.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.

    Returns:
        ``[B, N*T, D]`` attention output of the patch tokens (before the output projection),
        in the token order of the input. With Triton nothing is copied: the kernel reads the
        q/k/v views, writes ``[B, N, T, H, Dh]`` memory (which is ``[B, N*T, D]``), and its
        backward writes one ``[B, 1+N*T, 3*D]`` gradient for ``qkv``.
    """
    if get_backend(impl, qkv, "short_attention") == "triton" and num_frames <= MAX_SHORT_T:
        return divided_temporal_attention_triton(qkv, num_frames, num_heads)
    q, k, v = divided_temporal_qkv(qkv, num_frames, num_heads)
    b, n, h, t, dh = q.shape
    o = _short_attention_torch(q, k, v, None, None)  # [B, N, H, T, Dh]
    return o.transpose(2, 3).reshape(b, n * t, h * dh)


def divided_spatial_attention(
    qkv: Tensor, num_frames: int, num_heads: int, *, impl: str = "auto"
) -> Tensor:
    """Spatial attention of a divided space-time block, in the ``[B, 1+N*T, D]`` token layout.

    Frame t's sequence is ``[cls, patch 0 @ t, ..., patch N-1 @ t]``; the cls output is the
    mean over frames of its per-frame outputs (as TimeSformer computes it). The Triton kernel
    reads each sequence out of ``qkv`` by index math and writes the output in the input's
    token order; ``"torch"`` does the cls repeat + cat and the two permutations around SDPA.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` qkv projection of all tokens (channels ``[3, H, Dh]``).
        num_frames: T.
        num_heads: H.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.

    Returns:
        ``[B, 1 + N*T, D]`` attention output before the output projection.
    """
    b, l, three_d = qkv.shape
    if (l - 1) % num_frames or three_d % (3 * num_heads):
        raise ValueError(
            f"divided_spatial_attention: qkv {tuple(qkv.shape)} is not [B, 1+N*T, 3*D] for "
            f"T={num_frames}, H={num_heads}"
        )
    if get_backend(impl, qkv, "short_attention") == "triton":
        return divided_spatial_attention_triton(qkv, num_frames, num_heads)
    return divided_spatial_attention_ref(
        qkv, num_frames, num_heads, attention=F.scaled_dot_product_attention
    )
