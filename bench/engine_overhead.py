"""Engine overhead vs a bare torch loop (CPU), and peak memory per rank for ZeRO 0/1/2/3.

    .venv/bin/python bench/engine_overhead.py                 # both parts
    .venv/bin/python bench/engine_overhead.py --part overhead --steps 30
    .venv/bin/python bench/engine_overhead.py --part memory   # 2 ranks via torchrun, gloo

Overhead: the same model, data and AdamW step, timed per optimizer step (after warm-up) in a
bare loop (forward, backward, clip, step, zero_grad) and through ``Trainer`` (DeepSpeed ZeRO-0
fp32 engine, non-finite check, logging). Prints the ratio.

Memory: each ZeRO stage trains a few steps on 2 ranks in its own torchrun launch; each rank
reports its peak resident memory (ru_maxrss) minus the resident memory before the model was
built, and the bytes of parameters, gradients and optimizer state it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class BenchModel(nn.Module):
    """A transformer encoder classifier (pre-norm blocks), big enough that steps are not trivial."""

    def __init__(self, dim: int = 256, depth: int = 4, heads: int = 4, seq: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(32, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x) + self.pos).mean(1))

    def no_weight_decay(self) -> set[str]:
        return {"pos"}


class BenchLoader:
    def __init__(self, n_batches: int, batch: int, seq: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(batch, seq, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
                     for _ in range(n_batches)]
        self.epoch, self.cursor = 0, 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, e: int) -> None:
        if e != self.epoch:
            self.cursor = 0
        self.epoch = e

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.cursor = sd["epoch"], sd["cursor"]

    def __iter__(self):
        while self.cursor < len(self.data):
            i = self.cursor
            self.cursor += 1
            yield {"x": self.data[i][0], "y": self.data[i][1]}


class BenchTask:
    def __init__(self, cfg, model_kwargs: dict, n_batches: int) -> None:
        self.cfg, self.model_kwargs, self.n_batches = cfg, model_kwargs, n_batches

    def setup(self, device, dtype, rank, world_size, gather) -> None:
        self.device, self.dtype = device, dtype

    def build_model(self) -> nn.Module:
        return BenchModel(**self.model_kwargs)

    def build_train_loader(self, rank: int, world_size: int) -> BenchLoader:
        return BenchLoader(self.n_batches, self.cfg.data.batch_size, seed=rank)

    def training_forward(self, model, batch) -> dict:
        logits = model(batch["x"].to(self.device, self.dtype)).float()
        return {"loss": nn.functional.cross_entropy(logits, batch["y"])}

    def batch_size(self, batch) -> int:
        return batch["x"].shape[0]


def _cfg(out_dir: str, name: str, steps: int, batch: int, stage: int, precision: str = "fp32"):
    from megavid.config import compose

    return compose(["model=timesformer_tiny", f"run.output_dir={out_dir}", f"run.name={name}",
                    f"data.batch_size={batch}", f"train.max_steps={steps}", f"train.zero_stage={stage}",
                    f"train.precision={precision}", "train.log_every=1", "train.tensorboard=false",
                    "train.ckpt_every=0", "optim.lr=1e-4", "optim.schedule=constant"])


def bare_loop(steps: int, batch: int) -> float:
    """CPU seconds per step of a plain torch loop (same model/optimizer settings as the engine)."""
    from megavid.config import OptimConfig
    from megavid.engine.optim import build_optimizer

    torch.manual_seed(0)
    model = BenchModel()
    opt = build_optimizer(model, OptimConfig(lr=1e-4), batch)
    loader = BenchLoader(steps, batch)
    t0 = time.process_time()
    for b in loader:
        loss = nn.functional.cross_entropy(model(b["x"]).float(), b["y"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the engine reads the loss every step: same sync here
    return (time.process_time() - t0) / steps


def engine_loop(steps: int, batch: int, stage: int = 0) -> float:
    """CPU seconds per step of Trainer's loop (engine set-up excluded)."""
    from megavid.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(tmp, "overhead", steps, batch, stage)
        trainer = Trainer(cfg, BenchTask(cfg, {}, steps))
        loop = trainer._loop
        spent = {}

        def timed_loop(*args, **kwargs):
            t0 = time.process_time()
            out = loop(*args, **kwargs)
            spent["cpu"] = time.process_time() - t0
            return out

        save = trainer.save

        def timed_save(*args, **kwargs):  # the end-of-run checkpoint is not per-step work
            t0 = time.process_time()
            out = save(*args, **kwargs)
            spent["save"] = spent.get("save", 0.0) + time.process_time() - t0
            return out

        trainer._loop = timed_loop
        trainer.save = timed_save
        trainer.fit()
    return (spent["cpu"] - spent.get("save", 0.0)) / steps


