"""Triton short-sequence attention: one program per (sequence, head), the whole sequence in one
tile; also the temporal attention of a divided space-time block, on its qkv projection.

The spatial attention of that block is :mod:`megavid.kernels._triton_spatial`. Same
conventions as :mod:`megavid.kernels._triton` (kernels built lazily in the process's Triton
mode, fp32 maths, tensors' own dtype in memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import _LOG2E, _kernel
from .layout import divided_temporal_qkv


def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, qk_scale,
    sq0, sq1, sqh, sqt, sqd,
    sk0, sk1, skh, skt, skd,
    sv0, sv1, svh, svt, svd,
    so0, so1, soh, sot, sod,
    sm0, sm1, smt,
    H, Z1, TQ, TK, DH,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = pid % H
    z = pid // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mq = (offs_m[:, None] < TQ) & (offs_d[None, :] < DH)
    mk = (offs_n[:, None] < TK) & (offs_d[None, :] < DH)
    q = tl.load(Q + z0 * sq0 + z1 * sq1 + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=mq, other=0.0)  # fmt: skip
    k = tl.load(K + z0 * sk0 + z1 * sk1 + h * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                mask=mk, other=0.0)  # fmt: skip
    v = tl.load(V + z0 * sv0 + z1 * sv1 + h * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                mask=mk, other=0.0)  # fmt: skip
    # Logits in base 2 (qk_scale includes log2(e)): exp2 is the fast path on the GPU.
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = offs_n < TK
    if HAS_MASK:
        km = tl.load(MASK + z0 * sm0 + z1 * sm1 + offs_n * smt, mask=offs_n < TK, other=0)
        valid = valid & (km != 0)
    s = tl.where(valid[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    # A query whose keys are all masked: keep the maths finite, its output is 0.
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp2(s - row_max[:, None])
    denom = tl.sum(p, axis=1)
    denom = tl.where(denom == 0.0, 1.0, denom)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / denom[:, None]
    tl.store(O + z0 * so0 + z1 * so1 + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=mq)  # fmt: skip
    lse = row_max + tl.log2(denom)
    tl.store(LSE + pid * TQ + offs_m, lse, mask=offs_m < TQ)


def _attn_bwd_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, qk_scale, sm_scale,
    sq0, sq1, sqh, sqt, sqd,
    sk0, sk1, skh, skt, skd,
    sv0, sv1, svh, svt, svd,
    so0, so1, soh, sot, sod,
    sdo0, sdo1, sdoh, sdot, sdod,
    sdq0, sdq1, sdqh, sdqt, sdqd,
    sdk0, sdk1, sdkh, sdkt, sdkd,
    sdv0, sdv1, sdvh, sdvt, sdvd,
    sm0, sm1, smt,
    H, Z1, TQ, TK, DH,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # The whole sequence is in registers, so dQ, dK and dV come out of one program with no
    # atomics and no second pass. They are written through strides, so the temporal attention
    # writes straight into the [B, 1+N*T, 3*D] gradient of its qkv projection.
    pid = tl.program_id(0)
    h = pid % H
    z = pid // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mq = (offs_m[:, None] < TQ) & (offs_d[None, :] < DH)
    mk = (offs_n[:, None] < TK) & (offs_d[None, :] < DH)
    q = tl.load(Q + z0 * sq0 + z1 * sq1 + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=mq, other=0.0)  # fmt: skip
    k = tl.load(K + z0 * sk0 + z1 * sk1 + h * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                mask=mk, other=0.0)  # fmt: skip
    v = tl.load(V + z0 * sv0 + z1 * sv1 + h * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                mask=mk, other=0.0)  # fmt: skip
    o = tl.load(O + z0 * so0 + z1 * so1 + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
                mask=mq, other=0.0)  # fmt: skip
    do = tl.load(DO + z0 * sdo0 + z1 * sdo1 + h * sdoh + offs_m[:, None] * sdot
                 + offs_d[None, :] * sdod, mask=mq, other=0.0)  # fmt: skip
    lse = tl.load(LSE + pid * TQ + offs_m, mask=offs_m < TQ, other=float("inf"))
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = offs_n < TK
    if HAS_MASK:
        km = tl.load(MASK + z0 * sm0 + z1 * sm1 + offs_n * smt, mask=offs_n < TK, other=0)
        valid = valid & (km != 0)
    s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])  # padded query rows have lse=+inf -> p=0
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    ds = p * (dp - delta[:, None]) * sm_scale
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DQ + z0 * sdq0 + z1 * sdq1 + h * sdqh + offs_m[:, None] * sdqt
             + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=mq)  # fmt: skip
    tl.store(DK + z0 * sdk0 + z1 * sdk1 + h * sdkh + offs_n[:, None] * sdkt
             + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty), mask=mk)  # fmt: skip
    tl.store(DV + z0 * sdv0 + z1 * sdv1 + h * sdvh + offs_n[:, None] * sdvt
             + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=mk)  # fmt: skip


def _as_5d(t: Tensor) -> Tensor:
    """``[*lead, H, T, Dh] -> [Z0, Z1, H, T, Dh]`` without copying when ``len(lead) <= 2``.

    Two leading dims are kept apart (each with its own stride) so that strided views such as
    the temporal q/k/v of a ``[B, 1+N*T, 3, H, Dh]`` qkv tensor need no copy.
    """
    lead = t.shape[:-3]
    if len(lead) == 0:
        return t[None, None]
    if len(lead) == 1:
        return t[None]
    if len(lead) == 2:
        return t
    return t.reshape(-1, *t.shape[-4:])  # more dims: merge into the first (may copy)


def _mask_3d(mask: Tensor | None, lead: tuple[int, ...], tk: int, device) -> tuple[Tensor, tuple]:
    """Key padding mask ``[*lead, Tk]`` as an int8 ``[Z0, Z1, Tk]`` (broadcast by stride 0)."""
    if mask is None:
        dummy = torch.zeros(1, dtype=torch.int8, device=device)
        return dummy, (0, 0, 0)
    m = mask.to(torch.int8) if mask.dtype != torch.int8 else mask
    m = m.expand(*lead, tk)
    if len(lead) == 0:
        m = m[None, None]
    elif len(lead) == 1:
        m = m[None]
    elif len(lead) > 2:
        m = m.reshape(-1, m.shape[-2], tk)
    return m, tuple(m.stride())


def _attn_blocks(tq: int, tk: int, dh: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16.
    return (max(16, triton.next_power_of_2(tq)), max(16, triton.next_power_of_2(tk)),
            max(16, triton.next_power_of_2(dh)))  # fmt: skip


def _attn_forward(q, k, v, mask, scale):
    """Launch the forward kernel; returns ``(o5, lse, mask3, mask_strides)``."""
    lead = tuple(q.shape[:-3])
    h, tq, dh = q.shape[-3:]
    tk = k.shape[-2]
    q5, k5, v5 = _as_5d(q), _as_5d(k), _as_5d(v)
    z0, z1 = q5.shape[0], q5.shape[1]
    # Output memory is [Z0, Z1, T, H, Dh] (returned as a [.., H, T, Dh] view), so that the
    # caller's usual ``o.transpose(-3, -2).reshape(..., T, H*Dh)`` is free.
    o_mem = torch.empty((z0, z1, tq, h, dh), dtype=q.dtype, device=q.device)
    o5 = o_mem.transpose(2, 3)
    lse = torch.empty((z0 * z1 * h, tq), dtype=torch.float32, device=q.device)
    m3, ms = _mask_3d(mask, lead, tk, q.device)
    bm, bn, bd = _attn_blocks(tq, tk, dh)
    if o_mem.numel():
        _kernel(_attn_fwd_kernel, q.device)[(z0 * z1 * h,)](
            q5, k5, v5, o5, lse, m3, scale * _LOG2E,
            *q5.stride(), *k5.stride(), *v5.stride(), *o5.stride(), *ms,
            h, z1, tq, tk, dh,
            HAS_MASK=mask is not None, PRECISION=_precision(q),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4 if bm * bn <= 64 * 64 else 8,
        )  # fmt: skip
    return o5, lse, m3, ms


def _attn_backward(q, k, v, o5, do, lse, m3, ms, has_mask, scale, dq5, dk5, dv5) -> None:
    """Launch the backward kernel, writing into the (possibly strided) 5-d dq5/dk5/dv5."""
    h, tq, dh = q.shape[-3:]
    tk = k.shape[-2]
    q5, k5, v5, do5 = _as_5d(q), _as_5d(k), _as_5d(v), _as_5d(do)
    z0, z1 = q5.shape[0], q5.shape[1]
    bm, bn, bd = _attn_blocks(tq, tk, dh)
    if dq5.numel():
        _kernel(_attn_bwd_kernel, q.device)[(z0 * z1 * h,)](
            q5, k5, v5, o5, do5, dq5, dk5, dv5, lse, m3, scale * _LOG2E, scale,
            *q5.stride(), *k5.stride(), *v5.stride(), *o5.stride(), *do5.stride(),
            *dq5.stride(), *dk5.stride(), *dv5.stride(), *ms,
            h, z1, tq, tk, dh,
            HAS_MASK=has_mask, PRECISION=_precision(q),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4 if bm * bn <= 64 * 64 else 8,
        )  # fmt: skip


def _precision(t: Tensor) -> str:
    # fp32 inputs: exact fp32 products (Triton would default to TF32 on the GPU); the value is
    # ignored for fp16/bf16, where "tf32" is simply Triton's default.
    return "ieee" if t.dtype == torch.float32 else "tf32"


class ShortAttentionFn(torch.autograd.Function):
    """Single-tile softmax attention for sequences of at most
    :data:`~megavid.kernels.attention.MAX_SHORT_T` tokens (Triton)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):  # type: ignore[override]
        o5, lse, m3, ms = _attn_forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, o5, lse, m3)
        ctx.scale, ctx.has_mask, ctx.mask_strides = scale, mask is not None, ms
        lead = tuple(q.shape[:-3])
        return o5 if len(lead) == 2 else o5.reshape(lead + tuple(q.shape[-3:]))

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o5, lse, m3 = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _attn_backward(q, k, v, o5, do, lse, m3, ctx.mask_strides, ctx.has_mask, ctx.scale,
                       _as_5d(dq), _as_5d(dk), _as_5d(dv))  # fmt: skip
        return dq, dk, dv, None, None


