"""Worker of tests/distributed/test_engine_distributed.py, run as ranks under torch.distributed.run
(``python -m tests.helpers.engine_worker SPEC``). One JSON spec in, one JSON per rank out.

Spec: {"out": path, "runs": [{"name", "overrides": [...], "task": {...}, "resume": str|None,
"expect_error": bool, "probe": bool}]}. Each run trains through ``Trainer`` and records the
fit() summary, this rank's optimizer-state sizes, and (``probe``) the model's outputs on a fixed
input, so the test can compare against independent references.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from megavid.config import compose
from megavid.engine.trainer import Trainer
from megavid.errors import MegavidError
from tests.helpers.megavid_toy import DIM, ToyTask
from tests.helpers.multiprocess import worker_main


def optimizer_state_numel(engine) -> dict:
    """Elements of Adam state (exp_avg) and fp32 master partitions held by this rank."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    exp_avg = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    exp_avg_sq = sum(s["exp_avg_sq"].numel() for s in inner.state.values() if "exp_avg_sq" in s)
    out = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "bytes": 0}
    for s in inner.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                out["bytes"] += v.numel() * v.element_size()
    # ZeRO-3: each rank holds only its partition of every parameter
    params = list(engine.module.parameters())
    if params and hasattr(params[0], "ds_tensor"):
        out["param_partition_numel"] = sum(p.ds_tensor.numel() for p in params)
    out["param_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    out["num_params"] = len(params)
    return out


def gather_x(rank: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + rank))


def gather_check(rank: int) -> dict:
    """all_gather_with_grad inside a rank-dependent contrastive-style loss: gathered values and
    this rank's input gradient (the test recomputes both on one process)."""
    from megavid.engine.dist import all_gather_with_grad, init_distributed

    init_distributed(device_type="cpu")
    x = gather_x(rank).requires_grad_(True)
    g = all_gather_with_grad(x)
    loss = torch.logsumexp(x @ g.t(), dim=1).sum() * (rank + 1)
    loss.backward()
    return {"name": "gather", "gathered": g.detach().tolist(), "grad": x.grad.tolist()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    results = []
    if spec.get("gather_check"):
        results.append(gather_check(rank))
    if spec.get("convert") and rank == 0:
        from megavid.engine.checkpoint import convert_to_universal

        convert_to_universal(spec["convert"])
    for run in spec["runs"]:
        cfg = compose(["model=timesformer_tiny", f"run.output_dir={spec['output_dir']}", f"run.name={run['name']}",
                       *run["overrides"]])
        task = ToyTask(cfg, **run.get("task", {}))
        trainer = Trainer(cfg, task, overwrite=run.get("overwrite", False), resume=run.get("resume"))
        rec = {"name": run["name"]}
        try:
            rec["summary"] = trainer.fit()
        except MegavidError as e:
            if not run.get("expect_error"):
                raise
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["nonfinite"] = trainer.nonfinite_total
            results.append(rec)
            continue
        rec["optimizer_state"] = optimizer_state_numel(trainer.engine)
        if run.get("probe"):
            x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7))
            trainer.engine.eval()
            with torch.no_grad():
                rec["probe_out"] = trainer.engine(x.to(task.dtype)).float().tolist()
        results.append(rec)
        if run.get("export") and rank == 0:
            from megavid.engine.checkpoint import export_fp32

            rec["exported"] = str(export_fp32(cfg.run_dir))
    Path(spec["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    worker_main(main)
