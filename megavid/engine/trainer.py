"""The one training loop: every task (pretrain, retrieval, QA) runs through ``Trainer``.

A task plugs in through a small protocol (see :class:`Task`); the trainer owns DeepSpeed, the
step loop, gradient accumulation, non-finite loss handling, evaluation, checkpoints/resume,
signals and logging. It knows nothing about video.

Determinism: model init uses ``run.seed`` on every rank (DeepSpeed broadcasts rank 0's weights
anyway); the training RNG of rank R is seeded with ``run.seed + R`` and saved per rank in every
checkpoint together with the loader state, so a run killed at any step and resumed from its
last checkpoint repeats the uninterrupted run's per-step losses (bitwise in fp32).
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from megavid.config import Config, to_dict
from megavid.engine import checkpoint as ckpt
from megavid.engine import dist
from megavid.engine.deepspeed_setup import BatchPlan, build_engine, get_dtype, resolve_precision
from megavid.engine.logging import (MetricsLogger, check_writable_dirs, format_run_summary, get_env_info,
                                    save_run_files, setup_rank_logging)
from megavid.engine.optim import get_model_order, get_param_order
from megavid.engine.parallelize import apply_model_options
from megavid.engine.throughput import ThroughputMeter, get_device_name, get_peak_tflops
from megavid.errors import CheckpointError, ConfigError, MegavidError, Preempted, describe_exception

log = logging.getLogger(__name__)

LOADER_STATS = ("pipeline_builds", "feed_ms_per_batch", "decode_wait_ms_per_batch")
"""Loader counters (``loader.stats()``) logged with every training line, as ``loader_<name>``."""

DEBUG_MAX_STEPS = 3
"""Debug mode (``run.debug``) runs at most this many steps, writing nothing to the run dir."""


class NonFiniteLossError(MegavidError):
    """Too many non-finite losses in a row."""


class Task(Protocol):
    """What the trainer needs from a task (see the shared contracts).

    Optional methods, used when present: ``evaluate(model) -> dict[str, float]``,
    ``flops_per_sample(model) -> float`` (TFLOP/s, MFU) and ``tokens_per_sample(batch) -> float``
    (mean tokens per sample of a batch, e.g. frames x patches + text tokens: tokens/s).
    """

    def setup(self, device: torch.device, dtype: torch.dtype, rank: int, world_size: int, gather: Any) -> None: ...

    def build_model(self) -> nn.Module: ...

    def build_train_loader(self, rank: int, world_size: int) -> Any: ...

    def training_forward(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    def batch_size(self, batch: Any) -> int: ...


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(cfg: Config, local_rank: int) -> torch.device:
    """The training device from ``run.device`` ('auto' picks cuda when available)."""
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but no CUDA GPU is visible; use run.device=cpu or auto")
        return torch.device("cuda", local_rank)
    if want != "cpu":
        raise ConfigError(f"run.device={want!r} must be auto, cpu or cuda")
    return torch.device("cpu")


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _latest_path(ckpt_dir: Path) -> str | None:
    tag = ckpt.get_latest_tag(ckpt_dir)
    return str(ckpt_dir / tag) if tag else None


def _remove_run_dir(run_dir: Path) -> None:
    for h in list(logging.getLogger("megavid").handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(run_dir):
            logging.getLogger("megavid").removeHandler(h)
            h.close()
    shutil.rmtree(run_dir, ignore_errors=True)


class Trainer:
    """Train ``task`` under ``cfg`` with DeepSpeed; ``fit()`` runs to the end (or a signal).

    Args:
        cfg: the resolved config; ``cfg.run_dir`` is the run directory.
        task: an object implementing :class:`Task`.
        overwrite: start afresh in an existing run directory (its checkpoints and metrics go).
        resume: resume from this checkpoint (run dir, checkpoints dir, ``step_<N>`` or a
            universal folder) instead of the run's latest.
    """

    def __init__(self, cfg: Config, task: Task, *, overwrite: bool = False, resume: str | Path | None = None) -> None:
        self.cfg = cfg
        self.task = task
        # An elastic restart (torchrun --max_restarts) re-runs the same command line: it must
        # resume from the latest checkpoint, never wipe the run that --overwrite started.
        self.overwrite = overwrite and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        self.resume = Path(resume) if resume else None
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.debug = cfg.run.debug
        self.engine: Any = None
        self.loader: Any = None
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.best: dict[str, Any] = {}
        self._stop_signal: int | None = None
        self.batch: BatchPlan | None = None  # set in fit(), once the world size is known
        self._skipped_before: dict[str, int] = {}  # skipped samples before the resumed checkpoint
        self._stepped = False  # an optimizer step finished in this process
        self._iterator: list | None = None  # [the train loader's current iterator]

    # ---------------------------------------------------------------- setup
    def _find_resume(self, rank: int) -> tuple[Path, str] | None:
        if self.resume is not None:
            return ckpt.resolve_checkpoint(self.resume)
        if self.debug or self.overwrite:
            return None
        tag = ckpt.get_latest_tag(self.ckpt_dir)
        return (self.ckpt_dir, tag) if tag else None

    def _prepare_run_dir(self, rank: int) -> None:
        if self.debug:
            return
        if rank == 0 and self.overwrite and self.resume is None:
            # the old run's evaluation results go with its checkpoints (they name them)
            for name in ("checkpoints", "tb", "logs", "eval"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for name in ("metrics.jsonl", ckpt.EXPORT_NAME):
                (self.run_dir / name).unlink(missing_ok=True)
        dist.barrier()

    def _plan_steps(self) -> tuple[int, int]:
        """(steps per epoch, total optimizer steps)."""
        t = self.cfg.train
        steps_per_epoch = self.batch.steps_per_epoch(len(self.loader), t.max_train_samples)
        total = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
        if total < 1:
            raise ConfigError("nothing to train: set train.max_steps > 0 or train.epochs > 0")
        if self.debug:
            total = min(total, DEBUG_MAX_STEPS)
        return steps_per_epoch, total

    def _install_signals(self) -> dict:
        old = {}

        def handler(signum, frame):  # noqa: ARG001
            # Only set a flag: the loop saves a checkpoint at the next step boundary, where
            # every rank agrees to stop (SLURM sends SIGTERM to all ranks, not at once).
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum
            log.warning("received signal %d: checkpointing at the end of this step", signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    # ---------------------------------------------------------------- state
    def client_state(self) -> dict:
        """Everything megavid needs to resume besides DeepSpeed's own state."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped_samples": self._skipped(),
            "best": self.best,
            "world_size": self.batch.world,
            "global_batch_size": self.batch.global_batch,
            "zero_stage": self.cfg.train.zero_stage,
            "param_order": self._param_order,
            "config": to_dict(self.cfg),  # what this checkpoint was trained with (resume compares)
        }

    def save(self) -> str | None:
        """Checkpoint now (collective); returns the tag (None in debug mode)."""
        if self.debug:
            return None
        keep = (self.best["tag"],) if self.best.get("tag") else ()
        try:
            tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, self.client_state(),
                                       keep_last=self.cfg.train.keep_last, keep=keep)
        except (OSError, RuntimeError) as e:
            # a full disk or an unwritable folder: `latest` still names the last good checkpoint
            last = ckpt.get_latest_tag(self.ckpt_dir)
            raise CheckpointError(
                f"saving checkpoint {self.ckpt_dir / f'step_{self.step}'} failed "
                f"({describe_exception(e)}); the last good checkpoint is "
                f"{self.ckpt_dir / last if last else 'none'}") from e
        log.info("saved checkpoint %s", self.ckpt_dir / tag)
        return tag

    def _skipped(self) -> dict[str, int]:
        """Bad samples the train loaders of all ranks skipped, by reason (each distinct bad
        sample once per epoch that met it), since the run started: the counts of the
        checkpoint resumed from plus this process's (collective: every rank calls it)."""
        failures = getattr(self.loader, "failures", None) or {}
        mine = {str(k): int(v) for k, v in failures.items()}
        total = dist.sum_counts(mine)
        for k, v in self._skipped_before.items():
            total[k] = total.get(k, 0) + int(v)
        return dict(sorted(total.items()))

    def _close_loader(self) -> None:
        """Stop the train loader's workers now (an exception must not leave them running)."""
        it = self._iterator[0] if self._iterator else None
        self._iterator = None
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - already failing; the first error counts
                log.warning("closing the train loader: %s", e)

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to ``train.max_steps`` (or ``train.epochs``); returns a summary dict.

        Keys: ``step``, ``epoch``, ``loss`` (last logged), ``nonfinite_skipped``,
        ``skipped_samples`` (reason -> distinct bad samples met), ``interrupted`` (None),
        ``eval`` (last evaluation), ``run_dir``, ``checkpoint``, ``wall_time_s``.

        Rank 0 ends the run with a summary block (stderr and ``logs/rank0.log``).

        Raises:
            Preempted: stopped by SIGTERM/SIGINT after writing a checkpoint (its ``summary``
                holds the keys above, ``interrupted`` the signal's name).
            ConfigError: the run directory cannot be written (before any work).
        """
        t0 = time.perf_counter()
        created = not self.debug and not self.run_dir.exists()
        if not self.debug:
            check_writable_dirs(self.run_dir, self.ckpt_dir)
        try:
            summary = self._fit()
        except BaseException as e:
            self._close_loader()
            if not self._stepped:
                if created and isinstance(e, MegavidError) and dist.get_rank() == 0:
                    # nothing ran: leave no empty run folder behind (the error says it all)
                    _remove_run_dir(self.run_dir)
            else:  # for the log file; the CLI prints the one line on stderr
                log.error("stopped by an error at step %d: %s", self.step, describe_exception(e),
                          extra={"file_only": True})
            raise
        self._close_loader()
        summary["wall_time_s"] = time.perf_counter() - t0
        summary["checkpoint"] = None if self.debug else _latest_path(self.ckpt_dir)
        if dist.get_rank() == 0:
            log.info("%s", format_run_summary(summary), extra={"console": True})
        if summary["interrupted"]:
            signum = int(signal.Signals[summary["interrupted"]])
            raise Preempted(
                f"stopped by {summary['interrupted']} at step {summary['step']} after writing "
                f"checkpoint {summary['checkpoint']}; run the same command again to resume",
                signum, summary)
        return summary

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        info = dist.get_world_info()
        device = get_device(cfg, info.local_rank)
        precision = resolve_precision(t.precision, device.type)
        dtype = get_dtype(precision)
        info = dist.init_distributed(device_type=device.type)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        # --overwrite clears the old run's logs/ before this run's log files are opened
        self._prepare_run_dir(rank)
        setup_rank_logging(None if self.debug else self.run_dir, rank)
        self.batch = BatchPlan.from_config(cfg, world_size)
        if world_size > 1:
            report = dist.gather_launch_report()  # collective: every rank takes part
            if rank == 0 and report:
                log.info("%s", report)
        resume_from = self._find_resume(rank)

        # Same seed on every rank for the model; per-rank seed for the training RNG.
        seed_everything(cfg.run.seed)
        self.task.setup(device, dtype, rank, world_size, dist.all_gather_with_grad)
        model = self.task.build_model()
        # activation checkpointing and torch.compile, before DeepSpeed wraps the model
        apply_model_options(model, cfg.model, zero_stage=t.zero_stage)
        self.loader = self.task.build_train_loader(rank, world_size)
        steps_per_epoch, total_steps = self._plan_steps()

        # DeepSpeed must know at initialize time that it loads a universal checkpoint.
        self._universal = resume_from is not None and ckpt.is_universal(*resume_from)
        self.engine, _, self.scheduler, ds_config = build_engine(
            model, cfg, world_size=world_size, total_steps=total_steps, device_type=device.type,
            steps_per_epoch=steps_per_epoch, universal=self._universal)
        if world_size == 1 and t.zero_stage == 0:
            # Without ZeRO, DeepSpeed all-reduces (flatten, reduce, unflatten) every gradient after
            # backward; over one rank that is an identity costing a full copy of the gradients.
            self.engine.enable_backward_allreduce = False
        self._param_order = get_param_order(model, cfg.optim)
        self._model_order = get_model_order(model, self._param_order)

        flops = 0.0
        if hasattr(self.task, "flops_per_sample"):
            flops = float(self.task.flops_per_sample(model))
        peak = get_peak_tflops(get_device_name(device), precision) if device.type == "cuda" else None

        loader_state = None
        rng_state = None
        if resume_from is not None:
            from megavid.engine import resume as resume_cfg

            # the config against the checkpoint's, before DeepSpeed sees a changed model
            plan = resume_cfg.check_resume_config(cfg, *resume_from, world_size=world_size,
                                                  universal=self._universal, rank=rank)
            state, rng_state = ckpt.load_checkpoint(self.engine, *resume_from)
            self._check_resume_compat(state, resume_from)
            self.step, self.epoch = state["step"], state["epoch"]
            self.nonfinite_total = state["nonfinite_total"]
            self.nonfinite_in_row = state["nonfinite_in_row"]
            self._skipped_before = dict(state.get("skipped_samples", {}))
            self.best = resume_cfg.resumed_best(state.get("best", {}), plan, cfg)
            loader_state = state["loader"]
            # optimizer hyperparameters and schedule from this config (DeepSpeed restored the old)
            resume_cfg.apply_optim(self.scheduler, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                   global_batch=self.batch.global_batch)
            log.info("resumed from %s at step %d (epoch %d)", resume_from[0] / resume_from[1], self.step, self.epoch)
            plan.log_changes(self.step)
        else:
            plan = None

        if rank == 0 and not self.debug:
            from megavid.engine.resume import record_history

            record_history(self.run_dir, cfg, plan, self.step)
            save_run_files(cfg, self.run_dir, get_env_info(info, {
                "device": get_device_name(device), "precision": precision,
                "flops_per_sample": flops, "peak_tflops": peak,
                "resumed_from": str(resume_from[0] / resume_from[1]) if resume_from else None,
            }), ds_config)
        logger = MetricsLogger(None if self.debug else self.run_dir, rank, total_steps, self.step,
                               tensorboard=t.tensorboard and not self.debug,
                               wandb=t.wandb and not self.debug, run_name=cfg.run.name,
                               config=to_dict(cfg))
        meter = ThroughputMeter(world_size=self.batch.world, flops_per_sample=flops, peak_tflops=peak)

        self.loader.set_epoch(self.epoch)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        # RNG last: nothing between here and the first step may draw from it, so the resumed
        # run's stream continues exactly where the checkpoint left it.
        if rng_state is not None:
            ckpt.set_rng_state(rng_state)
        elif resume_from is None:
            seed_everything(cfg.run.seed + rank)
        else:
            log.warning("checkpoint has no RNG state for rank %d (world size changed): reseeding", rank)
            seed_everything(cfg.run.seed + rank + 1000 * self.step)

        old_handlers = self._install_signals()
        summary: dict[str, Any] = {"eval": {}, "loss": float("nan")}
        interrupted = None
        try:
            interrupted = self._loop(total_steps, logger, meter, summary, device)
        finally:
            logger.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        summary.update({
            "step": self.step, "epoch": self.epoch, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "nonfinite_skipped": self.nonfinite_total,
            "interrupted": interrupted, "run_dir": str(self.run_dir),
            "peak_memory_gib": _peak_memory_gib(device),
            "skipped_samples": self._skipped(),
        })
        return summary

    def _check_resume_compat(self, state: dict, where: tuple[Path, str]) -> None:
        gb, world_size = self.batch.global_batch, self.batch.world
        if state["global_batch_size"] != gb:
            raise CheckpointError(
                f"checkpoint {where[0] / where[1]} was trained with global batch {state['global_batch_size']}, "
                f"this run has {gb} (data.batch_size x train.grad_accum x world size); set train.grad_accum so "
                "they match, or start afresh with --overwrite")
        if not self._universal:  # universal checkpoints map optimizer state by name
            ckpt.check_param_order(state.get("param_order"), self._param_order, self._model_order,
                                   where[0] / where[1])
        if state["world_size"] != world_size and not self._universal and state["zero_stage"] > 0:
            raise CheckpointError(
                f"checkpoint {where[0] / where[1]} was written by {state['world_size']} ranks, this run has "
                f"{world_size}; convert it first (megavid.engine.checkpoint.convert_to_universal) and "
                "--resume the step_<N>_universal folder")

    def _next_batch(self, it_holder: list) -> tuple[Any, float]:
        t0 = time.perf_counter()
        while True:
            try:
                batch = next(it_holder[0])
                return batch, time.perf_counter() - t0
            except StopIteration:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                it_holder[0] = iter(self.loader)
                if len(self.loader) == 0:
                    raise ConfigError("the train loader yields no batches; check the data paths") from None

    def _loop(self, total_steps: int, logger: MetricsLogger, meter: ThroughputMeter, summary: dict,
              device: torch.device) -> str | None:
        t = self.cfg.train
        engine = self.engine
        engine.train()
        it_holder = [iter(self.loader)]
        start_step = self.step
        count_tokens = hasattr(self.task, "tokens_per_sample")
        sums: dict[str, float] = {}
        count = 0
        meter.reset()
        self._iterator = it_holder
        while self.step < total_steps:
            data_wait = 0.0
            samples = 0
            tokens = 0.0
            micro = 0
            while micro < self.batch.accumulation:
                batch, waited = self._next_batch(it_holder)
                data_wait += waited
                out = self.task.training_forward(engine, batch)
                if "loss" not in out:
                    raise ConfigError(f"{type(self.task).__name__}.training_forward returned no 'loss' entry")
                loss = out["loss"]
                # Every rank must agree before backward: ZeRO's collectives need all ranks to
                # take the same path. A non-finite micro-batch is dropped (no backward, no
                # optimizer or scheduler change) and the next batch takes its place.
                if dist.any_across_ranks(not bool(torch.isfinite(loss.detach()).all()), device):
                    self.nonfinite_total += 1
                    self.nonfinite_in_row += 1
                    log.warning("non-finite loss at step %d (micro-batch %d): skipped (%d in a row, %d total)",
                                self.step + 1, micro, self.nonfinite_in_row, self.nonfinite_total)
                    del out, loss
                    if self.nonfinite_in_row >= t.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
                            f"{t.max_nonfinite}) at step {self.step + 1}; lower optim.lr, raise optim.warmup_steps, "
                            "use train.precision=fp32, or check the data for broken samples")
                    continue
                self.nonfinite_in_row = 0
                engine.backward(loss)
                engine.step()
                micro += 1
                n = int(self.task.batch_size(batch))
                samples += n
                if count_tokens:
                    tokens += float(self.task.tokens_per_sample(batch)) * n
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.detach().float())
                count += 1
                del out, loss
            # The optimizer stepped at the last micro-batch: tasks update state that trails the
            # weights (e.g. the EMA of momentum encoders) here, never inside training_forward.
            if hasattr(self.task, "after_step"):
                self.task.after_step(engine.module)
            self.step += 1
            self._stepped = True
            meter.add(samples, data_wait, tokens if count_tokens else None)
            logger.advance()

            last = self.step >= total_steps
            stop = dist.any_across_ranks(self._stop_signal is not None, device)
            if self.step % max(t.log_every, 1) == 0 or last or stop:
                self._log_train(logger, meter, sums, count, device, summary)
                sums, count = {}, 0
                meter.reset()
            if t.eval_every > 0 and self.step % t.eval_every == 0 and not last and hasattr(self.task, "evaluate"):
                self._evaluate(logger, summary)
            ckpt_due = t.ckpt_every > 0 and self.step % t.ckpt_every == 0
            if stop:
                self.save()
                name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
                log.warning("stopped by %s at step %d after saving a checkpoint", name, self.step)
                return name
            if ckpt_due and not last and self.best.get("step") != self.step:
                self.save()
        if self.step == start_step:  # resumed a finished run: nothing to do
            return None
        if hasattr(self.task, "evaluate") and t.eval_every > 0:
            self._evaluate(logger, summary)
        if not self.debug and self.best.get("step") != self.step:
            self.save()
        return None

    def _log_train(self, logger: MetricsLogger, meter: ThroughputMeter, sums: dict, count: int,
                   device: torch.device, summary: dict) -> None:
        keys = sorted(sums)
        if count:
            vals = dist.all_reduce_mean(torch.tensor([sums[k] / count for k in keys], dtype=torch.float64))
            metrics = {k: float(v) for k, v in zip(keys, vals.tolist())}
        else:
            metrics = {}
        lrs = self.scheduler.get_last_lr() if self.scheduler is not None else []
        if lrs:
            metrics["lr"] = float(lrs[0])
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            gn = float(gn)
            if math.isfinite(gn):
                metrics["grad_norm"] = gn
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        if isinstance(scale, (int, float)) and self.cfg.train.precision == "fp16":
            metrics["loss_scale"] = float(scale)
        metrics.update(meter.summary())
        metrics["peak_memory_gib"] = _peak_memory_gib(device)
        metrics["nonfinite_skipped"] = self.nonfinite_total
        # the loader's own counters (pipeline builds, feed and decode-wait ms per batch), rank 0's
        stats = getattr(self.loader, "stats", None)
        for k, v in (stats() if callable(stats) else {}).items():
            if k in LOADER_STATS:
                metrics[f"loader_{k}"] = float(v)
        skipped = self._skipped()
        metrics["skipped_samples"] = sum(skipped.values())
        metrics.update({f"skipped_{reason}": n for reason, n in skipped.items()})
        metrics["epoch"] = self.epoch
        logger.log(self.step, metrics)
        if "loss" in metrics:
            summary["loss"] = metrics["loss"]

    def _evaluate(self, logger: MetricsLogger, summary: dict) -> None:
        self.engine.eval()
        try:
            with torch.no_grad():
                metrics = self.task.evaluate(self.engine)
        finally:
            self.engine.train()
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        logger.log(self.step, metrics, prefix="eval")
        summary["eval"] = metrics
        self._update_best(metrics)

    def _update_best(self, metrics: dict[str, float]) -> None:
        """Checkpoint now when ``train.best_metric`` improved; the best tag survives pruning."""
        t = self.cfg.train
        if not t.best_metric or self.debug:
            return
        if t.best_metric not in metrics:
            raise ConfigError(f"train.best_metric={t.best_metric!r} is not among the eval metrics "
                              f"({', '.join(sorted(metrics)) or 'none'}); pick one of them")
        value = metrics[t.best_metric]
        old = self.best.get("value")
        better = old is None or (value > old if t.best_mode == "max" else value < old)
        if not (better and math.isfinite(value)):
            return
        self.best = {"metric": t.best_metric, "value": value, "step": self.step, "tag": f"step_{self.step}"}
        self.save()
        if dist.get_rank() == 0:
            (self.ckpt_dir / "best").write_text(self.best["tag"] + "\n")
        log.info("new best %s=%.6g at step %d", t.best_metric, value, self.step)
