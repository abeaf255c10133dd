"""Average precision, nDCG and EPIC-Kitchens-100 multi-instance retrieval against hand-computed
values, scikit-learn, and a numpy transcription of EK-100's official definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score

from megavid.errors import DataError
from megavid.eval.metrics import average_precision, ndcg, pessimistic_order, rank_summary
from megavid.eval.retrieval import ek100_mir_metrics

L3 = math.log2(3)  # discount of the 2nd position


def test_average_precision_by_hand():
    ap = average_precision(
        torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]]),
        torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]]),
    )
    assert ap[0].item() == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert math.isnan(ap[1].item())  # nothing relevant: undefined, not 0


def test_average_precision_ties_count_against():
    ap = average_precision(
        torch.tensor([[0.5, 0.5, 0.1, 0.0], [0.5, 0.5, 0.5, 0.1]]),
        torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]]),
    )
    # row 0: the tied negative goes first -> the positive sits at rank 2
    assert ap[0].item() == pytest.approx(1 / 2)
    # row 1: order neg, pos, pos -> (1/2 + 2/3) / 2 (sklearn's threshold rule would give 2/3)
    assert ap[1].item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_average_precision_graded_ek100_definition():
    # relevance 0.5 at rank 1 adds 0.5 to the precision numerator: p(2) = 1.5/2, p(3) = 2.5/3
    ap = average_precision(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[0.5, 1.0, 1.0]]))
    assert ap.item() == pytest.approx((1.5 / 2 + 2.5 / 3) / 2)


def test_average_precision_matches_sklearn_without_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 50, generator=g, dtype=torch.float64)
    targets = (torch.rand(20, 50, generator=g) < 0.2).long()
    targets[:, 0] = 1
    ours = average_precision(scores, targets, chunk_size=3).numpy()
    ref = [average_precision_score(t, s) for t, s in zip(targets.numpy(), scores.numpy())]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_ndcg_by_hand_graded():
    # k = 3 (three items with relevance > 0); ranking gains 0.5, 0, 1
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    rel = torch.tensor([[0.5, 0.0, 1.0, 0.25]])
    dcg = 0.5 / 1 + 0 / L3 + 1.0 / 2
    idcg = 1.0 / 1 + 0.5 / L3 + 0.25 / 2
    assert ndcg(scores, rel).item() == pytest.approx(dcg / idcg)
    # explicit k=2 and per-row k
    assert ndcg(scores, rel, 2).item() == pytest.approx((0.5 + 0 / L3) / (1 + 0.5 / L3))
    assert ndcg(scores, rel, torch.tensor([1])).item() == pytest.approx(0.5 / 1.0)


def test_ndcg_ties_and_empty_rows():
    # tied scores: the irrelevant item first -> DCG@1 = 0 (sklearn would average to 0.5)
    out = ndcg(torch.tensor([[0.5, 0.5], [0.3, 0.1]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert out[0].item() == 0.0
    assert math.isnan(out[1].item())
    # perfect and reversed rankings
    rel = torch.tensor([[3.0, 2.0, 1.0]])
    assert ndcg(torch.tensor([[3.0, 2.0, 1.0]]), rel).item() == pytest.approx(1.0)
    worst = (1 / 1 + 2 / L3 + 3 / 2) / (3 / 1 + 2 / L3 + 1 / 2)
    assert ndcg(torch.tensor([[1.0, 2.0, 3.0]]), rel).item() == pytest.approx(worst)


def test_ndcg_matches_sklearn_without_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(15, 30, generator=g, dtype=torch.float64)
    rel = torch.randint(0, 4, (15, 30), generator=g).double() / 3
    rel[:, 0] = 1.0
    ours = ndcg(scores, rel, chunk_size=4).numpy()
    ks = (rel > 0).sum(1).tolist()
    ref = [ndcg_score(r[None], s[None], k=k) for r, s, k in zip(rel.numpy(), scores.numpy(), ks)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_pessimistic_order_is_stable_and_puts_relevant_last_in_ties():
    order = pessimistic_order(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]),
                              torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.0]]))
    assert order.tolist() == [[2, 3, 1, 0, 4]]


def test_rank_summary():
    m = rank_summary(torch.tensor([1, 2, 6, 11]), ks=(1, 5, 10), prefix="x_")
    assert m == {"x_R@1": 25.0, "x_R@5": 50.0, "x_R@10": 75.0, "x_MedR": 4.0, "x_MeanR": 5.0}


# ---- EPIC-Kitchens-100 multi-instance retrieval ---------------------------------------------

def ek100_reference(sim: np.ndarray, rel: np.ndarray) -> tuple[float, float]:
    """numpy transcription of EK-100's calculate_mAP / calculate_nDCG (rows are queries)."""
    n = sim.shape[1]
    order = np.argsort(-sim, axis=1)
    ranked = np.take_along_axis(rel, order, 1)
    cum = np.cumsum(ranked, axis=1)
    cum[ranked != 1] = 0
    ap = np.sum(cum / (np.arange(n) + 1), axis=1) / np.sum(ranked == 1, axis=1)
    k_counts = (np.sort(rel)[:, ::-1] > 0).astype(int)
    logs = np.log2(np.arange(n) + 2)
    dcg = np.sum(ranked * k_counts / logs, axis=1)
    idcg = np.sum(np.sort(rel)[:, ::-1] * k_counts / logs, axis=1)
    return 100 * ap.mean(), 100 * (dcg / idcg).mean()


