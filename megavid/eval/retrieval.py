"""Text-video retrieval metrics, top-k reranking and low-resource (chunked) scoring.

Layout: similarity matrices are ``[num_texts, num_videos]`` (rows are captions), and
``text_to_video[i]`` is the index of the video caption ``i`` describes, so a video may have
several captions (MSRVTT's 20 per video in training splits, DiDeMo/ActivityNet paragraphs,
EK-100 narrations).

- text-to-video (t2v): each caption queries all videos; one correct video.
- video-to-text (v2t): each video queries all captions; its rank is the best rank among its own
  captions, as ALPRO and BLIP compute it. Videos without any caption cannot be queried and are
  left out of the v2t numbers (``v2t_num_queries`` says how many were evaluated).

Ties count against the model (see :mod:`megavid.eval.metrics`): rank = 1 + the number of WRONG
candidates scoring at least as high as the best correct one. Ties among a video's own captions
do not hurt it (any of them is a correct answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from megavid.errors import ConfigError
from megavid.eval.metrics import ap_and_ndcg, check_scores, nanmean_percent, rank_summary

# score_fn(query_idx [n], candidate_idx [n]) -> scores [n]: re-scores n (query, candidate) pairs.
PairScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check_text_to_video(sim: Tensor, text_to_video: Tensor) -> Tensor:
    check_scores(sim, "similarity matrix")
    if sim.ndim != 2:
        raise ValueError(f"sim must be [num_texts, num_videos], got shape {tuple(sim.shape)}")
    t2v = torch.as_tensor(text_to_video, device=sim.device).long()
    if t2v.shape != (sim.shape[0],):
        raise ValueError(
            f"text_to_video has shape {tuple(t2v.shape)}; it needs one video index per text "
            f"row of sim ({sim.shape[0]})"
        )
    if t2v.numel() and (int(t2v.min()) < 0 or int(t2v.max()) >= sim.shape[1]):
        raise ValueError(
            f"text_to_video holds indices in [{int(t2v.min())}, {int(t2v.max())}] but sim has "
            f"{sim.shape[1]} videos"
        )
    return t2v


def retrieval_ranks(
    sim: Tensor, text_to_video: Tensor, *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """1-based ranks of the correct item for every query, in both directions.

    Works on row chunks so that only ``chunk_size x num_videos`` temporaries exist at a time
    (the low-resource path: ``sim`` can stay on the CPU).

    Args:
        sim: [num_texts, num_videos] similarity (higher = more similar).
        text_to_video: LongTensor [num_texts], the video each text describes.
        chunk_size: text rows processed at once (None: all rows).

    Returns:
        (t2v_ranks LongTensor [num_texts], v2t_ranks LongTensor [num_videos]); videos without a
        caption get rank 0 (never a valid rank) and are left out by :func:`retrieval_metrics`.
    """
    t2v = _check_text_to_video(sim, text_to_video)
    num_texts, num_videos = sim.shape
    rows = torch.arange(num_texts, device=sim.device)
    gt = sim[rows, t2v]  # score of each text's own video
    # best score of each video among its own captions (-inf for captionless videos)
    best = torch.full((num_videos,), -math.inf, dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, t2v, gt, reduce="amax")
    has_caption = torch.bincount(t2v, minlength=num_videos) > 0

    t2v_ranks = torch.empty(num_texts, dtype=torch.long, device=sim.device)
    at_least_best = torch.zeros(num_videos, dtype=torch.long, device=sim.device)
    step = num_texts if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    for start in range(0, num_texts, step):
        block = sim[start : start + step]
        # t2v: the own video always satisfies >= (it is not NaN), so the count is 1 + #wrong.
        t2v_ranks[start : start + step] = (block >= gt[start : start + step, None]).sum(1)
        at_least_best += (block >= best[None, :]).sum(0)
    # The count above includes the video's own captions that reach its best score (only ties
    # at the maximum can); those are correct answers, not competitors.
    own_at_best = torch.zeros(num_videos, dtype=torch.long, device=sim.device)
    own_at_best.scatter_add_(0, t2v, (gt == best[t2v]).long())
    v2t_ranks = torch.where(has_caption, 1 + at_least_best - own_at_best, 0)
    return t2v_ranks, v2t_ranks


def retrieval_metrics(
    sim: Tensor,
    text_to_video: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """t2v and v2t recall@k, MedR and MeanR from a similarity matrix.

    Args:
        sim: [num_texts, num_videos] similarity.
        text_to_video: LongTensor [num_texts], the video each text describes (several texts may
            share a video).
        ks: recall cut-offs.
        chunk_size: text rows processed at once (None: all rows); same result either way.

    Returns:
        ``t2v_R@1, t2v_R@5, t2v_R@10, t2v_MedR, t2v_MeanR`` and the same for ``v2t_``, plus
        ``RSum`` (sum of the recalls, in percent), ``t2v_num_queries`` and ``v2t_num_queries``.
    """
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, text_to_video, chunk_size=chunk_size)
    v2t_ranks = v2t_ranks[v2t_ranks > 0]
    out = rank_summary(t2v_ranks, ks, prefix="t2v_")
    out.update(rank_summary(v2t_ranks, ks, prefix="v2t_"))
    out["RSum"] = sum(out[f"{d}_R@{k}"] for d in ("t2v", "v2t") for k in ks)
    out["t2v_num_queries"] = float(t2v_ranks.numel())
    out["v2t_num_queries"] = float(v2t_ranks.numel())
    return out


def retrieval_chance(
    text_to_video: Tensor, num_videos: int, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Expected recall@k and MeanR of a random scorer (uniform random ranking, no ties).

    For t2v, R@k = min(k, V) / V and MeanR = (V + 1) / 2. For a video with c of the T captions,
    P(best rank <= k) = 1 - C(T - c, k) / C(T, k) and E[best rank] = (T + 1) / (c + 1).

    Args:
        text_to_video: LongTensor [num_texts], the video each text describes.
        num_videos: number of videos (columns of the similarity matrix).
        ks: recall cut-offs.

    Returns:
        ``t2v_R@{k}``, ``t2v_MeanR``, ``v2t_R@{k}``, ``v2t_MeanR`` (percent / ranks), the values
        to print beside the model's.
    """
    t2v = torch.as_tensor(text_to_video).long()
    num_texts = t2v.numel()
    counts = torch.bincount(t2v, minlength=num_videos)
    counts = counts[counts > 0].tolist()
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2v_R@{k}"] = 100.0 * min(k, num_videos) / num_videos
    out["t2v_MeanR"] = (num_videos + 1) / 2
    for k in ks:
        miss = [math.comb(num_texts - c, k) / math.comb(num_texts, k) if k <= num_texts else 0.0
                for c in counts]
        out[f"v2t_R@{k}"] = 100.0 * (1.0 - sum(miss) / len(counts))
    out["v2t_MeanR"] = sum((num_texts + 1) / (c + 1) for c in counts) / len(counts)
    return out


