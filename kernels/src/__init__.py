"""Fused kernels for megavid (installed as ``megavid.kernels``), each with a torch reference.

Ops (all differentiable, all computing in fp32 and returning the input dtype):

- :func:`layer_norm`: residual add + LayerNorm, ``(y, new_residual)``.
- :func:`bias_gelu`: ``gelu(x + bias)`` with the exact erf GELU.
- :func:`short_attention`: softmax attention over short sequences (T <= 128; the temporal
  attention of divided space-time TimeSformer, T = 8..96) with an optional key padding mask.
- :func:`divided_temporal_attention`: that temporal attention read straight out of the qkv
  projection of a ``[B, 1+N*T, 3*D]`` token tensor (no cls slicing, no permute copies).
- :func:`divided_spatial_attention`: the spatial attention of the same block, also on the
  ``[B, 1+N*T, 3*D]`` qkv and writing ``[B, 1+N*T, D]``: no cls repeat/cat, no (n t)<->(t n)
  permutations (index math inside the kernel).
- :func:`divided_block_forward`: a whole divided space-time block built from the above.

Implementations, chosen by name (:func:`get_impl`, or ``impl=`` on each op):

- ``"torch"``: torch's own fused ops (``F.layer_norm``, ``F.gelu``, SDPA).
- ``"triton"``: the Triton kernels of this package. They run on CUDA tensors; on CPU tensors
  only in a process that imported triton under ``TRITON_INTERPRET=1`` (Triton's interpreter,
  for tests); elsewhere they fall back to ``"torch"`` with a warning.
- ``"apex"``: NVIDIA apex's FusedLayerNorm for :func:`layer_norm` when apex is importable and
  the tensor is on CUDA (apex is never a dependency); the other ops behave as ``"auto"``.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable, ``"torch"`` otherwise.

The plain-math references (``*_ref``, :mod:`megavid.kernels.reference`) are the test oracles;
:mod:`megavid.kernels.aot` compiles every kernel for a GPU architecture without a GPU.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavid.errors import ConfigError

from .layout import divided_temporal_qkv
from .reference import (
    bias_gelu_ref,
    divided_spatial_attention_ref,
    divided_temporal_attention_ref,
    layer_norm_ref,
    short_attention_ref,
)

try:  # Triton is optional: without it every op runs its torch implementation.
    from . import _triton, _triton_attention

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure (no triton, broken driver) means "no"
    _triton = _triton_attention = None  # type: ignore[assignment]
    HAS_TRITON = False

MAX_SHORT_T = 128
"""Longest sequence :func:`short_attention` runs in Triton; longer ones use SDPA."""

IMPLS = ("torch", "triton", "apex", "auto")

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "FusedLayerNorm",
    "KernelImpl",
    "LinearGELU",
    "apply_fused_kernels",
    "bias_gelu",
    "bias_gelu_ref",
    "divided_block_forward",
    "divided_spatial_attention",
    "divided_spatial_attention_ref",
    "divided_temporal_attention",
    "divided_temporal_attention_ref",
    "divided_temporal_qkv",
    "get_backend",
    "get_impl",
    "has_apex",
    "layer_norm",
    "layer_norm_ref",
    "short_attention",
    "short_attention_ref",
]


# --------------------------------------------------------------------------------------------
# Backend resolution
# --------------------------------------------------------------------------------------------
@functools.cache
def _apex_layer_norm() -> Callable | None:
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception:  # noqa: BLE001 - apex absent or built without its CUDA extensions
        return None
    return fused_layer_norm_affine


def has_apex() -> bool:
    """True when NVIDIA apex's fused LayerNorm is importable."""
    return _apex_layer_norm() is not None


def _check_name(name: str) -> None:
    if name not in IMPLS:
        raise ConfigError(
            f"unknown kernel implementation {name!r}; use one of {', '.join(IMPLS)} "
            "(e.g. model.kernel_impl=auto)"
        )


