"""Bias add + exact GELU: the op (:func:`bias_gelu`) and its module (:class:`LinearGELU`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backends import HAS_TRITON, check_impl, get_backend

if HAS_TRITON:
    from ._triton import bias_gelu_triton


def bias_gelu(x: Tensor, bias: Tensor, *, impl: str = "auto") -> Tensor:
    """Fused ``gelu(x + bias)`` (exact erf GELU), for a Linear computed without its bias.

    Args:
        x: ``[..., D]`` input.
        bias: ``[D]`` bias.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.
    """
    if get_backend(impl, x, "bias_gelu") == "triton":
        return bias_gelu_triton(x, bias)
    return F.gelu(x + bias)


class LinearGELU(nn.Linear):
    """``gelu(linear(x))`` with the bias add fused into the GELU; same state dict as nn.Linear.

    Args:
        in_features: input width.
        out_features: output width.
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.
    """

    def __init__(self, in_features: int, out_features: int, *, impl: str = "auto",
                 device=None, dtype=None) -> None:  # fmt: skip
        check_impl(impl)
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return bias_gelu(F.linear(x, self.weight), self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"
