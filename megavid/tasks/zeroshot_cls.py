"""Zero-shot classification (``megavid eval-zeroshot-cls``): the clips of a split classified by
the similarity of their video feature to prompts built from the class names, with no training
(CLIP's recipe: each class's prompt embeddings averaged, :func:`megavid.eval.build_zeroshot_classifier`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megavid.config import Config
from megavid.tasks.base import VideoTextTask
from megavid.tasks.class_results import class_result, write_class_results
from megavid.tasks.evaluation import encode_split, encode_texts, open_eval, select_eval_weights
from megavid.tasks.labels import build_label_space


@torch.no_grad()
def zeroshot_classifier(model: nn.Module, task: VideoTextTask, classes: list[str],
                        templates: list[str] | None = None) -> torch.Tensor:
    """The [P, C] zero-shot classifier of a VideoLM: prompt embeddings averaged per class.

    Args:
        model: a VideoLM.
        task: gives the tokenizer, text length, device and ranks (:func:`encode_texts`).
        classes: class names in label order.
        templates: prompt templates ("{}" = class name); None: the default video templates.
    """
    from megavid.eval import DEFAULT_VIDEO_TEMPLATES, build_zeroshot_classifier

    return build_zeroshot_classifier(lambda texts: encode_texts(model, texts, task)[0], classes,
                                     templates or DEFAULT_VIDEO_TEMPLATES)


def run_eval_zeroshot_cls(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid eval-zeroshot-cls`: zero-shot classification of ``eval.split`` with a pretrained
    VideoLM; writes ``<run_dir>/eval/zeroshot_cls_<split>_step<N>.json`` (and its ``_scores.pt``).

    Without a recorded step the file is named by the weights file's stem, ``_imported`` (tower
    weights alone) or ``_random`` (``eval.checkpoint=random``); see
    :func:`megavid.eval.results.results_path`.

    Args:
        cfg: the resolved config (``task.cls``: labels, classes, templates).
        overwrite: replace an existing results file (else it is refused before evaluating).
        resume: the checkpoint to evaluate (default: eval.checkpoint, the run's latest, or the
            model config's imported weights in a run folder without weights).
    """
    from megavid.eval.results import results_path

    weights = select_eval_weights(cfg, resume, allow_random=True)
    out = results_path(cfg.run_dir, "zeroshot_cls", cfg.eval.split, step=weights.step,
                       weights=weights.name, overwrite=overwrite)
    labels = build_label_space(cfg)
    task, model = open_eval(cfg, weights)

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"video": model.encode_video(task.to_device(batch)["video"])[1].float()}

    split = encode_split(task.build_eval_loader(cfg.eval.split, task.rank, task.world_size), encode)
    templates = list(cfg.task.cls.templates)
    logits = split["video"] @ zeroshot_classifier(model, task, labels.classes, templates)
    y = labels.targets(split["meta"])
    result = {**class_result(cfg.eval.split, split["keys"], logits, y, labels),
              "templates": templates or None}
    if task.rank == 0:
        write_class_results(out, result, cfg, split["keys"], logits, y, labels, weights.path,
                            step=weights.step, imported=weights.imported)
        print(f"zero-shot classification on {len(split['keys'])} clips: "
              + ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items())
              + f" (chance {result['chance']})\nresults: {out}")
    return result


__all__ = ["run_eval_zeroshot_cls", "zeroshot_classifier"]
