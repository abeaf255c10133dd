"""Pretraining: VTC + VTM + MLM on video-text shards, through the one engine loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megavid.config import Config
from megavid.tasks import register_task
from megavid.tasks.base import VideoTextTask


@register_task("pretrain")
class PretrainTask(VideoTextTask):
    """Video-text pretraining; the objectives and their weights come from ``cfg.model``."""

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = self.to_device(batch)
        return model(b["video"], b["input_ids"], b["attention_mask"], gather=self.gather)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Zero-shot retrieval on the validation split (run by the engine every N steps)."""
        from megavid.tasks.zeroshot import evaluate_retrieval

        loader = self.build_eval_loader(self.cfg.data.val, self.rank, self.world_size)
        return evaluate_retrieval(model, loader, self, k_test=0)["metrics"]


def run_pretrain(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid pretrain`: trains ``cfg.task.name`` (default pretrain) with the engine."""
    from megavid.engine.trainer import Trainer
    from megavid.tasks import get_task

    check_data(cfg, cfg.data.train)
    task = get_task(cfg.task.name)(cfg)
    return Trainer(cfg, task, overwrite=overwrite, resume=resume).fit()


def check_data(cfg: Config, *splits: str) -> None:
    """Fails fast, before any process group or model is built, when shards are missing."""
    if cfg.data.name != "shards":
        return
    from megavid.data.table import get_split_spec
    from megavid.shards.format import list_shards

    for split in splits:
        list_shards(get_split_spec(cfg.data, split), cfg.data.root)
