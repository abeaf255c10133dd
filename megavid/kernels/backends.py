"""Which backend runs an op: implementation names, what is importable, per-tensor resolution.

Every op of :mod:`megavid.kernels` takes an implementation name (:data:`IMPLS`) and asks
:func:`get_backend` what actually runs for its input tensor, so one name serves CPU and GPU.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

from torch import Tensor

from megavid.errors import ConfigError

try:  # Triton is optional: without it every op runs its torch implementation.
    from . import _triton, _triton_attention, _triton_spatial  # noqa: F401  (all must import)

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure (no triton, broken driver) means "no"
    _triton = None  # type: ignore[assignment]
    HAS_TRITON = False

IMPLS = ("torch", "triton", "apex", "auto")
"""Implementation names accepted by every op, module and ``model.kernel_impl``."""


@functools.cache
def apex_layer_norm() -> Callable | None:
    """apex's ``fused_layer_norm_affine``; None when apex or its CUDA extensions are absent."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception:  # noqa: BLE001 - apex absent or built without its CUDA extensions
        return None
    return fused_layer_norm_affine


def has_apex() -> bool:
    """True when NVIDIA apex's fused LayerNorm is importable."""
    return apex_layer_norm() is not None


def check_impl(name: str) -> None:
    """Raise :class:`~megavid.errors.ConfigError` naming the valid choices for an unknown name."""
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
    check_impl(name)
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
