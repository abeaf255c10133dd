"""Video QA metrics: open-ended accuracy per question type, multiple choice, EgoMCQ, baselines.

Accuracies are percentages. Open-ended answers are scored as MSRVTT-QA, MSVD-QA and
ActivityNet-QA are: a prediction is right when it equals the ground-truth answer string (the
releases' own scripts, xudejing/video-question-answering ``run_*.py`` and MILVLG/activitynet-qa
``evaluation/eval.py``, compare with ``==``). Before comparing, both sides pass through
:func:`normalize_answer` (lower-case, surrounding whitespace stripped, inner runs of whitespace
collapsed to one space), the same function that builds the training answer vocabulary
(:mod:`megavid.tasks.qa`), so ``Red`` or `` man `` score as ``red`` / ``man``. Nothing else is
changed: the releases' answers are lower-case single words or phrases already, so articles and
punctuation are kept (``a man`` is not ``man``, as in the benchmarks' exact match), and the
scores on the released files equal those of their scripts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from megavid.eval.metrics import check_scores

# EgoMCQ (EgoVLP's egomcq.json) codes its two settings as integers.
EGOMCQ_TYPE_NAMES: dict[int, str] = {1: "inter", 2: "intra"}


def normalize_answer(answer: Any) -> Any:
    """An open-ended answer as it is scored: a string lower-cased, stripped and with every inner
    run of whitespace collapsed to one space (``"  Red  Car "`` -> ``"red car"``); anything
    else (an answer id, a bool) unchanged."""
    return " ".join(answer.split()).lower() if isinstance(answer, str) else answer


def _as_list(values: Sequence[Any] | Tensor) -> list[Any]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


def qa_accuracy(
    pred: Sequence[Hashable] | Tensor,
    answers: Sequence[Hashable] | Tensor,
    types: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy overall and per question type (string answers compared after
    :func:`normalize_answer` on both sides).

    Args:
        pred: predicted answer per question (strings or answer ids).
        answers: ground-truth answer per question, same kind as ``pred``.
        types: optional question type per question (e.g. MSRVTT-QA's what/who/how/when/where,
            or the synthetic data's colour/shape/direction/speed).

    Returns:
        ``{"acc": ..., "num": ...}`` plus ``acc_<type>`` and ``num_<type>`` for every type.
    """
    p, a = _as_list(pred), _as_list(answers)
    if len(p) != len(a):
        raise ValueError(f"{len(p)} predictions for {len(a)} answers")
    if not a:
        raise ValueError("qa_accuracy needs at least one question")
    hit = [normalize_answer(x) == normalize_answer(y) for x, y in zip(p, a)]
    out = {"acc": 100.0 * sum(hit) / len(hit), "num": float(len(hit))}
    if types is not None:
        t = _as_list(types)
        if len(t) != len(a):
            raise ValueError(f"{len(t)} question types for {len(a)} questions")
        groups: dict[str, list[bool]] = defaultdict(list)
        for h, ty in zip(hit, t):
            groups[str(ty)].append(h)
        for ty in sorted(groups):
            out[f"acc_{ty}"] = 100.0 * sum(groups[ty]) / len(groups[ty])
            out[f"num_{ty}"] = float(len(groups[ty]))
    return out


def multiple_choice_correct(
    scores: Tensor | Sequence[Sequence[float]], correct: Tensor | Sequence[int]
) -> Tensor:
    """Whether each multiple-choice question is answered correctly, ties against the model.

    The prediction is correct only when the correct choice scores strictly higher than every
    other choice (a tie with a wrong choice is a wrong answer). Questions may have different
    numbers of choices: nested lists of different lengths are padded with -inf.

    Args:
        scores: [Q, C] score of each candidate answer (e.g. the VTM head's match score of
            question + candidate against the video); a tensor or nested lists.
        correct: LongTensor [Q] (or list), index of the correct choice.

    Returns:
        BoolTensor [Q].
    """
    if not isinstance(scores, Tensor):
        rows = [list(map(float, r)) for r in scores]
        width = max((len(r) for r in rows), default=0)
        scores = torch.tensor([r + [float("-inf")] * (width - len(r)) for r in rows],
                              dtype=torch.float64).reshape(len(rows), width)
    if not torch.is_floating_point(scores):
        scores = scores.double()
    check_scores(scores, "choice scores")
    if scores.ndim != 2:
        raise ValueError(f"scores must be [num_questions, num_choices], got {tuple(scores.shape)}")
    correct = torch.as_tensor(correct, device=scores.device).long()
    if correct.shape != (scores.shape[0],):
        raise ValueError(f"correct has shape {tuple(correct.shape)}, expected ({scores.shape[0]},)")
    if correct.numel() and (int(correct.min()) < 0 or int(correct.max()) >= scores.shape[1]):
        raise ValueError(f"correct choice indices must lie in [0, {scores.shape[1]})")
    true = scores.gather(1, correct[:, None])
    # the correct choice itself always satisfies >=, so exactly 1 means no wrong choice ties
    return (scores >= true).sum(1) == 1


