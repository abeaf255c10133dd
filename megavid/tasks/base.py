"""What every video-text task shares: model building (with weight import), loaders, moving a
batch to the device, and the task protocol the engine's Trainer drives.

Tasks override ``training_forward`` (and ``evaluate``) rather than copying the loop
(STYLE rule 9): the loop itself lives in ``megavid.engine.trainer.Trainer``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from megavid.config import Config

log = logging.getLogger(__name__)


class VideoTextTask:
    """Base task for video-text jobs.

    Args:
        cfg: the resolved job config.
    """

    task_name = "base"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.rank = 0
        self.world_size = 1
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The text tokenizer of ``cfg.data.tokenizer`` (built once, from local files)."""
        if self._tokenizer is None:
            from megavid.data.text import build_tokenizer

            self._tokenizer = build_tokenizer(self.cfg.data.tokenizer)
        return self._tokenizer

    # -- engine protocol -----------------------------------------------------------------------
    def setup(
        self,
        device: torch.device,
        dtype: torch.dtype,
        rank: int,
        world_size: int,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.rank, self.world_size = rank, world_size
        self.gather = gather if world_size > 1 else None

    def build_model(self) -> nn.Module:
        from megavid.models import build_model

        model = build_model(self.cfg.model)
        load_initial_weights(model, self.cfg)
        return model

    def build_train_loader(self, rank: int, world_size: int):
        from megavid.data.loader import build_loader

        if not self.cfg.data.quarantine and not self.cfg.run.debug:
            # DALI cannot skip a bad sample by itself: the ones it fails on are kept here
            self.cfg.data.quarantine = str(self.cfg.run_dir / "quarantine.json")

        return build_loader(
            self.cfg.data, self.cfg.data.train, train=True, rank=rank,
            world_size=world_size, seed=self.cfg.run.seed,
        )

    def build_eval_loader(self, split: str, rank: int = 0, world_size: int = 1):
        from megavid.data.loader import build_loader

        return build_loader(
            self.cfg.data, split, train=False, rank=rank, world_size=world_size,
            seed=self.cfg.run.seed,
        )

    def batch_size(self, batch: dict[str, Any]) -> int:
        return int(batch["video"].shape[0])

    def tokens_per_sample(self, batch: dict[str, Any]) -> float:
        """Mean tokens per sample of ``batch``, for the engine's tokens/s.

        Video tokens = frames x patches per frame (``T * (H/p) * (W/p)`` of the clip as fed,
        ``p`` = model.video.patch_size); text tokens = the non-padding tokens
        (``attention_mask`` sum), averaged over the batch.

        Args:
            batch: a loader batch (see the shared contracts).
        """
        _, t, _, h, w = batch["video"].shape
        p = self.cfg.model.video.patch_size
        text = float(batch["attention_mask"].sum()) / max(int(batch["video"].shape[0]), 1)
        return float(t * (h // p) * (w // p)) + text

    def flops_per_sample(self, model: nn.Module) -> float:
        fn = getattr(model, "flops_per_sample", None)
        return float(fn(text_len=self.cfg.data.max_text_len)) if fn is not None else 0.0

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called by the engine after every optimizer step: EMA of the momentum encoders.

        Args:
            model: the trained module (unwrapped from the DeepSpeed engine).
        """
        update = getattr(getattr(model, "module", model), "momentum_update", None)
        if update is not None:
            update()

    # -- helpers -------------------------------------------------------------------------------
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Moves tensors to the device; the uint8 clip becomes a normalized float clip."""
        from megavid.data.transforms import normalize_clip

        out = dict(batch)
        out["video"] = normalize_clip(batch["video"], self.device, self.dtype)
        for k in ("input_ids", "attention_mask"):
            out[k] = batch[k].to(self.device, non_blocking=True)
        return out


def load_initial_weights(model: nn.Module, cfg: Config) -> None:
    """Imports the weights named in the model config (strict; a report of what was loaded)."""
    mc = cfg.model
    if not (mc.weights or mc.text_weights or mc.video_weights):
        return
    from megavid.models import weights as W

    if mc.weights:
        from megavid.engine.checkpoint import load_model_state

        model.load_state_dict(load_model_state(mc.weights), strict=True)
        log.info("loaded model weights from %s", mc.weights)
    if mc.text_weights:
        W.load_bert_into(model.text_encoder, mc.text_weights)
    if mc.video_weights:
        W.load_video_into(model.video_encoder, mc.video_weights, mc.video)
