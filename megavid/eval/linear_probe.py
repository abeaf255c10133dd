"""Linear probing of frozen features: an L2-regularised linear classifier fitted by full-batch
L-BFGS, with the regularisation strength chosen on a validation split.

The standard protocol for comparing pretrained encoders (CLIP's and Omnivision's linear
probes): features are extracted once (the caller caches them), standardised with the training
statistics, and a logistic-regression head is fitted for each weight decay of a sweep; the one
with the best validation score is kept. Single-label heads use softmax cross-entropy (scored by
top-1 accuracy), multi-label heads per-class sigmoid BCE (scored by mAP). The objective is

    mean_i loss_i + weight_decay / 2 * ||W||^2     (the bias is not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``: the same optimum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from megavid.errors import ConfigError, DataError
from megavid.eval.classification import multilabel_map, topk_accuracy

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

# Below this many multiply-adds per objective evaluation (N x D x C) the fit runs on one CPU
# thread: the L-BFGS closure is a handful of tiny ops, and intra-op threads that must meet
# after each of them cost more than they save (measured 10x slower with 2 threads on a loaded
# 2-core machine for a 64 x 128 x 8 probe).
SINGLE_THREAD_MACS = 1 << 22


@contextlib.contextmanager
def _threads_for(macs: int) -> Iterator[None]:
    """One intra-op thread for small problems (restored afterwards); unchanged otherwise."""
    before = torch.get_num_threads()
    if macs >= SINGLE_THREAD_MACS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LinearProbe:
    """A fitted linear head over standardised features."""

    weight: Tensor
    """[C, D] float64."""
    bias: Tensor
    """[C] float64."""
    mean: Tensor
    """[D] training-feature mean (zeros when not standardised)."""
    std: Tensor
    """[D] training-feature std (ones when not standardised)."""
    weight_decay: float
    multilabel: bool
    sweep: dict[float, float] = field(default_factory=dict)
    """weight decay -> validation score (top-1 accuracy or mAP, percent)."""

    def logits(self, feat: Tensor) -> Tensor:
        """Class scores of raw (unstandardised) features.

        Args:
            feat: [N, D] features, as extracted.

        Returns:
            float64 [N, C].
        """
        x = (feat.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def score(self, feat: Tensor, labels: Tensor) -> dict[str, float]:
        """Metrics of the probe on labelled features: top-1/top-5 or mAP (percent).

        Args:
            feat: [N, D] features.
            labels: LongTensor [N] (single-label) or binary [N, C] (multi-label).
        """
        logits = self.logits(feat)
        if self.multilabel:
            return multilabel_map(logits, labels)
        return topk_accuracy(logits, labels, ks=(1, min(5, logits.shape[1])))


def _check(feat: Tensor, labels: Tensor, multilabel: bool, num_classes: int | None) -> int:
    if feat.ndim != 2 or feat.shape[0] == 0:
        raise DataError(f"linear probe needs [N, D] features with N > 0, got {tuple(feat.shape)}")
    if not torch.isfinite(feat).all():
        raise DataError("features contain NaN/inf; re-extract them from a finite checkpoint")
    if multilabel:
        if labels.shape[0] != feat.shape[0] or labels.ndim != 2:
            raise ValueError(f"multi-label targets must be [N, C], got {tuple(labels.shape)}")
        return labels.shape[1]
    if labels.shape != (feat.shape[0],):
        raise ValueError(f"labels must be [N] = [{feat.shape[0]}], got {tuple(labels.shape)}")
    c = num_classes if num_classes is not None else int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c})")
    return c


def fit_linear_classifier(
    feat: Tensor,
    labels: Tensor,
    *,
    weight_decay: float,
    multilabel: bool = False,
    num_classes: int | None = None,
    standardize: bool = True,
    max_iter: int = 500,
    init: LinearProbe | None = None,
) -> LinearProbe:
    """Fit one L2-regularised logistic-regression head by full-batch L-BFGS (float64).

    Args:
        feat: [N, D] frozen features.
        labels: LongTensor [N] class ids, or binary [N, C] targets with ``multilabel``.
        weight_decay: L2 strength (see the module docstring for the objective).
        multilabel: per-class sigmoid BCE instead of softmax cross-entropy.
        num_classes: number of classes (default: max label + 1).
        standardize: standardise features with their mean/std first (std floored at 1e-6).
        max_iter: L-BFGS iterations.
        init: a probe to warm-start from (the previous point of a sweep).

    Returns:
        The fitted :class:`LinearProbe`.
    """
    if weight_decay < 0:
        raise ConfigError(f"weight_decay={weight_decay} must be >= 0")
    c = _check(feat, labels, multilabel, num_classes)
    x = feat.to(torch.float64)
    if standardize:
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    x = (x - mean) / std
    y = labels.to(torch.float64) if multilabel else labels.long()
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    if init is not None:
        with torch.no_grad():
            w.copy_(init.weight)
            b.copy_(init.bias)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-8,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x @ w.T + b
        if multilabel:
            # summed over classes, averaged over samples: each class is its own sklearn problem
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / x.shape[0]
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x.shape[0] * x.shape[1] * c):
        opt.step(closure)
    return LinearProbe(weight=w.detach(), bias=b.detach(), mean=mean, std=std,
                       weight_decay=float(weight_decay), multilabel=multilabel)


def linear_probe(
    train_feat: Tensor,
    train_labels: Tensor,
    val_feat: Tensor,
    val_labels: Tensor,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    multilabel: bool = False,
    num_classes: int | None = None,
    refit: bool = False,
    max_iter: int = 500,
) -> LinearProbe:
    """Sweep the weight decay, keep the head with the best validation score.

    The sweep runs from the strongest to the weakest regularisation, each fit warm-started from
    the previous one; on equal validation scores the stronger regularisation wins. The
    validation split must not be the split the probe is finally reported on.

    Args:
        train_feat: [N, D] training features.
        train_labels: LongTensor [N] or binary [N, C] (multilabel).
        val_feat: [M, D] validation features (e.g. a held-out part of the training split).
        val_labels: labels of the validation features.
        weight_decays: the sweep.
        multilabel: multi-label (mAP) instead of single-label (top-1).
        num_classes: number of classes (default: inferred from the labels).
        refit: refit on train + val at the chosen weight decay (CLIP's protocol).
        max_iter: L-BFGS iterations per fit.

    Returns:
        The chosen :class:`LinearProbe`, with ``sweep`` holding every validation score.
    """
    if not weight_decays:
        raise ConfigError("the linear-probe weight-decay sweep is empty; give at least one value")
    if not multilabel and num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    sweep: dict[float, float] = {}
    best: LinearProbe | None = None
    best_score = -math.inf
    prev: LinearProbe | None = None
    for wd in sorted(weight_decays, reverse=True):
        probe = fit_linear_classifier(train_feat, train_labels, weight_decay=wd,
                                      multilabel=multilabel, num_classes=num_classes,
                                      max_iter=max_iter, init=prev)
        metrics = probe.score(val_feat, val_labels)
        score = metrics["mAP"] if multilabel else metrics["top1"]
        sweep[float(wd)] = score
        if score > best_score:
            best, best_score = probe, score
        prev = probe
    assert best is not None
    if refit:
        best = fit_linear_classifier(
            torch.cat([train_feat, val_feat]), torch.cat([train_labels, val_labels]),
            weight_decay=best.weight_decay, multilabel=multilabel, num_classes=num_classes,
            max_iter=max_iter, init=best,
        )
    best.sweep = sweep
    return best
