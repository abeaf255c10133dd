"""Video classification finetuning (``megavid finetune-cls``): single- and multi-label, through
the one engine loop, then a test of the final checkpoint on ``eval.split``.

The classifier (:class:`megavid.models.classifier.VideoClassifier`) is the video tower of the
VideoLM (its pooled token, the standard finetuning feature) plus a linear head; weights named
by ``model.weights`` (a pretrained VideoLM) initialise the tower. Labels and class names:
:mod:`megavid.tasks.labels`; the results files: :mod:`megavid.tasks.class_results`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megavid.config import Config
from megavid.tasks.base import VideoTextTask, train_task
from megavid.tasks.class_results import class_result, evaluate_classifier, write_class_results
from megavid.tasks.evaluation import EvalWeights, encode_split, load_eval_model
from megavid.tasks.labels import LabelSpace, build_label_space


class ClassificationTask(VideoTextTask):
    """Finetune a video classifier: softmax cross-entropy, or per-class BCE (multi-label)."""

    task_name = "classification"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._labels: LabelSpace | None = None

    @property
    def labels(self) -> LabelSpace:
        """The label space of ``task.cls`` (built once)."""
        if self._labels is None:
            self._labels = build_label_space(self.cfg)
        return self._labels

    def build_model(self) -> nn.Module:
        from megavid.models.classifier import VideoClassifier

        videolm = super().build_model()  # loads model.weights / video_weights when set
        return VideoClassifier(videolm.video_encoder, self.cfg.model.video.embed_dim,
                               self.labels.num_classes)

    def flops_per_sample(self, model: nn.Module) -> float:
        return float(getattr(model, "module", model).flops_per_sample())

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from megavid.data.transforms import normalize_clip

        video = normalize_clip(batch["video"], self.device, self.dtype)
        y = self.labels.targets(batch["meta"]).to(self.device)
        logits = model(video).float()
        if self.labels.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = F.cross_entropy(logits, y)
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(logits [N, C], targets as float, keys) of a split, every sample once (all ranks
        gathered, dataset order)."""
        from megavid.data.transforms import normalize_clip

        def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            video = normalize_clip(batch["video"], self.device, self.dtype)
            return {"logits": model(video).float(), "targets": self.labels.targets(batch["meta"]).float()}

        out = encode_split(self.build_eval_loader(split, self.rank, self.world_size), encode)
        return out["logits"], out["targets"], out["keys"]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy (or mAP) on ``data.val`` (run by the engine every ``train.eval_every``)."""
        logits, y, _ = self.predict(model, self.cfg.data.val)
        return evaluate_classifier(logits, y if self.labels.multilabel else y.long(),
                                   self.labels.multilabel)


def run_finetune_cls(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid finetune-cls`: finetune a classifier with the engine, then evaluate the final
    checkpoint on ``eval.split``; writes ``<run_dir>/eval/cls_<split>.json`` (and its
    ``_scores.pt``).

    Args:
        cfg: the resolved config (``task.cls`` for labels; its ``task.name``, when set, must
            be classification).
        overwrite: start afresh in an existing run directory.
        resume: resume training from this checkpoint.
    """
    from megavid.engine.checkpoint import find_checkpoint

    trained = train_task(cfg, ClassificationTask, "finetune-cls", overwrite=overwrite, resume=resume)
    task, cfg = trained.task, trained.task.cfg  # cfg: task.name=classification
    ckpt = find_checkpoint(cfg.run_dir)
    if ckpt is None:  # debug runs write no checkpoint
        return {"train": trained.summary}
    task.dtype = torch.float32  # the test runs in fp32 whatever the training precision
    model = load_eval_model(task, EvalWeights(ckpt))
    logits, y, keys = task.predict(model, cfg.eval.split)
    labels = task.labels
    targets = y if labels.multilabel else y.long()
    result = {**class_result(cfg.eval.split, keys, logits, targets, labels), "train": trained.summary}
    if task.rank == 0:
        out = Path(cfg.run_dir) / "eval" / f"cls_{cfg.eval.split}.json"
        write_class_results(out, result, cfg, keys, logits, targets, labels, ckpt)
        print(f"finetune-cls on {len(keys)} clips of '{cfg.eval.split}': "
              + ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items()) + f"\nresults: {out}")
    return result


__all__ = ["ClassificationTask", "LabelSpace", "run_finetune_cls"]
