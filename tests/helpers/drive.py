"""The trainer driver (``tests.helpers.trainer_driver``) in a fresh process, for the engine tests:
its command line, its RESULT records, and :func:`drive`, which runs it to the end."""

from __future__ import annotations

import json

from tests.helpers.multiprocess import python_module, run_job


def driver_argv(runs: list[dict]) -> list[str]:
    """The command running ``runs`` (see trainer_driver.py) in one process, no launcher."""
    return python_module("tests.helpers.trainer_driver", json.dumps(runs))


def result_records(stdout: str) -> list[dict]:
    """The JSON of every "RESULT <json>" line a driver printed, in order."""
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def drive(runs: list[dict]) -> list[dict]:
    """The RESULT records of ``runs`` (see trainer_driver.py), one per entry."""
    proc = run_job(driver_argv(runs), timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return result_records(proc.stdout)
