"""Runs pretraining runs through the engine's Trainer in this fresh process, for
test_engine_compile.py (``python -m tests.helpers.compile_driver RUNS``): the real VideoLM and
pretrain task on the synthetic loader (no files).

RUNS: a JSON list of runs, each a list of config overrides. One "RESULT <json>" line per run:
{"losses": per-step training losses (train.log_every=1), "graphs": dynamo's unique graphs
compiled during the run, "blocks": compiled blocks, "compile": the resolved mode}.
"""

import json
import sys

import torch
from torch._dynamo.utils import counters

from megavid.config import compose
from megavid.engine.trainer import Trainer
from megavid.models import get_blocks
from megavid.tasks import get_task
from tests.helpers.multiprocess import worker_main


def main() -> None:
    for overrides in json.loads(sys.argv[1]):
        torch._dynamo.reset()
        counters.clear()
        cfg = compose(overrides)
        task = get_task("pretrain")(cfg)
        trainer = Trainer(cfg, task, overwrite=True)
        summary = trainer.fit()
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        module = trainer.engine.module
        print("RESULT " + json.dumps({
            "losses": [r["loss"] for r in rows if r.get("split") == "train"],
            "graphs": counters["stats"]["unique_graphs"],
            "blocks": sum(b._compiled_call_impl is not None for b in get_blocks(module)),
            "compile": cfg.model.compile, "step": summary["step"],
        }), flush=True)


if __name__ == "__main__":
    worker_main(main)
