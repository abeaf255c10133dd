"""Triton kernels and their autograd Functions.

Only imported when ``triton`` is importable. Triton fixes its mode when it is imported: with
``TRITON_INTERPRET=1`` in the environment its own library functions (``tl.max``, ...) become
interpreter functions and nothing can be compiled in that process; without it nothing can be
interpreted. :data:`INTERPRETED` records which mode this process has, and :func:`_kernel`
builds each kernel lazily in that mode (``@triton.jit`` at import would read the variable a
second time, at our import, and could disagree with Triton's own functions).
Kernels never call other ``@jit`` functions of ours, so one wrapper per kernel is enough.

Every kernel computes in fp32 and reads/writes the tensors' own dtype (fp32, fp16, bf16).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_LOG2E = 1.4426950408889634
_KERNELS: dict[Callable, Any] = {}

INTERPRETED: bool = isinstance(tl.max, InterpretedFunction)
"""True when Triton was imported under ``TRITON_INTERPRET=1``: kernels run on CPU tensors
through the interpreter (tests), and cannot be compiled in this process."""


def _kernel(fn: Callable, device: torch.device | None = None) -> Any:
    """Return ``fn`` as a Triton kernel in this process's mode (compiled or interpreted)."""
    if fn not in _KERNELS:
        _KERNELS[fn] = InterpretedFunction(fn) if INTERPRETED else JITFunction(fn)
    return _KERNELS[fn]


def _num_warps(block: int) -> int:
    # Elements per program -> warps: keeps ~8-16 fp32 values per thread (ptxas -v on sm_90:
    # a [4, 1024] LayerNorm backward tile at 4 warps needs 168 registers, at 8 far fewer).
    return 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8


# --------------------------------------------------------------------------------------------
# Residual add + LayerNorm
# --------------------------------------------------------------------------------------------
def _ln_fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_ro,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # A [ROWS, BLOCK_N] tile per program: several rows share one load of W and B, which pays
    # off for the small D of ViT/BERT (384..1024) where one row is too little work.
    rows = tl.cast(tl.program_id(0), tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mr = rows < M
    m = mr[:, None] & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=m, other=0.0)
        # Round the sum to the stream dtype first: the rounded stream is what later blocks see.
        h_lp = (x + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + rows[:, None] * stride_ro + cols[None, :], h_lp, mask=m)
        h = h_lp.to(tl.float32)
    else:
        h = x
    mean = tl.sum(h, axis=1) / N
    diff = tl.where(m, h - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=mr)
    tl.store(RSTD + rows, rstd, mask=mr)


