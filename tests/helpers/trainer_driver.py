"""Runs Trainer in this fresh process (no launcher) for the engine tests:
``python -m tests.helpers.trainer_driver RUNS`` (see tests/helpers/drive.py).

RUNS: a JSON list of runs, each either {"overrides": [...], "overwrite": bool, "task": {...},
"expect_error": bool, "probe": bool, "block_modules": [...]} (prints the fit() summary or the
error, and with "probe" the engine's outputs on a fixed input) or {"cli": [...]} (runs
`megavid ...` in this process and prints its exit code). One "RESULT <json>" line per entry.
"""

import json
import sys

import torch

from megavid.config import compose
from megavid.engine.trainer import Trainer
from megavid.errors import MegavidError, Preempted
from tests.helpers.megavid_toy import DIM, ToyTask
from tests.helpers.multiprocess import worker_main

PROBE_X = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7))


def main() -> None:
    for run in json.loads(sys.argv[1]):
        if "cli" in run:
            from megavid.cli import main as cli_main

            print("RESULT " + json.dumps({"rc": cli_main(run["cli"])}), flush=True)
            continue
        for name in run.get("block_modules", []):
            sys.modules[name] = None  # `import name` raises ImportError, as if not installed
        cfg = compose(["model=timesformer_tiny", *run["overrides"]])
        task = ToyTask(cfg, **run.get("task", {}))
        trainer = Trainer(cfg, task, overwrite=run.get("overwrite", False), resume=run.get("resume"))
        try:
            out = {"summary": trainer.fit()}
        except Preempted as e:  # a signal: checkpoint written, the CLI would exit 128 + signum
            out = {"summary": e.summary, "exit_code": e.exit_code}
        except MegavidError as e:
            if not run.get("expect_error"):
                raise
            out = {"error": f"{type(e).__name__}: {e}"}
        if run.get("probe"):
            trainer.engine.eval()
            with torch.no_grad():
                out["probe_out"] = trainer.engine(PROBE_X.to(task.dtype)).float().tolist()
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    worker_main(main)
