"""The results of the classification jobs (finetune-cls, eval-zeroshot-cls, linear-probe),
scored and written one way: top-1/top-5 or mAP beside chance, and the results JSON with the
per-sample class scores beside it (``<name>_scores.pt``), so every reported number can be
recomputed elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megavid.config import Config, to_dict
from megavid.tasks.labels import LabelSpace


def evaluate_classifier(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """top-1/top-5 (single-label) or mAP (multi-label), in percent."""
    from megavid.eval import multilabel_map, topk_accuracy

    if multilabel:
        return multilabel_map(logits.float(), targets)
    return topk_accuracy(logits.float(), targets, ks=(1, min(5, logits.shape[1])))


def chance_levels(targets: torch.Tensor, labels: LabelSpace) -> dict[str, float]:
    """What a random classifier scores on ``targets``: 1/C (top-1) and k/C (top-k), or for
    multi-label the mean positive rate of the classes that have a positive (a random ranking's
    AP is about the positive rate of its class)."""
    if labels.multilabel:
        pos = targets.float().mean(0)
        return {"mAP": float(pos[pos > 0].mean() * 100) if bool((pos > 0).any()) else 0.0}
    c = labels.num_classes
    return {"top1": 100.0 / c, f"top{min(5, c)}": 100.0 * min(5, c) / c}


def class_result(split: str, keys: list[str], scores: torch.Tensor, targets: torch.Tensor,
                 labels: LabelSpace) -> dict[str, Any]:
    """The results of class ``scores`` [N, C] on a split: metrics, chance and the label space.

    Args:
        split: the split evaluated.
        keys: the samples' keys (row order).
        scores: [N, C] class scores.
        targets: [N] class indices, or [N, C] multi-hot.
        labels: the label space.
    """
    return {"split": split, "num_samples": len(keys),
            "metrics": evaluate_classifier(scores, targets, labels.multilabel),
            "chance": chance_levels(targets, labels), "labels": labels.to_dict()}


def write_scores(path: str | os.PathLike[str], keys: list[str], scores: torch.Tensor,
                 targets: torch.Tensor, labels: LabelSpace) -> dict[str, str]:
    """Per-sample class scores beside a results JSON, so every reported number can be
    recomputed elsewhere (a test, a significance test between two runs, another metric).

    The file is a ``torch.save`` dict: ``keys`` (sample keys, row order), ``scores`` [N, C]
    (exactly the tensor the metrics were computed from), ``targets`` ([N] class indices, or
    [N, C] multi-hot), ``classes`` and ``multilabel``.

    Args:
        path: the ``.pt`` file to write.
        keys: sample keys.
        scores: [N, C] class scores.
        targets: the targets the metrics used.
        labels: the label space.

    Returns:
        ``{"file": name, "sha256": digest}`` for the results JSON.
    """
    from megavid.eval.results import file_sha256

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"keys": list(keys), "scores": scores.detach().cpu(), "targets": targets.detach().cpu(),
                "classes": list(labels.classes), "multilabel": labels.multilabel}, p)
    return {"file": p.name, "sha256": file_sha256(p)}


def write_class_results(out: Path, result: dict[str, Any], cfg: Config, keys: list[str],
                        scores: torch.Tensor, targets: torch.Tensor, labels: LabelSpace,
                        weights: str | None, **provenance: Any) -> None:
    """Writes ``out`` (the results JSON: ``result``, the config, the weights' hash) and the
    class scores beside it (``<out stem>_scores.pt``, named in ``result["scores"]``).

    Args:
        out: the results JSON.
        result: what the job measured (gets ``scores``).
        cfg: the job's config.
        keys: the samples' keys (row order of ``scores``).
        scores: [N, C] class scores the metrics were computed from.
        targets: the targets the metrics used.
        labels: the label space.
        weights: the evaluated checkpoint or file (None: random init or imported weights).
        **provenance: ``step`` and ``imported`` of :func:`megavid.eval.results.write_results`.
    """
    from megavid.eval.results import write_results

    result["scores"] = write_scores(out.with_name(f"{out.stem}_scores.pt"), keys, scores, targets, labels)
    write_results(out, result, to_dict(cfg), weights, **provenance)


__all__ = ["chance_levels", "class_result", "evaluate_classifier", "write_class_results", "write_scores"]
