"""Residual add + LayerNorm: the op (:func:`layer_norm`) and its module, :class:`FusedLayerNorm`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import HAS_TRITON, apex_layer_norm, check_impl, get_backend

if HAS_TRITON:
    from ._triton import layer_norm_triton


def _layer_norm_torch(x, weight, bias, eps, residual):
    new_residual = x if residual is None else x + residual
    y = F.layer_norm(new_residual, (x.shape[-1],), weight, bias, eps)
    return y, new_residual


def _layer_norm_apex(x, weight, bias, eps, residual):
    new_residual = x if residual is None else x + residual
    if bias is None:
        bias = torch.zeros_like(weight)
    y = apex_layer_norm()(new_residual, weight, bias, (x.shape[-1],), eps)
    return y, new_residual


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
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.

    Returns:
        ``(y, new_residual)`` with ``new_residual = x + residual`` (``x`` when no residual).
    """
    backend = get_backend(impl, x, "layer_norm")
    if backend == "triton":
        return layer_norm_triton(x, weight, bias, eps, residual)
    if backend == "apex":
        return _layer_norm_apex(x, weight, bias, eps, residual)
    return _layer_norm_torch(x, weight, bias, eps, residual)


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state dict) running :func:`layer_norm`.

    Args:
        normalized_shape: D (a single trailing dimension).
        eps: added to the variance.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, bias: bool = True,
                 impl: str = "auto", device=None, dtype=None) -> None:  # fmt: skip
        check_impl(impl)
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
