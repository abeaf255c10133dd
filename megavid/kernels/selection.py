"""The ops bound to one implementation name: what ``model.kernel_impl`` selects."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .attention import short_attention
from .backends import check_impl, get_backend
from .gelu import bias_gelu
from .norm import layer_norm


@dataclass(frozen=True)
class KernelImpl:
    """The ops bound to one implementation name (see :func:`get_impl`)."""

    name: str

    def layer_norm(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """:func:`~megavid.kernels.norm.layer_norm` with this implementation."""
        return layer_norm(x, weight, bias, eps, residual, impl=self.name)

    def bias_gelu(self, x: Tensor, bias: Tensor) -> Tensor:
        """:func:`~megavid.kernels.gelu.bias_gelu` with this implementation."""
        return bias_gelu(x, bias, impl=self.name)

    def short_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:  # fmt: skip
        """:func:`~megavid.kernels.attention.short_attention` with this implementation."""
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
    check_impl(name)
    return KernelImpl(name)