@functools.cache
def _warn_fallback(op: str, name: str, why: str) -> None:
    # functools.cache: one warning per (op, impl, reason) per process, not one per call.
    warnings.warn(f"megavid.kernels.{op}: impl={name!r} falls back to torch: {why}", stacklevel=3)


def get_backend(name: str, x: Tensor, op: str = "layer_norm") -> str:
    """Which backend actually runs ``op`` under implementation ``name`` for tensor ``x``.

    Args:
        name: one of :data:`IMPLS`.
        x: the op's main input (its device decides).
        op: ``"layer_norm"``, ``"bias_gelu"`` or ``"short_attention"`` (apex only has the first).

    Returns:
        ``"torch"``, ``"triton"`` or ``"apex"``.
    """
    _check_name(name)
    if name == "torch":
        return "torch"
    if name == "apex":
        if op == "layer_norm":
            if x.is_cuda and has_apex():
                return "apex"
            if not has_apex():
                _warn_fallback(op, name, "apex is not importable")
            return "torch"
        name = "auto"
    if name == "auto":
        return "triton" if HAS_TRITON and x.is_cuda else "torch"
    # name == "triton"
    if not HAS_TRITON:
        _warn_fallback(op, name, "triton is not importable")
        return "torch"
    if x.is_cuda or (x.device.type == "cpu" and _triton.INTERPRETED):
        return "triton"
    _warn_fallback(op, name, f"{x.device.type} tensors need CUDA, or Triton's interpreter "
                   "(TRITON_INTERPRET=1 set before triton is imported)")  # fmt: skip
    return "torch"


# --------------------------------------------------------------------------------------------
# torch implementations (torch's own fused ops)
# --------------------------------------------------------------------------------------------
def _layer_norm_torch(x, weight, bias, eps, residual):
    new_residual = x if residual is None else x + residual
    y = F.layer_norm(new_residual, (x.shape[-1],), weight, bias, eps)
    return y, new_residual


def _layer_norm_apex(x, weight, bias, eps, residual):
    new_residual = x if residual is None else x + residual
    if bias is None:
        bias = torch.zeros_like(weight)
    y = _apex_layer_norm()(new_residual, weight, bias, (x.shape[-1],), eps)
    return y, new_residual


def _bias_gelu_torch(x, bias):
    return F.gelu(x + bias)