def compute_similarity(
    text_feat: Tensor,
    video_feat: Tensor,
    *,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``text_feat @ video_feat.T`` computed in blocks, returned as float32 on the CPU.

    The low-resource mode (TESTA's ``--low_resource_eval``): features stay on the CPU, and only a
    ``chunk_size x chunk_size`` block of each and of the result visits ``device`` at a time, so
    evaluation of long clips (96 frames) or large test sets fits in accelerator memory.

    Args:
        text_feat: [num_texts, D] (normalised) text features, any device.
        video_feat: [num_videos, D] (normalised) video features, any device.
        chunk_size: rows of each side per block (None: one block).
        device: where the products run (default: text_feat's device).

    Returns:
        float32 [num_texts, num_videos] on the CPU.
    """
    if text_feat.ndim != 2 or video_feat.ndim != 2 or text_feat.shape[1] != video_feat.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got text {tuple(text_feat.shape)} and "
            f"video {tuple(video_feat.shape)}"
        )
    device = torch.device(device) if device is not None else text_feat.device
    nt, nv = text_feat.shape[0], video_feat.shape[0]
    step_t = nt if chunk_size is None else chunk_size
    step_v = nv if chunk_size is None else chunk_size
    if min(step_t, step_v) < 1 and nt and nv:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    # fp32 accumulation whatever the feature dtype: bf16 products round ties into existence
    dtype = torch.float32 if text_feat.dtype in (torch.float16, torch.bfloat16) else text_feat.dtype
    out = torch.empty(nt, nv, dtype=torch.float32)
    for i in range(0, nt, max(step_t, 1)):
        t = text_feat[i : i + step_t].to(device=device, dtype=dtype, non_blocking=True)
        for j in range(0, nv, max(step_v, 1)):
            v = video_feat[j : j + step_v].to(device=device, dtype=dtype, non_blocking=True)
            out[i : i + step_t, j : j + step_v] = (t @ v.T).float().cpu()
    return out


def rerank_topk(
    sim: Tensor,
    k: int,
    score_fn: PairScoreFn,
    *,
    batch_size: int = 256,
    add_sim: bool = False,
    queries: Tensor | None = None,
) -> Tensor:
    """Re-score each query's top-k candidates with ``score_fn``; all other entries become -inf.

    BLIP's / ALPRO's ``k_test`` reranking: the cheap similarity (VTC) picks k candidates per
    query, an expensive pair scorer (the VTM head over the fusion encoder) re-scores only those.
    Candidates outside the top-k are set to -inf, so under the ties-against rule a correct item
    that missed the top-k gets the worst rank (num_candidates).

    Args:
        sim: [num_queries, num_candidates] first-stage scores (rows are queries; pass ``sim.T``
            for video-to-text with a score_fn taking (video_idx, text_idx)).
        k: candidates re-scored per query (clamped to num_candidates).
        score_fn: ``score_fn(query_idx LongTensor[n], cand_idx LongTensor[n]) -> Tensor[n]``,
            called on batches of at most ``batch_size`` pairs, indices on ``sim``'s device.
        batch_size: pairs per ``score_fn`` call.
        add_sim: add the first-stage score to the re-score (BLIP adds the ITC score to ITM's).
        queries: optional LongTensor of the query rows to rerank (e.g. this rank's share in a
            distributed evaluation); default all rows.

    Returns:
        float32 [len(queries), num_candidates] (on ``sim``'s device): re-scores at each
        query's top-k candidates, -inf elsewhere.
    """
    check_scores(sim, "similarity matrix")
    if k < 1:
        raise ConfigError(f"eval.k_test={k}: reranking needs k >= 1 (use 0 to skip reranking)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rows = (
        torch.arange(sim.shape[0], device=sim.device)
        if queries is None
        else torch.as_tensor(queries, device=sim.device).long()
    )
    k = min(k, sim.shape[1])
    sub = sim[rows]
    # Which of several candidates tied at the k-th place gets re-scored is up to topk; the
    # metrics' tie rule then applies to the re-scored matrix.
    top_scores, top_idx = sub.topk(k, dim=1)
    out = torch.full(sub.shape, -math.inf, dtype=torch.float32, device=sim.device)
    q_flat = rows[:, None].expand(-1, k).reshape(-1)
    c_flat = top_idx.reshape(-1)
    pieces = []
    for start in range(0, q_flat.numel(), batch_size):
        q_b, c_b = q_flat[start : start + batch_size], c_flat[start : start + batch_size]
        s = torch.as_tensor(score_fn(q_b, c_b))
        if s.shape != q_b.shape:
            raise ValueError(
                f"score_fn returned shape {tuple(s.shape)} for {q_b.numel()} pairs; it must "
                f"return one score per (query, candidate) pair"
            )
        pieces.append(s.detach().float().to(sim.device))
    new = torch.cat(pieces).view(-1, k) if pieces else top_scores.float()
    check_scores(new, "score_fn output")
    if add_sim:
        new = new + top_scores.float()
    out.scatter_(1, top_idx, new)
    return out


class _PairCache:
    """Memoises a text-video pair scorer: t2v and v2t reranking share most top-k pairs."""

    def __init__(self, score_fn: PairScoreFn, num_videos: int) -> None:
        self.score_fn = score_fn
        self.num_videos = num_videos
        self.scores: dict[int, float] = {}
        self.calls = 0

    def __call__(self, text_idx: Tensor, video_idx: Tensor) -> Tensor:
        keys = (text_idx * self.num_videos + video_idx).tolist()
        missing = [i for i, key in enumerate(keys) if key not in self.scores]
        if missing:
            miss = torch.tensor(missing, device=text_idx.device)
            new = torch.as_tensor(self.score_fn(text_idx[miss], video_idx[miss]))
            if new.shape != miss.shape:
                raise ValueError(
                    f"score_fn returned shape {tuple(new.shape)} for {miss.numel()} pairs"
                )
            self.calls += 1
            for i, value in zip(missing, new.detach().float().cpu().tolist()):
                self.scores[keys[i]] = value
        return torch.tensor([self.scores[key] for key in keys], dtype=torch.float32)


def evaluate_retrieval(
    text_feat: Tensor,
    video_feat: Tensor,
    text_to_video: Tensor,
    *,
    k_test: int = 0,
    pair_score_fn: PairScoreFn | None = None,
    add_sim: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Full retrieval evaluation: VTC similarity metrics, then optionally top-k reranked ones.

    Args:
        text_feat: [num_texts, D] normalised text features (CPU in low-resource mode).
        video_feat: [num_videos, D] normalised video features.
        text_to_video: LongTensor [num_texts], the video each text describes.
        k_test: candidates per query re-scored by ``pair_score_fn`` (0: VTC only).
        pair_score_fn: ``fn(text_idx [n], video_idx [n]) -> scores [n]`` (e.g. the VTM
            head's match probability); each distinct pair is scored once for both directions.
        add_sim: add the VTC score to the re-score (BLIP's convention).
        chunk_size: low-resource mode: similarity and ranks in blocks of this many rows.
        device: where similarity blocks are computed.
        batch_size: pairs per ``pair_score_fn`` call.

    Returns:
        ``vtc/<metric>`` for every :func:`retrieval_metrics` key, and ``vtm/<metric>`` (the
        reranked scores) plus ``vtm/pairs_scored`` when ``k_test > 0``.
    """
    sim = compute_similarity(text_feat, video_feat, chunk_size=chunk_size, device=device)
    return score_retrieval(sim, text_to_video, k_test=k_test, pair_score_fn=pair_score_fn,
                           add_sim=add_sim, chunk_size=chunk_size, batch_size=batch_size)


def score_retrieval(
    sim: Tensor,
    text_to_video: Tensor,
    *,
    k_test: int = 0,
    pair_score_fn: PairScoreFn | None = None,
    add_sim: bool = False,
    chunk_size: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """:func:`evaluate_retrieval` from an already computed similarity matrix (a caller that
    also needs ``sim``, e.g. for the temporal check, computes it once).

    Args:
        sim: [num_texts, num_videos] VTC similarity (see :func:`compute_similarity`).
        text_to_video: LongTensor [num_texts], the video each text describes.
        k_test: candidates per query re-scored by ``pair_score_fn`` (0: VTC only).
        pair_score_fn: ``fn(text_idx [n], video_idx [n]) -> scores [n]``.
        add_sim: add the VTC score to the re-score (BLIP's convention).
        chunk_size: ranks in blocks of this many rows (None: all rows at once).
        batch_size: pairs per ``pair_score_fn`` call.

    Returns:
        The same keys as :func:`evaluate_retrieval`.
    """
    t2v = torch.as_tensor(text_to_video).long()
    out = {f"vtc/{k}": v for k, v in retrieval_metrics(sim, t2v, chunk_size=chunk_size).items()}
    if k_test > 0:
        if pair_score_fn is None:
            raise ConfigError(
                f"eval.k_test={k_test} needs a pair scorer (a model with a VTM head); "
                f"set eval.k_test=0 for VTC-only retrieval"
            )
        cached = _PairCache(pair_score_fn, sim.shape[1])
        t2v_scores = rerank_topk(sim, k_test, cached, batch_size=batch_size, add_sim=add_sim)
        v2t_scores = rerank_topk(
            sim.T, k_test, lambda v, t: cached(t, v), batch_size=batch_size, add_sim=add_sim
        )
        # Each direction's ranks come from its own reranked matrix (as BLIP does).
        t2v_ranks, _ = retrieval_ranks(t2v_scores, t2v, chunk_size=chunk_size)
        _, v2t_ranks = retrieval_ranks(v2t_scores.T.contiguous(), t2v, chunk_size=chunk_size)
        v2t_ranks = v2t_ranks[v2t_ranks > 0]
        rr = rank_summary(t2v_ranks, prefix="t2v_")
        rr.update(rank_summary(v2t_ranks, prefix="v2t_"))
        rr["RSum"] = sum(rr[f"{d}_R@{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
        rr["t2v_num_queries"] = float(t2v_ranks.numel())
        rr["v2t_num_queries"] = float(v2t_ranks.numel())
        out.update({f"vtm/{k}": v for k, v in rr.items()})
        out["vtm/pairs_scored"] = float(len(cached.scores))
    return out


def ek100_mir_metrics(sim: Tensor, relevancy: Tensor) -> dict[str, float]:
    """EPIC-Kitchens-100 multi-instance retrieval: mAP and nDCG in both directions.

    Follows the official EK-100 evaluation (``calculate_mAP``, ``calculate_nDCG``): relevance is
    graded (the semantic overlap of verb and noun classes); for mAP the items of relevance 1 are
    the ones to find and partial relevances add to the precision numerator; nDCG uses linear
    gains and, per query, k = its number of items with relevance > 0. Queries without any
    relevant item are excluded (EK-100's test matrix has none). Ties count against the model.

    Note the layout: EK-100's ``caption_relevancy_EPIC_100_retrieval_test.pkl`` is
    [videos, texts] (9668 x 3842); pass its transpose and a [texts, videos] similarity.

    Args:
        sim: [num_texts, num_videos] similarity.
        relevancy: [num_texts, num_videos] graded relevance in [0, 1].

    Returns:
        ``t2v_mAP, v2t_mAP, mAP`` (the average of both), ``t2v_nDCG, v2t_nDCG, nDCG``
        (percent).
    """
    if sim.shape != relevancy.shape:
        raise ValueError(
            f"sim {tuple(sim.shape)} and relevancy {tuple(relevancy.shape)} must have the same "
            f"[num_texts, num_videos] shape (EK-100's pkl is [videos, texts]: pass its .T)"
        )
    rel = relevancy.to(torch.float64)
    if (rel < 0).any() or (rel > 1).any():
        raise ValueError("relevancy values must lie in [0, 1] (EK-100's relevancy matrix does)")
    out: dict[str, float] = {}
    for name, s, r in (("t2v", sim, rel), ("v2t", sim.T, rel.T)):
        ap, nd = ap_and_ndcg(s, r)  # one ranking serves both metrics
        out[f"{name}_mAP"], _ = nanmean_percent(ap, "query with an item of relevance 1")
        out[f"{name}_nDCG"], _ = nanmean_percent(nd, "query with a relevant item")
    out["mAP"] = (out["t2v_mAP"] + out["v2t_mAP"]) / 2
    out["nDCG"] = (out["t2v_nDCG"] + out["v2t_nDCG"]) / 2
    return out
