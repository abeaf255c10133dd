"""Ranking metrics shared by retrieval, classification and QA: pure tensor functions.

Conventions followed by every function in ``megavid.eval``:

- Rates (recall@k, accuracy, mAP, nDCG) are percentages in [0, 100]; ranks are 1-based.
- **Ties count against the model.** A wrong candidate scored exactly like the correct one is
  ranked before it: ``rank = 1 + #(wrong candidates with score >= the best correct score)``.
  For AP and nDCG, inside a group of tied scores the less relevant items come first. Sorting with
  ``argsort`` would break ties by memory order, which differs between CPU and GPU kernels and
  between runs; the pessimistic rule makes every number deterministic and means a constant
  scorer (e.g. a collapsed model giving every pair the same score) can never look good.
- NaN scores raise ``ValueError``: NaN compares false with everything, so under the rule above a
  NaN would silently rank first.
- Queries (or classes) without any relevant item have an undefined AP / nDCG; they are excluded
  from the mean and the number of evaluated queries is reported next to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megavid.errors import DataError

# Row chunks are sized so that one chunk's float64 temporaries stay around 128 MiB whatever the
# matrix size (EK-100's test relevancy matrix is 9668 x 3842).
_CHUNK_ELEMENTS = 1 << 24


def check_scores(scores: Tensor, name: str = "scores") -> None:
    """Reject NaN scores (+/-inf are fine: -inf is how reranking marks skipped candidates).

    Args:
        scores: any floating tensor.
        name: how the tensor is called in the error message.
    """
    if not torch.is_floating_point(scores):
        raise ValueError(f"{name} must be a floating tensor, got {scores.dtype}")
    if torch.isnan(scores).any():
        n = int(torch.isnan(scores).sum())
        raise ValueError(
            f"{name} contains {n} NaN value(s); NaN cannot be ranked: check the model outputs "
            f"(a non-finite checkpoint or an fp16 overflow) before computing metrics"
        )


def _row_chunks(num_rows: int, num_cols: int, chunk_size: int | None = None) -> list[slice]:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, num_cols))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return [slice(i, min(i + chunk_size, num_rows)) for i in range(0, num_rows, chunk_size)]


def rank_summary(
    ranks: Tensor, ks: Sequence[int] = (1, 5, 10), prefix: str = ""
) -> dict[str, float]:
    """Summarise 1-based ranks as R@k (percent), MedR and MeanR.

    MedR is the median as numpy computes it (the mean of the two middle ranks for an even number
    of queries), as CLIP4Clip and Frozen-in-Time report it.

    Args:
        ranks: 1-D tensor of 1-based ranks, one per query.
        ks: the cut-offs of recall@k.
        prefix: prepended to every key (e.g. ``"t2v_"``).

    Returns:
        ``{prefix+"R@1": ..., prefix+"R@5": ..., prefix+"MedR": ..., prefix+"MeanR": ...}``.
    """
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    r = ranks.to(torch.float64)
    out = {f"{prefix}R@{k}": float((r <= k).to(torch.float64).mean() * 100.0) for k in ks}
    out[f"{prefix}MedR"] = float(torch.quantile(r, 0.5))
    out[f"{prefix}MeanR"] = float(r.mean())
    return out


def pessimistic_order(scores: Tensor, relevance: Tensor) -> Tensor:
    """Per row, the candidate indices sorted by score (descending), ties by relevance (ascending).

    Args:
        scores: [Q, N] floating scores.
        relevance: [Q, N] relevance of each candidate (bool or graded).

    Returns:
        LongTensor [Q, N]: ``order[q, i]`` is the candidate ranked (i+1)-th for query q.
    """
    # Two stable sorts: the second (by score) keeps the first's (ascending relevance) order
    # inside each group of equal scores.
    by_rel = torch.sort(relevance.to(torch.float64), dim=1, stable=True).indices
    by_score = torch.sort(scores.gather(1, by_rel), dim=1, descending=True, stable=True).indices
    return by_rel.gather(1, by_score)


def ranked_relevance(scores: Tensor, relevance: Tensor) -> Tensor:
    """Each row's relevance values in ranked order (ties against the model).

    One unstable sort by score serves the common case; only rows where tied scores carry
    different relevance (so that the tie order matters) are re-ordered with
    :func:`pessimistic_order` (two stable sorts). fp32 similarities over thousands of
    candidates do tie, but mostly among irrelevant items, so a 3842 x 9668 EK-100 evaluation
    stays close to one sort per direction.

    Args:
        scores: [Q, N] scores.
        relevance: [Q, N] float relevance.

    Returns:
        [Q, N]: ``relevance[q, order[q, i]]`` for the ranking ``order`` of each row.
    """
    sorted_scores, order = torch.sort(scores, dim=1, descending=True)
    ranked = relevance.gather(1, order)
    # a tie group holding different relevance values always has two such neighbours
    mixed = (
        (sorted_scores[:, 1:] == sorted_scores[:, :-1]) & (ranked[:, 1:] != ranked[:, :-1])
    ).any(1)
    if bool(mixed.any()):
        fix = pessimistic_order(scores[mixed], relevance[mixed])
        ranked[mixed] = relevance[mixed].gather(1, fix)
    return ranked


def _check_pair(scores: Tensor, relevance: Tensor) -> Tensor:
    check_scores(scores)
    if scores.shape != relevance.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and relevance {tuple(relevance.shape)} must be the "
            f"same 2-D shape"
        )
    rel = relevance.to(torch.float64)
    if bool((rel < 0).any()):
        raise ValueError("relevance must be non-negative")
    return rel


def _ap_from_ranked(rel: Tensor) -> Tensor:
    divisor = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=rel.device)
    precision = rel.cumsum(1) / divisor
    hit = rel == 1.0
    # 0 / 0 -> NaN for rows without a relevant item: excluded from the mean by the caller.
    return (precision * hit).sum(1) / hit.sum(1)


def _ndcg_from_ranked(ranked: Tensor, rel: Tensor, k: Tensor) -> Tensor:
    # Only the first max(k) positions can count: DCG and IDCG are computed on that prefix, and
    # the ideal ranking comes from topk instead of a full sort (k is small next to N in EK-100).
    kmax = min(int(k.max()) if k.numel() else 0, rel.shape[1])
    if kmax == 0:
        return torch.full((rel.shape[0],), float("nan"), dtype=torch.float64, device=rel.device)
    positions = torch.arange(kmax, device=rel.device)
    discount = 1.0 / torch.log2(positions.to(torch.float64) + 2.0)
    keep = positions[None, :] < k[:, None]
    ideal = rel.topk(kmax, dim=1).values
    dcg = (ranked[:, :kmax] * discount * keep).sum(1)
    idcg = (ideal * discount * keep).sum(1)
    return dcg / idcg  # NaN (0/0) where the row has nothing relevant


def _k_per_row(k: int | Tensor | None, rel: Tensor) -> Tensor:
    q = rel.shape[0]
    if k is None:
        return (rel > 0).sum(1)
    if isinstance(k, Tensor):
        return k.to(device=rel.device, dtype=torch.long).reshape(q)
    return torch.full((q,), int(k), dtype=torch.long, device=rel.device)


def average_precision(
    scores: Tensor, relevance: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """Average precision of each row, with EPIC-Kitchens-100's graded definition.

    ``AP = sum_k p(k) * [rel(k) == 1] / #(rel == 1)`` with ``p(k) = sum_{i<=k} rel(i) / k``: items
    of relevance exactly 1 are the ones to find; partially relevant items (0 < rel < 1) add their
    relevance to the precision numerator, as EK-100's official ``calculate_mAP`` does. For binary
    relevance this is the usual non-interpolated AP (scikit-learn's ``average_precision_score``
    when no scores tie). Ties are broken against the model (see the module docstring).

    Args:
        scores: [Q, N] scores of N candidates for Q queries.
        relevance: [Q, N] relevance in [0, 1] (bool or float).
        chunk_size: rows processed at once (default: sized to bound memory).

    Returns:
        float64 [Q]: AP in [0, 1] per row; NaN for rows with no item of relevance 1.
    """
    return ap_and_ndcg(scores, relevance, chunk_size=chunk_size, with_ndcg=False)[0]


def ndcg(
    scores: Tensor,
    relevance: Tensor,
    k: int | Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Normalised discounted cumulative gain of each row, with linear gains.

    ``DCG@k = sum_{i=1..k} rel(i) / log2(i + 1)`` over the ranking by score; ``IDCG@k`` is the
    same over the ranking by relevance. With ``k=None`` each row uses k = its number of items
    with relevance > 0, which is EPIC-Kitchens-100's definition (``calculate_k_counts``): only as
    many retrievals count as there are relevant items, so a bad ranking cannot collect gains from
    far down the list. Ties are broken against the model. Equal to scikit-learn's ``ndcg_score``
    (per row, same k) when no scores tie.

    Args:
        scores: [Q, N] scores.
        relevance: [Q, N] non-negative graded relevance.
        k: cut-off: an int for all rows, a LongTensor [Q] per row, or None (EK-100 rule).
        chunk_size: rows processed at once (default: sized to bound memory).

    Returns:
        float64 [Q]: nDCG in [0, 1] per row; NaN for rows without any relevant item.
    """
    return ap_and_ndcg(scores, relevance, k, chunk_size=chunk_size, with_ap=False)[1]