def multiple_choice_accuracy(
    scores: Tensor | Sequence[Sequence[float]], correct: Tensor | Sequence[int]
) -> float:
    """Zero-shot multiple-choice QA accuracy in percent (ties count as wrong answers).

    For accuracy per question type, pass :func:`multiple_choice_correct` to
    :func:`qa_accuracy`: ``qa_accuracy(multiple_choice_correct(s, c), [True] * Q, types)``.

    Args:
        scores: [Q, C] score of each candidate answer (tensor or nested lists).
        correct: LongTensor [Q] (or list), index of the correct choice.

    Returns:
        Accuracy in percent.
    """
    hit = multiple_choice_correct(scores, correct)
    if hit.numel() == 0:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    return float(hit.double().mean() * 100.0)


def majority_answer_baseline(
    train_answers: Sequence[Hashable],
    test_answers: Sequence[Hashable],
    *,
    train_types: Sequence[str] | None = None,
    test_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy of always answering the most frequent training answer (the bar QA must beat).

    With types, each test question gets the majority answer of ITS type in training (a
    stronger prior: "what colour" questions get the commonest colour), and per-type accuracies
    are reported; a type unseen in training falls back to the overall majority answer. Ties in
    frequency go to the smallest answer (by ``str``), so the baseline never depends on order.
    Training answers are counted after :func:`normalize_answer` (``Red`` and ``red`` are one
    answer), as the test answers are scored.

    Args:
        train_answers: answers of the training questions.
        test_answers: answers of the held-out questions.
        train_types: question type per training question (needed for per-type priors).
        test_types: question type per held-out question.

    Returns:
        The :func:`qa_accuracy` dict of the baseline's predictions.
    """
    train, test = [normalize_answer(x) for x in _as_list(train_answers)], _as_list(test_answers)
    if not train:
        raise ValueError("majority_answer_baseline needs at least one training answer")

    def majority(values: list[Hashable]) -> Hashable:
        counts = Counter(values)
        best = max(counts.values())
        return min((v for v, c in counts.items() if c == best), key=str)

    overall = majority(train)
    if train_types is None or test_types is None:
        pred = [overall] * len(test)
        return qa_accuracy(pred, test, test_types)
    tr_types = _as_list(train_types)
    if len(tr_types) != len(train):
        raise ValueError(f"{len(tr_types)} training types for {len(train)} training answers")
    by_type: dict[str, list[Hashable]] = defaultdict(list)
    for ans, ty in zip(train, tr_types):
        by_type[str(ty)].append(ans)
    prior = {ty: majority(v) for ty, v in by_type.items()}
    te_types = _as_list(test_types)
    pred = [prior.get(str(ty), overall) for ty in te_types]
    return qa_accuracy(pred, test, te_types)


def egomcq_accuracy(
    scores: Tensor, correct: Tensor, types: Sequence[str] | Sequence[int] | Tensor
) -> dict[str, float]:
    """EgoMCQ accuracy: one narration, five candidate clips; inter- and intra-video settings.

    Inter-video: the five clips come from different videos; intra-video: five nearby clips of
    the same video (the harder setting). Ties count against the model (EgoVLP's ``argmax`` would
    pick the first tied clip).

    Args:
        scores: [Q, 5] similarity of the narration to each candidate clip.
        correct: LongTensor [Q], index of the correct clip.
        types: per question "inter" or "intra", or EgoVLP's integer codes 1 (inter) and 2
            (intra).

    Returns:
        ``{"inter_acc", "intra_acc", "num_inter", "num_intra"}`` (accuracies in percent; a
        setting with no question is left out).
    """
    names = []
    for t in _as_list(types):
        name = EGOMCQ_TYPE_NAMES.get(t, t) if isinstance(t, int) else str(t)
        if name not in ("inter", "intra"):
            raise ValueError(f"EgoMCQ type {t!r} must be 'inter', 'intra', 1 or 2")
        names.append(name)
    if len(names) != scores.shape[0]:
        raise ValueError(f"{len(names)} types for {scores.shape[0]} questions")
    hit = multiple_choice_correct(scores, correct).tolist()
    out: dict[str, float] = {}
    for setting in ("inter", "intra"):
        sel = [h for h, n in zip(hit, names) if n == setting]
        if sel:
            out[f"{setting}_acc"] = 100.0 * sum(sel) / len(sel)
            out[f"num_{setting}"] = float(len(sel))
    return out
