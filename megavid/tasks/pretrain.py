"""Pretraining: VTC + VTM + MLM on video-text shards, through the one engine loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megavid.config import Config
from megavid.tasks.base import VideoTextTask, train_task
from megavid.tasks.registry import get_task


class PretrainTask(VideoTextTask):
    """Video-text pretraining; the objectives and their weights come from ``cfg.model``."""

    task_name = "pretrain"

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = self.to_device(batch)
        return model(b["video"], b["input_ids"], b["attention_mask"], gather=self.gather)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Zero-shot retrieval on the validation split (run by the engine every N steps)."""
        from megavid.tasks.zeroshot import evaluate_retrieval

        loader = self.build_eval_loader(self.cfg.data.val, self.rank, self.world_size)
        return evaluate_retrieval(model, loader, self, k_test=0)["metrics"]


def run_pretrain(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid pretrain`: trains the task ``task.name`` names (default pretrain) with the engine."""
    return train_task(cfg, get_task(cfg.task.name), "pretrain", overwrite=overwrite, resume=resume).summary