def test_ek100_by_hand():
    sim = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.3, 0.4]])  # 2 narrations x 3 clips
    rel = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
    m = ek100_mir_metrics(sim, rel)
    # t2v: row 0 ranks v1 (0.5), v0 (1): AP = (1.5/2); row 1 ranks v2, v1 (both 1): AP = 1
    assert m["t2v_mAP"] == pytest.approx(100 * (0.75 + 1) / 2)
    # v2t: v0 -> t0 first (AP 1); v1 ranks t0 (0.5), t1 (1) -> 0.75; v2 -> t1 first (AP 1)
    assert m["v2t_mAP"] == pytest.approx(100 * (1 + 0.75 + 1) / 3)
    assert m["mAP"] == pytest.approx((m["t2v_mAP"] + m["v2t_mAP"]) / 2)
    partial = (0.5 + 1 / L3) / (1 + 0.5 / L3)  # gains 0.5 then 1 where 1 then 0.5 is ideal
    assert m["t2v_nDCG"] == pytest.approx(100 * (partial + 1) / 2)
    assert m["v2t_nDCG"] == pytest.approx(100 * (1 + partial + 1) / 3)
    assert m["nDCG"] == pytest.approx((m["t2v_nDCG"] + m["v2t_nDCG"]) / 2)


def test_ek100_matches_official_definitions_on_random_data():
    rng = np.random.default_rng(2)
    num_texts, num_videos = 12, 20
    sim = rng.standard_normal((num_texts, num_videos))
    rel = rng.choice([0.0, 0.0, 0.25, 0.5, 1.0], size=(num_texts, num_videos))
    rel[np.arange(num_texts), np.arange(num_texts)] = 1.0  # every text has a full match
    rel[np.arange(num_videos) % num_texts, np.arange(num_videos)] = 1.0  # and every video
    m = ek100_mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    map_t2v, ndcg_t2v = ek100_reference(sim, rel)
    map_v2t, ndcg_v2t = ek100_reference(sim.T, rel.T)
    assert m["t2v_mAP"] == pytest.approx(map_t2v)
    assert m["v2t_mAP"] == pytest.approx(map_v2t)
    assert m["t2v_nDCG"] == pytest.approx(ndcg_t2v)
    assert m["v2t_nDCG"] == pytest.approx(ndcg_v2t)


def test_ek100_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same"):
        ek100_mir_metrics(torch.rand(3, 4), torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ek100_mir_metrics(torch.rand(2, 2), torch.full((2, 2), 2.0))
    with pytest.raises(DataError, match="relevancy"):
        ek100_mir_metrics(torch.rand(2, 2), torch.zeros(2, 2))
