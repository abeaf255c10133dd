"""Retrieval with several text queries per video (``eval.captions``): the queries built from the
captions, and the ranking path evaluation takes (``score_retrieval`` with the query-to-video
mapping, dense, chunked, and VTM re-ranked), against a numpy reference written here and ranks
counted by hand on a 3-video x 4-caption similarity matrix with ties.

Conventions of the reference: a query's t2v rank is 1 + the wrong videos scoring at least as
high as its own; a video's v2t rank is 1 + the other videos' captions scoring at least as high
as its best caption (found at k when any of its captions ranks within k).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavid.errors import ConfigError
from megavid.eval.retrieval import retrieval_chance, score_retrieval
from megavid.tasks.zeroshot import EncodedSplit, build_queries, format_report, temporal_check

# rows: captions 0-3 describe video 0, 4-7 video 1, 8-11 video 2
SIM = np.array([
    [0.9, 0.2, 0.55],
    [0.3, 0.5, 0.6],
    [0.4, 0.4, 0.0],   # tie with video 1: counts against
    [0.6, 0.1, 0.7],
    [0.2, 0.8, 0.3],
    [0.5, 0.3, 0.6],
    [0.1, 0.2, 0.5],
    [0.7, 0.8, 0.65],  # ties caption 4 as video 1's best: its own captions do not compete
    [0.3, 0.1, 0.2],
    [0.4, 0.5, 0.45],
    [0.0, 0.1, 0.35],
    [0.6, 0.7, 0.5],   # video 2's best (0.5); caption 6 ties it from video 1: counts against
], dtype=np.float32)
T2V = np.repeat(np.arange(3), 4)
# counted by hand from SIM
T2V_RANKS = [1, 3, 2, 2, 1, 3, 2, 1, 2, 2, 1, 3]
V2T_RANKS = [1, 1, 7]  # video 2: captions 0, 1, 3, 5, 6, 7 score >= 0.5


def ranks_reference(sim: np.ndarray, t2v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t2v rank per query, v2t rank per video), ties against the model."""
    q, n = sim.shape
    own = t2v[:, None] == np.arange(n)[None, :]  # [Q, N]
    gt = sim[np.arange(q), t2v]
    t2v_ranks = 1 + ((sim >= gt[:, None]) & ~own).sum(1)
    v2t_ranks = []
    for v in range(n):
        best = sim[own[:, v], v].max()
        v2t_ranks.append(1 + int((sim[~own[:, v], v] >= best).sum()))
    return t2v_ranks, np.array(v2t_ranks)


def metrics_reference(t2v_ranks: np.ndarray, v2t_ranks: np.ndarray) -> dict[str, float]:
    out = {}
    for d, r in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        for k in (1, 5, 10):
            out[f"{d}_R@{k}"] = 100.0 * float(np.mean(r <= k))
        out[f"{d}_MedR"] = float(np.median(r))
        out[f"{d}_MeanR"] = float(np.mean(r))
    return out


def _check(metrics: dict[str, float], ref: dict[str, float], head: str) -> None:
    for k, v in ref.items():
        assert metrics[f"{head}/{k}"] == pytest.approx(v, abs=1e-9), k


def test_reference_agrees_with_ranks_counted_by_hand():
    t2v, v2t = ranks_reference(SIM, T2V)
    assert t2v.tolist() == T2V_RANKS and v2t.tolist() == V2T_RANKS


@pytest.mark.parametrize("chunk", [None, 5])
def test_every_caption_a_query_dense_and_chunked(chunk):
    _, t2v = build_queries([[f"v{v} c{c}" for c in range(4)] for v in range(3)], "all")
    assert t2v.tolist() == T2V.tolist()
    m = score_retrieval(torch.from_numpy(SIM), t2v, chunk_size=chunk)
    ref = metrics_reference(np.array(T2V_RANKS), np.array(V2T_RANKS))
    _check(m, ref, "vtc")
    # the hand-counted numbers themselves: 4 of 12 queries top; v2t R@5 misses video 2 (rank 7)
    assert m["vtc/t2v_R@1"] == pytest.approx(100 * 4 / 12) and m["vtc/t2v_MedR"] == 2.0
    assert m["vtc/v2t_R@5"] == pytest.approx(100 * 2 / 3) and m["vtc/v2t_R@10"] == 100.0
    assert (m["vtc/t2v_num_queries"], m["vtc/v2t_num_queries"]) == (12, 3)


def test_first_caption_only_scores_the_first_rows():
    _, t2v = build_queries([[f"v{v} c{c}" for c in range(4)] for v in range(3)], "first")
    assert t2v.tolist() == [0, 1, 2]
    rows = SIM[[0, 4, 8]]
    m = score_retrieval(torch.from_numpy(rows), t2v)
    _check(m, metrics_reference(*ranks_reference(rows, np.arange(3))), "vtc")
    assert m["vtc/t2v_R@1"] == pytest.approx(100 * 2 / 3)  # caption 8 has video 0 above


