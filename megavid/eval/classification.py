"""Classification metrics (top-k accuracy, multi-label mAP) and zero-shot classifiers.

Conventions as in :mod:`megavid.eval.metrics`: percentages, ties count against the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megavid.errors import ConfigError
from megavid.eval.metrics import average_precision, check_scores, nanmean_percent

# Prompt templates for zero-shot video classification ("{}" is replaced by the class name),
# in the spirit of CLIP's / open_clip's ImageNet templates adapted to video.
DEFAULT_VIDEO_TEMPLATES: tuple[str, ...] = (
    "a video of {}.",
    "a video of a person {}.",
    "a video of someone {}.",
    "a clip of {}.",
    "a video showing {}.",
    "{}",
)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy with ties counted against the model.

    A sample is correct at k when ``1 + #(other classes with score >= the true class) <= k``:
    a wrong class tied with the true one takes the better place. (``torch.topk`` would instead
    pick among ties by memory order.) k larger than the number of classes counts every sample
    as correct.

    Args:
        logits: [N, C] class scores.
        labels: LongTensor [N] true class per sample.
        ks: the k values.

    Returns:
        ``{"top1": ..., "top5": ...}`` in percent.
    """
    check_scores(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device).long()
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({logits.shape[0]},)")
    if labels.numel() == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    true = logits.gather(1, labels[:, None])
    rank = (logits >= true).sum(1)  # includes the true class itself (never NaN)
    return {f"top{k}": float((rank <= k).double().mean() * 100.0) for k in ks}


def per_class_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """AP of each class over the samples (a column of ``scores``), ties against the model.

    Args:
        scores: [N, C] class scores.
        targets: [N, C] binary (0/1 or bool) multi-label targets.

    Returns:
        float64 [C] AP in [0, 1]; NaN for classes without any positive sample.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must be the "
            f"same [N, C]"
        )
    t = targets.to(torch.float64)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("multi-label targets must be 0 or 1")
    return average_precision(scores.T, t.T)


def multilabel_map(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """Multi-label mean average precision (Charades / Charades-Ego style).

    Classes with no positive sample in the evaluation set have no defined AP and are excluded
    from the mean (as the Charades evaluation code does); ``num_classes`` says how many counted.
    Samples without any label stay in (they are negatives for every class). Ties against the
    model; equal to the mean of scikit-learn's ``average_precision_score`` per class when no
    scores tie.

    Args:
        scores: [N, C] class scores.
        targets: [N, C] binary targets.

    Returns:
        ``{"mAP": percent, "num_classes": classes evaluated}``.
    """
    ap = per_class_average_precision(scores, targets)
    value, num = nanmean_percent(ap, "class with a positive sample")
    return {"mAP": value, "num_classes": float(num)}


def build_zeroshot_classifier(
    encode_text_fn: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_VIDEO_TEMPLATES,
    *,
    batch_size: int = 256,
) -> Tensor:
    """Class embeddings from class names through prompt templates (CLIP / open_clip recipe).

    For each class, every template is filled with the class name and encoded; the embeddings
    are L2-normalised, averaged over templates and normalised again, so each template has the
    same weight whatever its embedding norm.

    Args:
        encode_text_fn: maps a list of strings to a [n, D] embedding tensor (e.g. tokenizer +
            ``model.encode_text``); called under ``torch.no_grad`` in batches.
        classnames: the class names, in label order.
        templates: format strings each holding one ``{}``.
        batch_size: strings per ``encode_text_fn`` call.

    Returns:
        float32 [D, C]: the classifier, so ``logits = video_feat @ classifier``.
    """
    if not classnames:
        raise ConfigError("zero-shot classification needs at least one class name")
    if not templates:
        raise ConfigError("zero-shot classification needs at least one prompt template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(
            f"prompt template(s) {bad!r} must contain exactly one '{{}}' where the class name goes"
        )
    texts = [t.format(c) for c in classnames for t in templates]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            emb = torch.as_tensor(encode_text_fn(texts[start : start + batch_size]))
            if emb.ndim != 2 or emb.shape[0] != len(texts[start : start + batch_size]):
                raise ValueError(
                    f"encode_text_fn returned shape {tuple(emb.shape)} for "
                    f"{len(texts[start : start + batch_size])} strings; expected [n, D]"
                )
            chunks.append(F.normalize(emb.float(), dim=-1))
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    classifier = F.normalize(emb.mean(1), dim=-1)
    return classifier.T.contiguous()
