"""Distributed evaluation gathering with 2 real processes (gloo ranks of the test harness).

The evaluation set has 7 samples, so one rank holds a padded duplicate. Each rank computes the
features of its share from the sample index alone; the gathered result must equal the
single-process one: every sample once, in dataset order, with the same retrieval metrics.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.distributed as dist

from megavid.errors import DataError
from megavid.eval.gather import gather_features, gather_objects, get_eval_shard
from megavid.eval.retrieval import rerank_topk, retrieval_metrics
from tests.helpers.multiprocess import run_ranks

N = 7
WORLD = 2


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample text and video features, a function of the sample index only."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N, 16, generator=g), torch.randn(N, 16, generator=g)


def _pair_score(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (t * 10 + v).float() / 100  # depends only on the pair: reproducible on any rank


def _worker(rank: int) -> dict:
    def stage(name: str) -> None:  # progress markers: a hang report (the rank's stderr) says where it stopped
        print(f"{time.strftime('%H:%M:%S')} {name}", file=sys.stderr, flush=True)

    stage("process group ready")
    text_tab, video_tab = _tables()
    res: dict = {}
    # 1) DistributedSampler-style interleaved shard with a padded duplicate on rank 1
    idx, valid = get_eval_shard(N, rank, WORLD)
    res["shard"] = (idx.clone(), valid.clone())
    text = gather_features(text_tab[idx], valid, indices=idx, num_samples=N)
    video = gather_features(video_tab[idx], valid, indices=idx, num_samples=N)
    res["text"], res["video"] = text, video
    res["keys"] = gather_objects([f"clip{i}" for i in idx.tolist()], valid, indices=idx,
                                 num_samples=N)
    res["metrics"] = retrieval_metrics(text @ video.T, torch.arange(N))
    stage("interleaved gather done")
    # 2) reranking split by queries: each rank reranks its valid queries, rows are gathered
    sim = text @ video.T
    mine = idx[valid]
    rows = rerank_topk(sim, 3, _pair_score, queries=mine)
    res["reranked"] = gather_features(rows, torch.ones(len(mine), dtype=torch.bool),
                                      indices=mine, num_samples=N)
    # 3) contiguous uneven shards, no indices: rank-major order (rank 1 has one pad row)
    lo, hi = (0, 4) if rank == 0 else (4, 7)
    rows_idx = torch.arange(lo, hi) if rank == 0 else torch.tensor([4, 5, 6, 6])
    ok = torch.ones(len(rows_idx), dtype=torch.bool)
    if rank == 1:
        ok[-1] = False
    res["contiguous"] = gather_features(text_tab[rows_idx], ok)
    # 4) a rank with no samples at all, bool features of rank 3
    masks = (text_tab.view(N, 2, 8)[:, :, :3] > 0)
    held = torch.arange(N) if rank == 0 else torch.arange(0)
    res["masks"] = gather_features(masks[held], torch.ones(len(held), dtype=torch.bool))
    # 5) padding wrongly marked valid: every rank raises the same DataError (no hang)
    try:
        gather_features(text_tab[idx], torch.ones(len(idx), dtype=torch.bool), indices=idx)
        res["error"] = None
    except DataError as e:
        res["error"] = str(e)
    dist.barrier()
    stage("done")
    return res


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gather_equals_single_process():
    # Two fresh interpreters import torch and join a gloo group: ~10 s on a free machine, but a
    # CI box running other jobs can be many times slower, so the hang limit is generous.
    results = run_ranks(_worker, WORLD, timeout=420)

    text_tab, video_tab = _tables()
    ref_metrics = retrieval_metrics(text_tab @ video_tab.T, torch.arange(N))
    ref_rerank = rerank_topk(text_tab @ video_tab.T, 3, _pair_score)
    assert results[1]["shard"][1].tolist() == [True, True, True, False]  # the padding exists
    for res in results:  # every rank ends with the full, ordered, de-duplicated set
        assert torch.equal(res["text"], text_tab)
        assert torch.equal(res["video"], video_tab)
        assert res["keys"] == [f"clip{i}" for i in range(N)]
        assert res["metrics"] == ref_metrics
        assert torch.equal(res["reranked"], ref_rerank)
        assert torch.equal(res["contiguous"], text_tab)
        assert torch.equal(res["masks"], text_tab.view(N, 2, 8)[:, :, :3] > 0)
        assert res["error"] is not None and "more than one rank" in res["error"]

