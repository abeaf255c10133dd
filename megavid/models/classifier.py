"""A video classifier: a video tower's pooled feature -> a linear class head.

``megavid finetune-cls`` builds it from the VideoLM's video tower (its pooled token, the
standard finetuning feature), so weights named by ``model.weights`` initialise the tower.
"""

from __future__ import annotations

import torch
from torch import nn


class VideoClassifier(nn.Module):
    """A video encoder's pooled feature -> linear class head.

    Args:
        video_encoder: a TimeSformer returning ``(tokens, pooled [B, D])``.
        embed_dim: D.
        num_classes: C.
    """

    def __init__(self, video_encoder: nn.Module, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.video_encoder = video_encoder
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, video_BTCHW: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of normalised clips."""
        _, pooled = self.video_encoder(video_BTCHW)
        return self.head(pooled)

    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        """Non-reentrant activation checkpointing of every ``every_n``-th block of the video
        tower (0: off); ``mode`` picks what those blocks recompute ("full", "attention", "mlp"),
        as ``model.grad_checkpointing_mode`` says."""
        self.video_encoder.set_grad_checkpointing(every_n, mode=mode)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay: biases, norms, embeddings, cls token."""
        return {n for n, p in self.named_parameters()
                if p.ndim < 2 or "embed" in n or n.endswith("cls_token")}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per clip: the analytic TimeSformer count of
        megavid.models.flops plus the head; the stem's input gradient is not computed."""
        from megavid.models.flops import timesformer_forward_flops

        fwd, stem = timesformer_forward_flops(self.video_encoder)
        fwd += 2.0 * self.head.in_features * self.head.out_features
        return 3.0 * fwd - stem


__all__ = ["VideoClassifier"]
