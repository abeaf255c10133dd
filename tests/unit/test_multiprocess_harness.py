"""The test suite's process harness (tests/helpers/multiprocess.py) on real gloo ranks: return
values in rank order from a real process group, a rank's exception re-raised with its rank and
traceback, a hanging rank killed at the timeout, a job under torch.distributed.run."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from tests.helpers.multiprocess import ProcessTimeout, python_module, run_job, run_ranks

pytestmark = [pytest.mark.distributed]


def _report(rank: int, tag: str) -> dict:
    import torch
    import torch.distributed as dist

    if rank == 0:
        time.sleep(1.0)  # rank 1 finishes first: the order must not be the order of completion
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "env_rank": os.environ["RANK"],
            "sum": total.item(), "tag": tag}


def _fail_on(rank: int, bad: int) -> None:
    if rank == bad:
        raise ValueError(f"no clips for rank {rank}")


def _hang_on(rank: int, bad: int) -> None:
    if rank == bad:
        time.sleep(3600)


def test_results_come_back_in_rank_order():
    got = run_ranks(_report, 2, "x", timeout=120)
    # the sum over a real all_reduce: 1 + 2
    assert got == [{"rank": r, "world": 2, "env_rank": str(r), "sum": 3.0, "tag": "x"} for r in range(2)]


def test_a_rank_raising_is_reported_with_its_rank_and_message():
    with pytest.raises(ValueError, match="no clips for rank 1") as info:
        run_ranks(_fail_on, 2, 1, timeout=120)
    note = "\n".join(info.value.__notes__)
    assert "raised on rank 1 of 2" in note
    # that rank's own traceback, down to the raising line
    assert "in _fail_on" in note and 'raise ValueError(f"no clips for rank {rank}")' in note
    assert "rank 0: returned" in note


def test_a_hanging_rank_fails_at_the_timeout():
    t0 = time.monotonic()
    # (on a loaded machine rank 0 may not have finished either: it is then named too)
    with pytest.raises(ProcessTimeout, match=r"rank\(s\) \[(0, )?1\] of 2 still running after 10 s") as info:
        run_ranks(_hang_on, 2, 1, timeout=10)
    elapsed = time.monotonic() - t0
    assert 10 <= elapsed < 10 + 15, elapsed
    assert "_hang_on" in str(info.value)


def test_run_job_runs_ranks_under_torch_distributed_run():
    code = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], os.environ['OMP_NUM_THREADS'])"
    res = run_job([sys.executable, "-c", code], nproc=2, timeout=120).check()
    assert sorted(re.findall(r"rank \d of \d 1", res.stdout)) == ["rank 0 of 2 1", "rank 1 of 2 1"]
    failed = run_job(python_module("json.tool", "/nonexistent.json"), timeout=60)
    assert failed.returncode != 0
    with pytest.raises(AssertionError, match="nonexistent.json"):
        failed.check()
