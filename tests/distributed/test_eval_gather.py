"""Distributed evaluation gathering with 2 real processes (gloo, file rendezvous in tmp_path).

The evaluation set has 7 samples, so one rank holds a padded duplicate. Each rank computes the
features of its share from the sample index alone; the gathered result must equal the
single-process one: every sample once, in dataset order, with the same retrieval metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from megavid.errors import DataError
from megavid.eval.gather import gather_features, gather_objects, get_eval_shard
from megavid.eval.retrieval import rerank_topk, retrieval_metrics

N = 7
WORLD = 2


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample text and video features, a function of the sample index only."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N, 16, generator=g), torch.randn(N, 16, generator=g)


def _pair_score(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (t * 10 + v).float() / 100  # depends only on the pair: reproducible on any rank


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "a", buffering=1)

    def stage(name: str) -> None:  # progress markers: a hang report says where it stopped
        log.write(f"{time.strftime('%H:%M:%S')} {name}\n")

    try:
        stage("started")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD)
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
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        stage("results saved")
        dist.barrier()
        dist.destroy_process_group()
        stage("done")
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gather_equals_single_process(tmp_path):
    # Plain subprocesses running this file (see the bottom): unlike multiprocessing's spawn,
    # they never re-import whatever script started pytest as their __main__.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = str(tmp_path / "rendezvous")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), init, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD)
    ]
    # Two fresh interpreters import torch and join a gloo group: ~10 s on a free machine, but a
    # CI box running other jobs can be many times slower, so the hang limit is generous.
    limit = 420
    deadline = time.monotonic() + limit
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("rank*.log"))}
        pytest.fail(f"distributed gather did not finish in {limit} s; progress: {logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"

    text_tab, video_tab = _tables()
    ref_metrics = retrieval_metrics(text_tab @ video_tab.T, torch.arange(N))
    ref_rerank = rerank_topk(text_tab @ video_tab.T, 3, _pair_score)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
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


if __name__ == "__main__":  # one rank, started by the test above
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
