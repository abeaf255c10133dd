"""Helpers of the multi-node launcher tests: the launch environment, running a launcher,
reading a job's result, and the CI rule for missing capabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
JOB_TIMEOUT_S = 240


def missing_capability(reason: str) -> None:
    """Fail under CI=true, skip otherwise."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the multi-node tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def job_env(**extra: str) -> dict[str, str]:
    """The launch environment: the venv on PATH, offline, one intra-op thread per rank (two
    cores, up to four processes), plus ``extra``."""
    # a launcher's own variables must not leak in from whatever started pytest
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MEGAVID_PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def run_checked(cmd: list[str], *, env: dict[str, str], log: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Run ``cmd`` (cwd: the repository), fail the test with the log tail if it fails."""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
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
