"""Runs trainer_driver.py in a fresh process (no torchrun) for the engine tests, and its
environment: offline, one thread, and no rank variables, so a lone process picks a free port
(no clash with parallel sessions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).resolve().parent / "trainer_driver.py"


def driver_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    return env


def drive(runs: list[dict]) -> list[dict]:
    """The RESULT records of ``runs`` (see trainer_driver.py), one per entry."""
    proc = subprocess.run([sys.executable, str(DRIVER), json.dumps(runs)], env=driver_env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
