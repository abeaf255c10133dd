"""Retrieval metrics, reranking and low-resource scoring against hand-computed values and an
independent BLIP-style argsort reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megavid.errors import ConfigError
from megavid.eval.retrieval import (
    compute_similarity,
    evaluate_retrieval,
    rerank_topk,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
)


def blip_style_ranks(sim: np.ndarray, text_to_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: BLIP's evaluation loops (argsort, then the position of the ground truth).
    Only valid without ties, where argsort's tie order cannot matter."""
    t2v = np.array([int(np.where(np.argsort(-row) == text_to_video[i])[0][0]) + 1
                    for i, row in enumerate(sim)])
    v2t = []
    for v in range(sim.shape[1]):
        order = np.argsort(-sim[:, v])
        caps = np.where(text_to_video == v)[0]
        if len(caps):
            v2t.append(min(int(np.where(order == c)[0][0]) for c in caps) + 1)
    return t2v, np.array(v2t)


def test_hand_built_rectangular_with_ties():
    # 5 captions, 3 videos; videos 0 and 2 have two captions each.
    sim = torch.tensor([
        [0.9, 0.1, 0.3],  # t0 -> v0: best                                      rank 1
        [0.2, 0.5, 0.2],  # t1 -> v0: v1 above, v2 tied (tie counts against)    rank 3
        [0.4, 0.4, 0.1],  # t2 -> v1: v0 tied                                   rank 2
        [0.0, 0.6, 0.7],  # t3 -> v2: best                                      rank 1
        [0.8, 0.3, 0.3],  # t4 -> v2: v0 above, v1 tied                         rank 3
    ])
    t2v = torch.tensor([0, 0, 1, 2, 2])
    # v2t: v0's best caption t0 (0.9) beats every other text -> 1; v1's only caption t2 (0.4)
    # has t1 (0.5) and t3 (0.6) above -> 3; v2's best caption t3 (0.7) is top -> 1.
    m = retrieval_metrics(sim, t2v)
    assert m["t2v_R@1"] == pytest.approx(100 * 2 / 5)
    assert m["t2v_R@5"] == m["t2v_R@10"] == 100.0
    assert m["t2v_MedR"] == 2.0 and m["t2v_MeanR"] == pytest.approx((1 + 3 + 2 + 1 + 3) / 5)
    assert m["v2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert m["v2t_MedR"] == 1.0 and m["v2t_MeanR"] == pytest.approx(5 / 3)
    assert m["t2v_num_queries"] == 5 and m["v2t_num_queries"] == 3
    assert m["RSum"] == pytest.approx(40 + 100 + 100 + 200 / 3 + 100 + 100)


def test_all_correct_all_wrong_all_tied():
    n = 4
    t2v = torch.arange(n)
    correct = retrieval_metrics(torch.eye(n), t2v)
    assert correct["t2v_R@1"] == correct["v2t_R@1"] == 100.0
    assert correct["t2v_MedR"] == correct["v2t_MeanR"] == 1.0
    wrong = retrieval_metrics(-torch.eye(n), t2v)  # the true pair scores lowest
    assert wrong["t2v_R@1"] == wrong["v2t_R@1"] == 0.0
    assert wrong["t2v_MedR"] == wrong["t2v_MeanR"] == wrong["v2t_MeanR"] == n
    # A collapsed model (every score equal) gets the worst rank, not a lucky first place.
    tied = retrieval_metrics(torch.zeros(n, n), t2v)
    assert tied["t2v_R@1"] == tied["v2t_R@1"] == 0.0
    assert tied["t2v_MeanR"] == tied["v2t_MeanR"] == n


def test_ties_among_own_captions_do_not_count_against():
    sim = torch.tensor([[0.5, 0.1], [0.5, 0.2], [0.5, 0.3]])
    t2v = torch.tensor([0, 0, 1])
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, t2v)
    assert t2v_ranks.tolist() == [1, 1, 2]  # t2 -> v1 (0.3) loses to v0 (0.5)
    # v0: its captions t0, t1 tie at 0.5 (fine), wrong text t2 also 0.5 (counts) -> 2
    assert v2t_ranks.tolist() == [2, 1]


def test_even_number_of_queries_median_is_mean_of_middle_ranks():
    sim = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # ranks: t0 -> 1, t1 -> 2
    m = retrieval_metrics(sim, torch.tensor([0, 1]))
    assert m["t2v_MedR"] == 1.5


def test_videos_without_captions_are_not_v2t_queries():
    sim = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.7, 0.6]])
    t2v = torch.tensor([0, 2])
    _, v2t = retrieval_ranks(sim, t2v)
    # v0: t0 (0.9) on top -> 1; v2: its caption t1 (0.6) below t0 (0.7) -> 2; v1 has no
    # caption: 0 marks "not a query"
    assert v2t.tolist() == [1, 0, 2]
    m = retrieval_metrics(sim, t2v)
    assert m["v2t_num_queries"] == 2 and m["v2t_R@1"] == 50.0


def test_matches_blip_argsort_reference_without_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 11, generator=g, dtype=torch.float64)
    t2v = torch.randint(0, 11, (37,), generator=g)
    t2v[:11] = torch.arange(11)  # every video has at least one caption
    ref_t2v, ref_v2t = blip_style_ranks(sim.numpy(), t2v.numpy())
    ranks_t2v, ranks_v2t = retrieval_ranks(sim, t2v)
    np.testing.assert_array_equal(ranks_t2v.numpy(), ref_t2v)
    np.testing.assert_array_equal(ranks_v2t.numpy(), ref_v2t)
    m = retrieval_metrics(sim, t2v)
    assert m["t2v_R@5"] == pytest.approx(100 * np.mean(ref_t2v <= 5))
    assert m["v2t_MedR"] == pytest.approx(np.median(ref_v2t))
    assert m["v2t_MeanR"] == pytest.approx(ref_v2t.mean())