def _ln_bwd_kernel(
    H, DY, DRES, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_h, stride_dy, stride_dres, stride_dx,
    M, N, ROWS_PER_PROG,
    HAS_DRES: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Each program owns a contiguous run of rows, walks it in [ROWS, BLOCK_N] tiles and
    # accumulates its partial dW/dB in fp32 registers; torch sums the partials (deterministic,
    # no atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mc = cols < N
    w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for start in range(row_start, row_end, ROWS):
        rows = tl.cast(start, tl.int64) + tl.arange(0, ROWS)  # int64: M*N may pass 2**31
        mr = rows < row_end
        m = mr[:, None] & mc[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(MEAN + rows, mask=mr, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mr, other=0.0)
        xhat = tl.where(m, (h.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            # The new residual is also an output: its gradient flows straight into x/residual.
            dres = tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=m, other=0.0)
            dx += dres.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=m)  # fmt: skip
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * N + cols, dw, mask=mc)
    tl.store(DB_PART + pid * N + cols, db, mask=mc)


def _rows(t: Tensor) -> Tensor:
    """``[..., D] -> [M, D]`` with unit stride along D (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class LayerNormFn(torch.autograd.Function):
    """Fused ``new_residual = x + residual; y = LayerNorm(new_residual)`` (Triton).

    Returns ``(y, new_residual)`` when a residual is given, else ``y`` alone (the caller hands
    ``x`` back as the residual, so autograd sees that identity exactly).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):  # type: ignore[override]
        shape = x.shape
        n = shape[-1]
        x2 = _rows(x)
        m_rows = x2.shape[0]
        has_res = residual is not None
        # Output dtype as torch's ``F.layer_norm(x + residual)``: the promoted type (an fp32
        # residual stream with bf16 branch outputs, as under autocast, stays fp32).
        out_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
        y = torch.empty((m_rows, n), dtype=out_dtype, device=x.device)
        mean = torch.empty(m_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m_rows, dtype=torch.float32, device=x.device)
        if has_res:
            r2 = _rows(residual)
            res_out = torch.empty((m_rows, n), dtype=out_dtype, device=x.device)
        else:
            r2, res_out = x2, x2  # unused by the kernel (HAS_RES=False)
        block = triton.next_power_of_2(n)
        rows = max(1, min(16, 4096 // block))
        if m_rows:
            _kernel(_ln_fwd_kernel, x.device)[(triton.cdiv(m_rows, rows),)](
                x2, r2, weight, bias if bias is not None else weight, y, res_out, mean, rstd,
                x2.stride(0), r2.stride(0), y.stride(0), res_out.stride(0),
                m_rows, n, eps,
                HAS_RES=has_res, HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block,
                num_warps=_num_warps(rows * block),
            )  # fmt: skip
        # Backward needs the normalised input: the new residual (an output anyway) or x.
        ctx.save_for_backward(res_out if has_res else x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.has_res = has_res
        ctx.shape = shape
        ctx.in_dtypes = (x.dtype, residual.dtype if has_res else None)
        if has_res:
            return y.view(shape), res_out.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dres=None):  # type: ignore[override]
        h, weight, mean, rstd = ctx.saved_tensors
        shape = ctx.shape
        n = shape[-1]
        dy2 = _rows(dy)
        m_rows = dy2.shape[0]
        has_dres = dres is not None
        dres2 = _rows(dres) if has_dres else dy2
        dx = torch.empty((m_rows, n), dtype=dy.dtype, device=dy.device)
        if dy.is_cuda:
            sms = torch.cuda.get_device_properties(dy.device).multi_processor_count
        else:
            sms = 4  # the interpreter: few programs, each looping over many rows
        block = triton.next_power_of_2(n)
        rows = max(1, min(16, 4096 // block))
        progs = max(1, min(triton.cdiv(m_rows, rows), 4 * sms))
        # rows_per_prog is a multiple of the tile height so tiles never straddle programs.
        rows_per_prog = triton.cdiv(triton.cdiv(m_rows, progs), rows) * rows if m_rows else rows
        progs = triton.cdiv(m_rows, rows_per_prog) if m_rows else 1
        dw_part = torch.zeros((progs, n), dtype=torch.float32, device=dy.device)
        db_part = torch.zeros((progs, n), dtype=torch.float32, device=dy.device)
        if m_rows:
            _kernel(_ln_bwd_kernel, dy.device)[(progs,)](
                h, dy2, dres2, weight, mean, rstd, dx, dw_part, db_part,
                h.stride(0), dy2.stride(0), dres2.stride(0), dx.stride(0),
                m_rows, n, rows_per_prog,
                HAS_DRES=has_dres, ROWS=rows, BLOCK_N=block, num_warps=_num_warps(rows * block),
            )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype) if ctx.has_bias else None
        dx = dx.view(shape)
        x_dtype, res_dtype = ctx.in_dtypes
        # d(new_residual)/d(residual) = I: the residual gets the same gradient as x.
        dres_in = dx.to(res_dtype) if ctx.has_res else None
        return dx.to(x_dtype), dw, db, None, dres_in


def layer_norm_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Triton residual add + LayerNorm; same contract as :func:`layer_norm_ref`."""
    if residual is None:
        return LayerNormFn.apply(x, weight, bias, eps, None), x
    return LayerNormFn.apply(x, weight, bias, eps, residual)


# --------------------------------------------------------------------------------------------
# Bias + exact GELU
# --------------------------------------------------------------------------------------------
def _bias_gelu_fwd_kernel(X, B, Y, numel, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + offs % N, mask=m, other=0.0).to(tl.float32)
    z = x + b
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


def _bias_gelu_bwd_kernel(X, B, DY, DZ, numel, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + offs % N, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    z = x + b
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2*pi)
    tl.store(DZ + offs, (dy * (cdf + z * pdf)).to(DZ.dtype.element_ty), mask=m)


_EW_BLOCK = 1024


class BiasGeluFn(torch.autograd.Function):
    """Fused ``gelu(x + bias)`` (exact erf GELU, Triton); recomputes ``x + bias`` in backward."""

    @staticmethod
    def forward(ctx, x, bias):  # type: ignore[override]
        xc = x.contiguous()
        y = torch.empty_like(xc)
        numel = xc.numel()
        if numel:
            _kernel(_bias_gelu_fwd_kernel, x.device)[(triton.cdiv(numel, _EW_BLOCK),)](
                xc, bias, y, numel, bias.numel(), BLOCK=_EW_BLOCK, num_warps=4
            )
        ctx.save_for_backward(xc, bias)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, bias = ctx.saved_tensors
        dyc = dy.contiguous()
        dz = torch.empty_like(x)
        numel = x.numel()
        if numel:
            _kernel(_bias_gelu_bwd_kernel, x.device)[(triton.cdiv(numel, _EW_BLOCK),)](
                x, bias, dyc, dz, numel, bias.numel(), BLOCK=_EW_BLOCK, num_warps=4
            )
        # dbias: a column sum in fp32 (torch's reduction is already bandwidth-bound).
        db = dz.reshape(-1, bias.numel()).float().sum(0).to(bias.dtype)
        return dz, db


def bias_gelu_triton(x: Tensor, bias: Tensor) -> Tensor:
    """Triton ``gelu(x + bias)``; same contract as :func:`bias_gelu_ref`."""
    return BiasGeluFn.apply(x, bias)
