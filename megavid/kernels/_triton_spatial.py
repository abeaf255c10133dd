"""Triton spatial attention of a divided space-time block, read and written in the
``[B, 1+N*T, D]`` token layout (flash-style tiles with an online softmax, two-kernel backward).

Same conventions as :mod:`megavid.kernels._triton` (kernels built lazily in the process's
Triton mode, fp32 maths, tensors' own dtype in memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import _LOG2E, _kernel
from ._triton_attention import _precision


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