def test_nan_similarity_is_rejected():
    sim = torch.eye(3)
    sim[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim, torch.arange(3))


def test_low_resource_chunked_path_equals_dense():
    # Small-integer features: every dot product is exact in fp32, so block order cannot change
    # a bit, and the many equal products exercise ties on both paths.
    g = torch.Generator().manual_seed(1)
    text = torch.randint(-2, 3, (29, 8), generator=g).float()
    video = torch.randint(-2, 3, (13, 8), generator=g).float()
    t2v = torch.arange(29) % 13
    dense = text @ video.T
    chunked = compute_similarity(text, video, chunk_size=5)
    assert chunked.device.type == "cpu" and chunked.dtype == torch.float32
    assert torch.equal(chunked, dense)
    expected = retrieval_metrics(dense, t2v)
    assert retrieval_metrics(chunked, t2v, chunk_size=4) == expected
    assert retrieval_metrics(dense, t2v, chunk_size=1) == expected
    low = evaluate_retrieval(text, video, t2v, chunk_size=6, device="cpu")
    assert {k[len("vtc/"):]: v for k, v in low.items()} == expected


def test_rerank_changes_only_topk_entries():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(6, 9, generator=g)
    k = 3
    calls = []

    def score_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(len(q))
        return 100.0 + 10.0 * q.float() + c.float()  # a pair's identity, visible in the output

    out = rerank_topk(sim, k, score_fn, batch_size=4)
    topk = sim.topk(k, dim=1).indices
    for q in range(6):
        for c in range(9):
            if c in topk[q].tolist():
                assert out[q, c] == 100.0 + 10 * q + c
            else:
                assert out[q, c] == -math.inf
    assert sum(calls) == 6 * k and max(calls) <= 4  # only top-k pairs scored, batched
    added = rerank_topk(sim, k, score_fn, add_sim=True)
    finite = torch.isfinite(added)
    assert torch.allclose(added[finite], (out + sim)[finite])
    # a subset of queries (one rank's share) gives exactly those rows
    part = rerank_topk(sim, k, score_fn, queries=torch.tensor([4, 1]))
    assert torch.equal(part, out[[4, 1]])
    # k beyond the number of candidates re-scores them all
    assert torch.isfinite(rerank_topk(sim, 50, score_fn)).all()
    with pytest.raises(ConfigError, match="k_test"):
        rerank_topk(sim, 0, score_fn)


def test_rerank_recovers_true_pairs_and_misses_cost_the_worst_rank():
    # Features chosen so that sim = text_feat (video_feat is the identity).
    text = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.8, 0.6], [0.3, 0.7, 0.4]])
    video = torch.eye(3)
    t2v = torch.tensor([0, 1, 2])
    oracle = lambda t, v: (t2v[t] == v).float()  # noqa: E731  a perfect matching head
    # VTC: t0 rank 2 (0.9 above), t1 rank 1, t2 rank 2 -> R@1 = 1/3
    # v2t VTC: v0 rank 1, v1 rank 2 (t0's 0.9), v2 rank 2 (t1's 0.6)
    m = evaluate_retrieval(text, video, t2v, k_test=2, pair_score_fn=oracle)
    assert m["vtc/t2v_R@1"] == pytest.approx(100 / 3)
    assert m["vtc/v2t_R@1"] == pytest.approx(100 / 3)
    assert m["vtm/t2v_R@1"] == 100.0 and m["vtm/v2t_R@1"] == 100.0
    # t2v top-2 pairs: (0,1)(0,0)(1,1)(1,2)(2,1)(2,2); v2t adds only (2,0): 7 distinct pairs
    assert m["vtm/pairs_scored"] == 7
    # k=1: t0's and t2's true videos are outside their top-1 -> worst rank 3
    m1 = evaluate_retrieval(text, video, t2v, k_test=1, pair_score_fn=oracle)
    assert m1["vtm/t2v_R@1"] == pytest.approx(100 / 3)
    assert m1["vtm/t2v_MeanR"] == pytest.approx((3 + 1 + 3) / 3)
    with pytest.raises(ConfigError, match="pair scorer"):
        evaluate_retrieval(text, video, t2v, k_test=2)


def test_chance_levels_match_random_scoring():
    t2v = torch.tensor([0, 0, 0, 1, 2, 2])
    chance = retrieval_chance(t2v, 3)
    assert chance["t2v_R@1"] == pytest.approx(100 / 3)
    assert chance["t2v_MeanR"] == 2.0
    # v0 has 3 of 6 captions: P(best rank = 1) = 3/6; v1: 1/6; v2: 2/6
    assert chance["v2t_R@1"] == pytest.approx(100 * (3 / 6 + 1 / 6 + 2 / 6) / 3)
    # E[best rank] = (T+1)/(c+1): 7/4, 7/2, 7/3
    assert chance["v2t_MeanR"] == pytest.approx((7 / 4 + 7 / 2 + 7 / 3) / 3)
    # and a Monte Carlo check of the formulas (numpy, vectorised over trials)
    rng = np.random.default_rng(3)
    scores = rng.random((20000, 6, 3))  # trials x texts x videos
    own = t2v.numpy()[:, None] == np.arange(3)[None, :]  # [6, 3]
    best_own = np.where(own, scores, -1).max(1)  # [trials, 3]
    beaten = ((scores > best_own[:, None, :]) & ~own).sum(1) + 1  # best rank per video
    assert 100 * np.mean(beaten == 1) == pytest.approx(chance["v2t_R@1"], abs=1.0)
    assert beaten.mean() == pytest.approx(chance["v2t_MeanR"], abs=0.05)