def part_overhead(steps: int, batch: int, rounds: int = 3) -> None:
    # Process CPU time on one thread, not wall time: this machine is shared, and wall time
    # measured the neighbours' load (+-25% between rounds). Alternating rounds, min of each.
    torch.set_num_threads(1)
    bares, engs = [], []
    for _ in range(rounds):
        bares.append(bare_loop(steps, batch))
        engs.append(engine_loop(steps, batch))
    bare, eng = min(bares), min(engs)
    n = sum(p.numel() for p in BenchModel().parameters())
    print(f"rounds bare: {[round(b, 4) for b in bares]} engine: {[round(e, 4) for e in engs]}")
    print(f"| loop (CPU 1 thread, {n / 1e6:.2f} M params, batch {batch}, fp32; CPU s/step, min of {rounds} "
          f"rounds of {steps} steps) | s/step |")
    print("|---|---|")
    print(f"| bare torch (fwd, bwd, clip, AdamW) | {bare:.4f} |")
    print(f"| megavid Trainer, DeepSpeed ZeRO-0 (checkpoint at the end excluded) | {eng:.4f} |")
    print(f"engine overhead: {100 * (eng / bare - 1):+.1f}% (target < 10%)")


def _memory_worker(args) -> None:
    """Runs under torchrun: one stage, prints this rank's numbers as JSON."""
    from megavid.engine.trainer import Trainer

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    kwargs = {"dim": args.dim, "depth": args.depth, "heads": 8}
    cfg = _cfg(args.out, f"mem{args.stage}", args.steps, args.batch, args.stage, args.precision)
    trainer = Trainer(cfg, BenchTask(cfg, kwargs, args.steps))
    trainer.fit()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    eng = trainer.engine
    params = list(eng.module.parameters())
    if hasattr(params[0], "ds_tensor"):
        p_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    else:
        p_bytes = sum(p.numel() * p.element_size() for p in params)
    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)
    opt_bytes = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.numel() > 1)
    # fp32 master weights: attribute names differ per DeepSpeed optimizer wrapper
    # (ZeRO-1/2, ZeRO-3, BF16_Optimizer, FP16_UnfusedOptimizer used for bf16 without ZeRO)
    master = 0
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups"):
        for t in getattr(eng.optimizer, attr, []) or []:
            for u in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(u, torch.Tensor):
                    master += u.numel() * u.element_size()
        if master:
            break
    rank = int(os.environ.get("RANK", "0"))
    print("MEM " + json.dumps({"stage": args.stage, "rank": rank, "peak_rss_mib": peak_rss,
                               "rss_growth_mib": peak_rss - base_rss, "param_mib": p_bytes / 2**20,
                               "optimizer_state_mib": opt_bytes / 2**20, "fp32_master_mib": master / 2**20,
                               "num_params_m": sum(getattr(p, "ds_numel", p.numel()) for p in params) / 1e6}),
          flush=True)


def part_memory(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   __file__, "--part", "memory-worker", "--stage", str(stage), "--out", tmp,
                   "--steps", str(args.mem_steps), "--batch", "2", "--dim", str(args.dim), "--depth", str(args.depth),
                   "--precision", args.precision]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"stage {stage} failed")
            rows += [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("MEM ")]
    n = rows[0]["num_params_m"]
    print(f"\n| ZeRO ({n:.1f} M params, {args.precision}, 2 ranks, CPU gloo) | rank | params held MiB | "
          "fp32 master MiB | optimizer state MiB | peak RSS growth MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["stage"], r["rank"])):
        print(f"| {r['stage']} | {r['rank']} | {r['param_mib']:.1f} | {r['fp32_master_mib']:.1f} | "
              f"{r['optimizer_state_mib']:.1f} | {r['rss_growth_mib']:.1f} | {r['peak_rss_mib']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "overhead", "memory", "memory-worker"], default="all")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part == "memory-worker":
        _memory_worker(args)
        return
    if args.part in ("all", "overhead"):
        part_overhead(args.steps, args.batch)
    if args.part in ("all", "memory"):
        part_memory(args)


if __name__ == "__main__":
    main()