def _short_attention_torch(q, k, v, mask, scale):
    attn_mask = None if mask is None else mask.bool()[..., None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if mask is not None:
        # SDPA gives NaN (or garbage, by backend) for a query whose keys are all padded; the
        # contract (and the Triton kernel) says zeros. Unconditional: no host sync on the GPU.
        dead = ~mask.bool().any(-1)
        o = o.masked_fill(dead[..., None, None, None], 0.0)
    return o


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------
def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    *,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused residual add + LayerNorm over the last dimension.

    Pre-norm blocks call it as ``y, h = layer_norm(branch_out, w, b, eps, residual=h)``:
    one pass adds the branch output to the residual stream and normalises the sum.

    Args:
        x: ``[..., D]`` input.
        weight: ``[D]`` scale.
        bias: ``[D]`` shift, or None.
        eps: added to the variance.
        residual: optional ``[..., D]`` residual stream, same dtype as ``x``.
        impl: one of :data:`IMPLS`.

    Returns:
        ``(y, new_residual)`` with ``new_residual = x + residual`` (``x`` when no residual).
    """
    backend = get_backend(impl, x, "layer_norm")
    if backend == "triton":
        return _triton.layer_norm_triton(x, weight, bias, eps, residual)
    if backend == "apex":
        return _layer_norm_apex(x, weight, bias, eps, residual)
    return _layer_norm_torch(x, weight, bias, eps, residual)


def bias_gelu(x: Tensor, bias: Tensor, *, impl: str = "auto") -> Tensor:
    """Fused ``gelu(x + bias)`` (exact erf GELU), for a Linear computed without its bias.

    Args:
        x: ``[..., D]`` input.
        bias: ``[D]`` bias.
        impl: one of :data:`IMPLS`.
    """
    if get_backend(impl, x, "bias_gelu") == "triton":
        return _triton.bias_gelu_triton(x, bias)
    return _bias_gelu_torch(x, bias)


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
        impl: one of :data:`IMPLS`. Sequences longer than :data:`MAX_SHORT_T` use SDPA.

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
        return _triton_attention.short_attention_triton(q, k, v, mask, scale)
    return _short_attention_torch(q, k, v, mask, scale)


# --------------------------------------------------------------------------------------------
# Divided space-time layout
# --------------------------------------------------------------------------------------------
def divided_temporal_attention(
    qkv: Tensor, num_frames: int, num_heads: int, *, impl: str = "auto"
) -> Tensor:
    """Temporal attention of a divided space-time block, straight from the qkv projection.

    Args:
        qkv: ``[B, 1 + N*T, 3*D]`` qkv projection of all tokens (cls first, ignored here).
        num_frames: T.
        num_heads: H.
        impl: one of :data:`IMPLS`.

    Returns:
        ``[B, N*T, D]`` attention output of the patch tokens (before the output projection),
        in the token order of the input. With Triton nothing is copied: the kernel reads the
        q/k/v views, writes ``[B, N, T, H, Dh]`` memory (which is ``[B, N*T, D]``), and its
        backward writes one ``[B, 1+N*T, 3*D]`` gradient for ``qkv``.
    """
    if get_backend(impl, qkv, "short_attention") == "triton" and num_frames <= MAX_SHORT_T:
        return _triton_attention.divided_temporal_attention_triton(qkv, num_frames, num_heads)
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
        impl: one of :data:`IMPLS`.

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
        return _triton_attention.divided_spatial_attention_triton(qkv, num_frames, num_heads)
    return divided_spatial_attention_ref(
        qkv, num_frames, num_heads, attention=F.scaled_dot_product_attention
    )


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
        impl: one of :data:`IMPLS`.

    Under DeepSpeed ZeRO-3, parameters are gathered when their module is *called*: run
    :func:`apply_fused_kernels` first, so the norms are :class:`FusedLayerNorm` and fc1 a
    :class:`LinearGELU`, which are called as modules here (plain ``nn.LayerNorm``/``nn.Linear``
    are read by attribute, fine for ZeRO 0-2).

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


# --------------------------------------------------------------------------------------------
# Selection object and modules
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelImpl:
    """The ops bound to one implementation name (see :func:`get_impl`)."""

    name: str

    def layer_norm(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """:func:`layer_norm` with this implementation."""
        return layer_norm(x, weight, bias, eps, residual, impl=self.name)

    def bias_gelu(self, x: Tensor, bias: Tensor) -> Tensor:
        """:func:`bias_gelu` with this implementation."""
        return bias_gelu(x, bias, impl=self.name)

    def short_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:  # fmt: skip
        """:func:`short_attention` with this implementation."""
        return short_attention(q, k, v, mask, scale=scale, impl=self.name)

    def backend(self, x: Tensor, op: str = "layer_norm") -> str:
        """The backend that runs ``op`` for tensor ``x`` (see :func:`get_backend`)."""
        return get_backend(self.name, x, op)


def get_impl(name: str = "auto") -> KernelImpl:
    """Look up a kernel implementation by name.

    Args:
        name: ``"torch"``, ``"triton"``, ``"apex"`` or ``"auto"``; anything else raises
            :class:`~megavid.errors.ConfigError`. The backend is resolved per call from the
            tensor's device (see :func:`get_backend`), so one object serves CPU and GPU.
    """
    _check_name(name)
    return KernelImpl(name)


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state dict) running :func:`layer_norm`.

    Args:
        normalized_shape: D (a single trailing dimension).
        eps: added to the variance.
        impl: one of :data:`IMPLS`.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, bias: bool = True,
                 impl: str = "auto", device=None, dtype=None) -> None:  # fmt: skip
        _check_name(impl)
        super().__init__(normalized_shape, eps, elementwise_affine=True, bias=bias,
                         device=device, dtype=dtype)  # fmt: skip
        if len(self.normalized_shape) != 1:
            raise ValueError("FusedLayerNorm normalises one trailing dimension only")
        self.impl = impl

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``LayerNorm(x)``; with ``residual``: ``(LayerNorm(x + residual), x + residual)``.

        The residual form goes through ``__call__`` too, so module hooks (DeepSpeed ZeRO-3's
        parameter gathering) fire for it.
        """
        y, new_residual = layer_norm(x, self.weight, self.bias, self.eps, residual,
                                     impl=self.impl)  # fmt: skip
        return y if residual is None else (y, new_residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"


class LinearGELU(nn.Linear):
    """``gelu(linear(x))`` with the bias add fused into the GELU; same state dict as nn.Linear.

    Args:
        in_features: input width.
        out_features: output width.
        impl: one of :data:`IMPLS`.
    """

    def __init__(self, in_features: int, out_features: int, *, impl: str = "auto",
                 device=None, dtype=None) -> None:  # fmt: skip
        _check_name(impl)
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return bias_gelu(F.linear(x, self.weight), self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"


def _is_plain_layer_norm(m: nn.Module) -> bool:
    # Exact types only: subclasses such as timm's LayerNorm2d permute channels first. timm's
    # own ``LayerNorm`` is the plain op (optionally through its "fast norm" path).
    plain = type(m) is nn.LayerNorm or (
        type(m).__name__ == "LayerNorm" and type(m).__module__.startswith("timm.")
    )
    return plain and len(m.normalized_shape) == 1 and m.elementwise_affine


def _is_exact_gelu(m: nn.Module) -> bool:
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    # transformers' GELUActivation (BERT's "gelu") is the exact erf GELU.
    return type(m).__name__ == "GELUActivation" and getattr(m, "act", None) is F.gelu


def apply_fused_kernels(module: nn.Module, impl: str = "auto") -> dict[str, int]:
    """Swap fusable submodules of ``module`` in place, keeping every parameter and its name.

    - each ``nn.LayerNorm`` (or timm ``LayerNorm``) over one trailing dim becomes a :class:`FusedLayerNorm`;
    - an MLP written timm-style (children ``fc1: nn.Linear`` then ``act``: exact GELU, as in
      timm's ``Mlp`` and megavid's blocks) gets ``fc1 -> LinearGELU`` and ``act -> Identity``.

    The parameters are moved, not copied, so optimiser state, DeepSpeed partitioning done
    *after* this call and checkpoints are unaffected; outputs match up to rounding.

    Args:
        module: the model (or any submodule).
        impl: one of :data:`IMPLS`.

    Returns:
        ``{"layer_norm": n, "bias_gelu": m}``: how many modules were swapped.
    """
    _check_name(impl)
    counts = {"layer_norm": 0, "bias_gelu": 0}
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if _is_plain_layer_norm(child):
                new = FusedLayerNorm(child.normalized_shape[0], child.eps,
                                     bias=child.bias is not None, impl=impl,
                                     device="meta")  # fmt: skip
                new.weight, new.bias = child.weight, child.bias
                new.train(child.training)
                setattr(parent, child_name, new)
                counts["layer_norm"] += 1
        fc1, act = getattr(parent, "fc1", None), getattr(parent, "act", None)
        if (type(fc1) is nn.Linear and fc1.bias is not None and act is not None
                and _is_exact_gelu(act)):  # fmt: skip
            new = LinearGELU(fc1.in_features, fc1.out_features, impl=impl, device="meta")
            new.weight, new.bias = fc1.weight, fc1.bias
            new.train(fc1.training)
            parent.fc1 = new
            parent.act = nn.Identity()
            counts["bias_gelu"] += 1
    return counts
