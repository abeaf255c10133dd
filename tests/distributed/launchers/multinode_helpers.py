"""Helpers of the multi-node launcher tests: the launch environment, running a launcher,
reading a job's result, and the CI rule for missing capabilities."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers.multiprocess import Job, ProcessTimeout, process_env, start_job

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
JOB_TIMEOUT_S = 240


def missing_capability(reason: str) -> None:
    """Fail under CI=true, skip otherwise."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the multi-node tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def job_env(**extra: str) -> dict[str, str]:
    """The launch environment: the test harness's (offline, one intra-op thread per rank on two
    cores, no launcher variables from whatever started pytest), the venv on PATH and as
    MEGAVID_PYTHON, plus ``extra``."""
    return process_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                       MEGAVID_PYTHON=sys.executable, **extra)


def finish(job: Job, log: Path, timeout: float) -> int | str:
    """Wait for a started launcher job (the harness kills its process group at ``timeout``),
    write its stdout and stderr to ``log``; its exit code, or "timeout"."""
    try:
        res = job.wait(timeout)
        rc: int | str = res.returncode
    except ProcessTimeout:
        res, rc = job.result(), "timeout"
    log.write_text(res.stdout + res.stderr)
    return rc


def run_checked(cmd: list[str], *, env: dict[str, str], log: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Run ``cmd`` (cwd: the repository) through the test harness, fail the test with the log
    tail if it fails."""
    rc = finish(start_job(cmd, env=env), log, timeout)
    if rc != 0:
        pytest.fail(f"{' '.join(cmd[:8])} ... exited {rc}:\n{log.read_text()[-4000:]}", pytrace=False)


class PretrainJob:
    """The real CLI, ``megavid pretrain`` of the demo experiment at test size, on shards
    written once by ``megavid make-synthetic``."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root

    def args(self, out: Path) -> list[str]:
        return ["pretrain", "experiment=demo", f"data.root={self.data_root}", f"run.output_dir={out}",
                "run.name=job", "train.max_steps=4", "train.log_every=1", "train.precision=fp32",
                "data.batch_size=2", "data.num_workers=0", "train.tensorboard=false", "optim.warmup_steps=0",
                # smallest clips the tiny model takes: 4 frames of 2x2 patches
                "data.num_frames=4", "model.video.num_frames=4", "data.img_size=32", "model.video.img_size=32"]

    def result(self, out: Path) -> dict:
        run = out / "job"
        losses: dict[int, float] = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "train":
                losses[rec["step"]] = rec["loss"]
        world = json.loads((run / "env.json").read_text())["world"]  # rank 0's get_world_info()
        return {"losses": [losses[k] for k in sorted(losses)], "world_size": world["world_size"], "hosts": None,
                "local_world_size": world["local_world_size"]}