def test_vtm_reranking_with_several_queries_per_video():
    """k_test=2: each query's two best videos and each video's two best captions (by SIM, no
    ties at the cut) are re-scored by a pair scorer; everything else drops to -inf."""
    rng = np.random.default_rng(0)
    vtm = rng.normal(size=SIM.shape).astype(np.float32)
    calls = []

    def pair_score(ti: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        calls.append(len(ti))
        return torch.from_numpy(vtm)[ti, vi]

    k = 2
    t2v_scores = np.full(SIM.shape, -np.inf, dtype=np.float32)
    for q in range(12):
        top = np.argsort(-SIM[q])[:k]
        t2v_scores[q, top] = vtm[q, top]
    v2t_scores = np.full(SIM.shape, -np.inf, dtype=np.float32)
    for v in range(3):
        top = np.argsort(-SIM[:, v])[:k]
        v2t_scores[top, v] = vtm[top, v]
    ref = metrics_reference(ranks_reference(t2v_scores, T2V)[0], ranks_reference(v2t_scores, T2V)[1])
    m = score_retrieval(torch.from_numpy(SIM), torch.from_numpy(T2V), k_test=k,
                        pair_score_fn=pair_score)
    _check(m, ref, "vtm")
    _check(m, metrics_reference(np.array(T2V_RANKS), np.array(V2T_RANKS)), "vtc")
    # video 2's captions are outside its top-2 (captions 3 and 7): worst rank, 1 + 8 others
    assert ranks_reference(v2t_scores, T2V)[1][2] == 9 and m["vtm/v2t_MeanR"] > 3
    pairs = {(q, int(v)) for q in range(12) for v in np.argsort(-SIM[q])[:k]}
    pairs |= {(int(q), v) for v in range(3) for q in np.argsort(-SIM[:, v])[:k]}
    assert m["vtm/pairs_scored"] == len(pairs) == sum(calls)  # each pair scored once


def test_queries_from_captions_in_each_mode():
    caps = [["a red circle ", "it moves left"], ["one caption"], [" x", "y ", "z"]]
    assert build_queries(caps, "first")[0] == ["a red circle ", "one caption", " x"]
    texts, t2v = build_queries(caps, "all")
    assert texts == ["a red circle ", "it moves left", "one caption", " x", "y ", "z"]
    assert t2v.tolist() == [0, 0, 1, 2, 2, 2]
    texts, t2v = build_queries(caps, "paragraph")
    assert texts == ["a red circle it moves left", "one caption", "x y z"] and t2v.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="eval.captions"):
        build_queries(caps, "every")


def _split(meta: list[dict], t2v: list[int]) -> EncodedSplit:
    n, q = len(meta), len(t2v)
    return EncodedSplit(video_feat=torch.zeros(n, 2), text_feat=torch.zeros(q, 2),
                        keys=[str(i) for i in range(n)], meta=meta,
                        text_to_video=torch.tensor(t2v), texts=[""] * q)


def test_temporal_check_ranks_each_query_among_its_group():
    # two groups of two clips (same colour, other direction); two queries per clip
    meta = [{"attributes": {"colour": c, "direction": d}} for c in ("red", "blue") for d in ("left", "up")]
    t2v = [0, 0, 1, 1, 2, 2, 3, 3]
    sim = torch.tensor([
        [0.9, 0.1, 0.0, 0.0], [0.2, 0.3, 5.0, 5.0],  # clip 0: hit, miss (0.3 > 0.2)
        [0.5, 0.4, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0],  # clip 1: miss, hit
        [9.0, 9.0, 0.6, 0.1], [9.0, 9.0, 0.8, 0.2],  # clip 2: hit, hit (clip 0/1 not in group)
        [0.0, 0.0, 0.3, 0.2], [0.0, 0.0, 0.1, 0.4],  # clip 3: miss, hit
    ])
    out = temporal_check(_split(meta, t2v), sim)
    assert out == {"R@1": pytest.approx(100 * 5 / 8), "chance": pytest.approx(50.0), "queries": 8}


def test_report_prints_the_queries_and_the_chance_of_the_real_mapping():
    metrics = {f"vtc/{d}_{k}": 1.0 for d in ("t2v", "v2t") for k in ("R@1", "R@5", "R@10", "MedR", "MeanR")}
    chance = retrieval_chance(torch.from_numpy(T2V), 3)
    text = format_report({"split": "test", "num_samples": 3, "num_queries": 12, "captions": "all",
                          "metrics": metrics, "chance": chance})
    assert "3 held-out clips, 12 text queries (eval.captions=all" in text
    t2v_row = next(line for line in text.splitlines() if line.startswith("chance t2v"))
    v2t_row = next(line for line in text.splitlines() if line.startswith("chance v2t"))
    # t2v: 1 of 3 videos; v2t: a video with 4 of 12 captions has one in the top 1 with p = 4/12
    assert t2v_row.split()[2:] == ["33.3", "100.0", "100.0", "-", "2.0"]
    assert v2t_row.split()[2] == "33.3" and v2t_row.split()[-1] == f"{13 / 5:.1f}"
