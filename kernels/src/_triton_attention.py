"""Triton attention kernels: short sequences (temporal) and divided space-time spatial.

Same conventions as :mod:`megavid.kernels._triton` (kernels built lazily in the process's
Triton mode, fp32 maths, tensors' own dtype in memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import _LOG2E, _kernel
from .layout import divided_temporal_qkv


# --------------------------------------------------------------------------------------------
# Short-sequence attention: one program per (sequence, head), the whole sequence in one tile
# --------------------------------------------------------------------------------------------
MAX_SHORT_T = 128
"""Longest query/key length the single-tile kernel handles; longer sequences fall back."""


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
    """Single-tile softmax attention for sequences of at most ``MAX_SHORT_T`` tokens (Triton)."""

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
    """Triton single-tile attention; same contract as :func:`short_attention_ref`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ShortAttentionFn.apply(q, k, v, mask, scale)


# --------------------------------------------------------------------------------------------
# Divided space-time spatial attention, read and written in the [B, 1+N*T, D] token layout
# --------------------------------------------------------------------------------------------
# Sequence (b, t, h) of the spatial attention is [cls, patch 0 @ t, ..., patch N-1 @ t]; its
# element i lives at token row 0 (i == 0) or 1 + (i-1)*T + t of the qkv tensor. Index math
# replaces TimeSformer's cls repeat + cat and its (n t) <-> (t n) permutations, in both
# directions. The cls query of each frame yields one output; their mean over frames is the cls
# output (TimeSformer averages them), so the per-frame cls outputs and gradients go to small
# [B, T, ...] side buffers that torch reduces.
def _spatial_fwd_kernel(
    QKV, OUT, CLS_OUT, LSE, qk_scale,
    s_b, s_l, so_b, so_l, sc_b, sc_t,
    T, H, L, D, DH,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    h = pid_z % H
    bt = pid_z // H
    t = bt % T
    b = tl.cast(bt // T, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < DH
    mm = offs_m < L
    tok_m = tl.cast(tl.where(offs_m == 0, 0, 1 + (offs_m - 1) * T + t), tl.int64)
    base = QKV + b * s_b + h * DH
    q = tl.load(base + tok_m[:, None] * s_l + offs_d[None, :], mask=mm[:, None] & md[None, :],
                other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mn = offs_n < L
        tok_n = tl.cast(tl.where(offs_n == 0, 0, 1 + (offs_n - 1) * T + t), tl.int64)
        kv_mask = mn[:, None] & md[None, :]
        k = tl.load(base + D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first block
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    o_lp = o.to(OUT.dtype.element_ty)
    patch = mm & (offs_m > 0)
    tl.store(OUT + b * so_b + tok_m[:, None] * so_l + h * DH + offs_d[None, :], o_lp,
             mask=patch[:, None] & md[None, :])  # fmt: skip
    cls_ptr = CLS_OUT + b * sc_b + t * sc_t + h * DH + offs_d[None, :] + 0 * offs_m[:, None]
    tl.store(cls_ptr, o_lp, mask=(offs_m == 0)[:, None] & md[None, :])
    tl.store(LSE + pid_z * L + offs_m, m_i + tl.log2(l_i), mask=mm)


def _spatial_bwd_dkdv_kernel(
    QKV, DOUT, DCLS, LSE, DELTA, DQKV, PCLS, qk_scale, sm_scale,
    s_b, s_l, sdo_b, sdo_l, sdc_b, sd_b, sd_l, sp_b, sp_t,
    T, H, L, D, DH,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_z = tl.program_id(1)
    h = pid_z % H
    bt = pid_z // H
    t = bt % T
    b = tl.cast(bt // T, tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < DH
    mn = offs_n < L
    tok_n = tl.cast(tl.where(offs_n == 0, 0, 1 + (offs_n - 1) * T + t), tl.int64)
    base = QKV + b * s_b + h * DH
    kv_mask = mn[:, None] & md[None, :]
    k = tl.load(base + D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(base + 2 * D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mm = offs_m < L
        tok_m = tl.cast(tl.where(offs_m == 0, 0, 1 + (offs_m - 1) * T + t), tl.int64)
        q = tl.load(base + tok_m[:, None] * s_l + offs_d[None, :], mask=mm[:, None] & md[None, :],
                    other=0.0)  # fmt: skip
        # dO of a patch query is the output's gradient at its token row; the cls query of
        # frame t gets the cls row's gradient / T (DCLS, pre-divided), as its output was averaged.
        do = tl.load(DOUT + b * sdo_b + tok_m[:, None] * sdo_l + h * DH + offs_d[None, :],
                     mask=(mm & (offs_m > 0))[:, None] & md[None, :], other=0.0)  # fmt: skip
        do += tl.load(DCLS + b * sdc_b + h * DH + offs_d[None, :] + 0 * offs_m[:, None],
                      mask=(offs_m == 0)[:, None] & md[None, :], other=0.0)  # fmt: skip
        lse = tl.load(LSE + pid_z * L + offs_m, mask=mm, other=float("inf"))
        delta = tl.load(DELTA + pid_z * L + offs_m, mask=mm, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(mn[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    patch = mn & (offs_n > 0)
    st_mask = patch[:, None] & md[None, :]
    dbase = DQKV + b * sd_b + h * DH + tok_n[:, None] * sd_l + offs_d[None, :]
    tl.store(dbase + D, dk.to(DQKV.dtype.element_ty), mask=st_mask)
    tl.store(dbase + 2 * D, dv.to(DQKV.dtype.element_ty), mask=st_mask)
    cls_mask = (offs_n == 0)[:, None] & md[None, :]
    pbase = PCLS + b * sp_b + t * sp_t + h * DH + offs_d[None, :] + 0 * offs_n[:, None]
    tl.store(pbase + D, dk, mask=cls_mask)
    tl.store(pbase + 2 * D, dv, mask=cls_mask)


def _spatial_bwd_dq_kernel(
    QKV, DOUT, DCLS, LSE, DELTA, DQKV, PCLS, qk_scale, sm_scale,
    s_b, s_l, sdo_b, sdo_l, sdc_b, sd_b, sd_l, sp_b, sp_t,
    T, H, L, D, DH,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    h = pid_z % H
    bt = pid_z // H
    t = bt % T
    b = tl.cast(bt // T, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < DH
    mm = offs_m < L
    tok_m = tl.cast(tl.where(offs_m == 0, 0, 1 + (offs_m - 1) * T + t), tl.int64)
    base = QKV + b * s_b + h * DH
    q = tl.load(base + tok_m[:, None] * s_l + offs_d[None, :], mask=mm[:, None] & md[None, :],
                other=0.0)  # fmt: skip
    do = tl.load(DOUT + b * sdo_b + tok_m[:, None] * sdo_l + h * DH + offs_d[None, :],
                 mask=(mm & (offs_m > 0))[:, None] & md[None, :], other=0.0)  # fmt: skip
    do += tl.load(DCLS + b * sdc_b + h * DH + offs_d[None, :] + 0 * offs_m[:, None],
                  mask=(offs_m == 0)[:, None] & md[None, :], other=0.0)  # fmt: skip
    lse = tl.load(LSE + pid_z * L + offs_m, mask=mm, other=float("inf"))
    delta = tl.load(DELTA + pid_z * L + offs_m, mask=mm, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mn = offs_n < L
        tok_n = tl.cast(tl.where(offs_n == 0, 0, 1 + (offs_n - 1) * T + t), tl.int64)
        kv_mask = mn[:, None] & md[None, :]
        k = tl.load(base + D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * D + tok_n[:, None] * s_l + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(mn[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    patch = mm & (offs_m > 0)
    tl.store(DQKV + b * sd_b + h * DH + tok_m[:, None] * sd_l + offs_d[None, :],
             dq.to(DQKV.dtype.element_ty), mask=patch[:, None] & md[None, :])  # fmt: skip
    pbase = PCLS + b * sp_b + t * sp_t + h * DH + offs_d[None, :] + 0 * offs_m[:, None]
    tl.store(pbase, dq, mask=(offs_m == 0)[:, None] & md[None, :])


def _spatial_blocks(seq: int, dh: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). 64x64 tiles for ViT-B's 197 tokens x Dh=64 take
    ~254 registers per thread at 4 warps (ptxas -v, sm_90), so they get 8 warps."""
    bd = max(16, triton.next_power_of_2(dh))
    blk = 16 if seq <= 16 else 32 if seq <= 32 or bd > 64 else 64
    return blk, blk, bd, 8 if blk == 64 else 4


class DividedSpatialAttentionFn(torch.autograd.Function):
    """Spatial attention of a divided space-time block on the ``[B, 1+N*T, 3*D]`` qkv (Triton)."""

    @staticmethod
    def forward(ctx, qkv, num_frames, num_heads, scale):  # type: ignore[override]
        b, l_tok, three_d = qkv.shape
        d = three_d // 3
        dh = d // num_heads
        n = (l_tok - 1) // num_frames
        seq = n + 1
        out = torch.empty((b, l_tok, d), dtype=qkv.dtype, device=qkv.device)
        cls_out = torch.empty((b, num_frames, d), dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty((b * num_frames * num_heads, seq), dtype=torch.float32,
                          device=qkv.device)  # fmt: skip
        bm, bn, bd, nw = _spatial_blocks(seq, dh)
        precision = _precision(qkv)
        grid = (triton.cdiv(seq, bm), b * num_frames * num_heads)
        if out.numel():
            _kernel(_spatial_fwd_kernel, qkv.device)[grid](
                qkv, out, cls_out, lse, scale * _LOG2E,
                qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
                cls_out.stride(0), cls_out.stride(1),
                num_frames, num_heads, seq, d, dh,
                PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=nw,
            )  # fmt: skip
        # TimeSformer's cls output: the mean of the per-frame cls outputs.
        out[:, 0] = cls_out.float().mean(1).to(out.dtype)
        ctx.save_for_backward(qkv, out, cls_out, lse)
        ctx.dims = (num_frames, num_heads, scale)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        qkv, out, cls_out, lse = ctx.saved_tensors
        num_frames, num_heads, scale = ctx.dims
        b, l_tok, three_d = qkv.shape
        d = three_d // 3
        dh = d // num_heads
        n = (l_tok - 1) // num_frames
        seq = n + 1
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dcls = (dout[:, 0].float() / num_frames).to(qkv.dtype)  # [B, D]
        # delta_i = <dO_i, O_i> per query of every (b, t, h) sequence, laid out [B, T, H, 1+N].
        dpatch = (dout[:, 1:].float() * out[:, 1:].float()).view(b, n, num_frames, num_heads, dh)
        dpatch = dpatch.sum(-1).permute(0, 2, 3, 1)  # [B, T, H, N]
        dclsd = (dcls.float()[:, None] * cls_out.float()).view(b, num_frames, num_heads, dh)
        delta = torch.cat([dclsd.sum(-1)[..., None], dpatch], dim=-1).contiguous()
        dqkv = torch.empty_like(qkv)
        pcls = torch.empty((b, num_frames, 3 * d), dtype=torch.float32, device=qkv.device)
        bm, bn, bd, nw = _spatial_blocks(seq, dh)
        precision = _precision(qkv)
        args = (
            qkv, dout, dcls, lse, delta, dqkv, pcls, scale * _LOG2E, scale,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dcls.stride(0),
            dqkv.stride(0), dqkv.stride(1), pcls.stride(0), pcls.stride(1),
            num_frames, num_heads, seq, d, dh,
        )  # fmt: skip
        meta = dict(PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)
        if dqkv.numel():
            z = b * num_frames * num_heads
            _kernel(_spatial_bwd_dkdv_kernel, qkv.device)[(triton.cdiv(seq, bn), z)](*args, **meta)
            _kernel(_spatial_bwd_dq_kernel, qkv.device)[(triton.cdiv(seq, bm), z)](*args, **meta)
        # The cls token is in every frame's sequence: its q/k/v gradient sums over frames.
        dqkv[:, 0] = pcls.sum(1).to(dqkv.dtype)
        return dqkv, None, None, None


def divided_spatial_attention_triton(
    qkv: Tensor, num_frames: int, num_heads: int, scale: float | None = None
) -> Tensor:
    """Triton divided spatial attention; same contract as
    :func:`~megavid.kernels.reference.divided_spatial_attention_ref`."""
    dh = qkv.shape[-1] // (3 * num_heads)
    scale = dh**-0.5 if scale is None else float(scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return DividedSpatialAttentionFn.apply(qkv, num_frames, num_heads, scale)
