"""Switch an existing model to the fused modules in place (:func:`apply_fused_kernels`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .backends import check_impl
from .gelu import LinearGELU
from .norm import FusedLayerNorm


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

    - each ``nn.LayerNorm`` (or timm ``LayerNorm``) over one trailing dim becomes a
      :class:`FusedLayerNorm`;
    - an MLP written timm-style (children ``fc1: nn.Linear`` then ``act``: exact GELU, as in
      timm's ``Mlp`` and megavid's blocks) gets ``fc1 -> LinearGELU`` and ``act -> Identity``.

    The parameters are moved, not copied, so optimiser state, DeepSpeed partitioning done
    *after* this call and checkpoints are unaffected; outputs match up to rounding.

    Args:
        module: the model (or any submodule).
        impl: one of :data:`~megavid.kernels.backends.IMPLS`.

    Returns:
        ``{"layer_norm": n, "bias_gelu": m}``: how many modules were swapped.
    """
    check_impl(impl)
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