def ap_and_ndcg(
    scores: Tensor,
    relevance: Tensor,
    k: int | Tensor | None = None,
    *,
    chunk_size: int | None = None,
    with_ap: bool = True,
    with_ndcg: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`average_precision` and :func:`ndcg` of each row from one ranking (one sort).

    Args:
        scores: [Q, N] scores.
        relevance: [Q, N] graded relevance in [0, 1].
        k: nDCG cut-off (see :func:`ndcg`).
        chunk_size: rows processed at once (default: sized to bound memory).
        with_ap: compute AP (else None is returned in its place).
        with_ndcg: compute nDCG (else None).

    Returns:
        (AP float64 [Q] or None, nDCG float64 [Q] or None).
    """
    rel_all = _check_pair(scores, relevance)
    q, n = scores.shape
    k_all = _k_per_row(k, rel_all) if with_ndcg else None
    ap = torch.empty(q, dtype=torch.float64, device=scores.device) if with_ap else None
    nd = torch.empty(q, dtype=torch.float64, device=scores.device) if with_ndcg else None
    for rows in _row_chunks(q, n, chunk_size):
        rel = rel_all[rows]
        ranked = ranked_relevance(scores[rows], rel)
        if ap is not None:
            ap[rows] = _ap_from_ranked(ranked)
        if nd is not None:
            nd[rows] = _ndcg_from_ranked(ranked, rel, k_all[rows])
    return ap, nd


def nanmean_percent(values: Tensor, what: str) -> tuple[float, int]:
    """Mean of the defined (non-NaN) values, in percent, and how many were defined.

    Args:
        values: per-query or per-class values in [0, 1], NaN where undefined.
        what: what the values are, for the error message (e.g. "classes with a positive").

    Returns:
        (mean * 100, number of defined values).
    """
    defined = ~torch.isnan(values)
    num = int(defined.sum())
    if num == 0:
        raise DataError(
            f"no {what} in the evaluation data, so the metric is undefined; check that the "
            f"labels / relevancy matrix belong to this split"
        )
    return float(values[defined].mean() * 100.0), num
