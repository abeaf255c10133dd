"""Runs Trainer in a fresh process (no torchrun) for test_engine_trainer.py.

argv[1]: JSON list of runs, each either {"overrides": [...], "overwrite": bool, "task": {...},
"expect_error": bool, "probe": bool, "block_modules": [...]} (prints the fit() summary or the error, and with "probe"
the engine's outputs on a fixed input) or {"cli": [...]} (runs `megavid ...` in this process and
prints its exit code). One "RESULT <json>" line per entry.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "distributed"))

import torch  # noqa: E402
from megavid_toy import DIM, ToyTask  # noqa: E402

from megavid.config import compose  # noqa: E402
from megavid.engine.trainer import Trainer  # noqa: E402
from megavid.errors import MegavidError, Preempted  # noqa: E402

PROBE_X = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7))

for run in json.loads(sys.argv[1]):
    if "cli" in run:
        from megavid.cli import main

        print("RESULT " + json.dumps({"rc": main(run["cli"])}), flush=True)
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
