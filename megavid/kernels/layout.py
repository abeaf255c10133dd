"""Token layout of divided space-time attention, shared by the torch ops
(:mod:`megavid.kernels.attention`) and the Triton kernels
(:mod:`megavid.kernels._triton_attention`)."""

from __future__ import annotations

from torch import Tensor


def divided_temporal_qkv(
    qkv: Tensor, num_frames: int, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-copy temporal q, k, v views of a divided space-time block's qkv projection.

    TimeSformer (and ``transformers.TimesformerModel``) orders tokens
    ``[cls, (patch 0: frames 0..T-1), (patch 1: frames 0..T-1), ...]``. Projecting *all*
    tokens (the cls row costs 1/(N*T) extra) gives ``qkv [B, 1+N*T, 3*D]``; dropping row 0 and
    splitting the channels is pure stride arithmetic, so the temporal q/k/v are views.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` with unit stride along the last dim.
        num_frames: T.
        num_heads: H.

    Returns:
        q, k, v: ``[B, N, H, T, Dh]`` strided views into ``qkv``.
    """
    b, l, three_d = qkv.shape
    if (l - 1) % num_frames or three_d % (3 * num_heads):
        raise ValueError(
            f"divided_temporal_qkv: qkv {tuple(qkv.shape)} is not [B, 1+N*T, 3*D] for "
            f"T={num_frames}, H={num_heads}"
        )
    n = (l - 1) // num_frames
    dh = three_d // (3 * num_heads)
    x = qkv[:, 1:].unflatten(1, (n, num_frames)).unflatten(-1, (3, num_heads, dh))
    x = x.permute(3, 0, 1, 4, 2, 5)  # [3, B, N, H, T, Dh], still a view
    return x[0], x[1], x[2]
