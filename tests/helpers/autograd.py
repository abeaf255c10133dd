"""What a forward pass keeps for backward, measured with autograd's saved-tensor hooks (the
oracle of the activation-checkpointing tests)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