class DividedTemporalAttentionFn(torch.autograd.Function):
    """Temporal attention on the ``[B, 1+N*T, 3*D]`` qkv projection, in and out (Triton).

    Forward reads q/k/v as strided views and writes ``[B, N, T, H, Dh]`` = ``[B, N*T, D]``;
    backward writes dq/dk/dv straight into one ``[B, 1+N*T, 3*D]`` gradient (cls row zero)
    instead of letting autograd scatter three separate gradients through the view chain.
    """

    @staticmethod
    def forward(ctx, qkv, num_frames, num_heads, scale):  # type: ignore[override]
        q, k, v = divided_temporal_qkv(qkv, num_frames, num_heads)
        o5, lse, m3, ms = _attn_forward(q, k, v, None, scale)
        ctx.save_for_backward(qkv, o5, lse, m3)
        ctx.dims = (num_frames, num_heads, scale, ms)
        b, n, h, t, dh = o5.shape
        return o5.transpose(2, 3).reshape(b, n * t, h * dh)  # a view: memory is [B, N, T, H, Dh]

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        qkv, o5, lse, m3 = ctx.saved_tensors
        num_frames, num_heads, scale, ms = ctx.dims
        q, k, v = divided_temporal_qkv(qkv, num_frames, num_heads)
        b, n, h, t, dh = q.shape
        do5 = do.reshape(b, n, t, h, dh).transpose(2, 3)  # a view when do is contiguous
        dqkv = torch.empty_like(qkv)
        dqkv[:, 0].zero_()  # the cls token takes no part in temporal attention
        dq, dk, dv = divided_temporal_qkv(dqkv, num_frames, num_heads)
        _attn_backward(q, k, v, o5, do5, lse, m3, ms, False, scale, dq, dk, dv)
        return dqkv, None, None, None


def divided_temporal_attention_triton(
    qkv: Tensor, num_frames: int, num_heads: int, scale: float | None = None
) -> Tensor:
    """Triton temporal attention; same contract as
    :func:`~megavid.kernels.reference.divided_temporal_attention_ref`."""
    dh = qkv.shape[-1] // (3 * num_heads)
    scale = dh**-0.5 if scale is None else float(scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return DividedTemporalAttentionFn.apply(qkv, num_frames, num_heads, scale)


def short_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Triton single-tile attention; same contract as
    :func:`~megavid.kernels.reference.short_attention_ref`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ShortAttentionFn.apply(q, k, v, mask, scale)
