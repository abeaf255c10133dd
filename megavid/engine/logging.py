"""Run-directory logging: metrics.jsonl, tensorboard scalars, rank-0 progress bar, per-rank logs,
the resolved config.yaml and env.json.

Only rank 0 writes metrics; every rank writes its own ``logs/rank<R>.log``. Debug mode writes
nothing to the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from megavid.config import Config, to_yaml
from megavid.errors import ConfigError

log = logging.getLogger("megavid.engine")


def setup_rank_logging(run_dir: Path | None, rank: int, level: int = logging.INFO) -> None:
    """Log megavid's messages to ``<run_dir>/logs/rank<R>.log`` (and stderr on rank 0).

    On rank 0's stderr: warnings and errors always, and every INFO message (the training lines
    of :class:`MetricsLogger`, checkpoints, the end-of-run summary) when stderr is not a
    terminal (SLURM, nohup, a pipe), where no progress bar shows. On a terminal the progress
    bar shows the training state, and only the end-of-run summary joins the warnings.
    Records logged with ``extra={"file_only": True}`` (tracebacks) never reach stderr.

    Args:
        run_dir: the run directory (None: stderr only, e.g. debug mode).
        rank: this process's global rank.
        level: logging level.
    """
    root = logging.getLogger("megavid")
    root.setLevel(level)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    for h in list(root.handlers):
        if getattr(h, "_megavid", False):
            root.removeHandler(h)
            h.close()
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        fh._megavid = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh.addFilter(_ConsoleFilter(terminal=sys.stderr.isatty()))
        sh._megavid = True  # type: ignore[attr-defined]
        root.addHandler(sh)


class _ConsoleFilter(logging.Filter):
    """What rank 0 prints on stderr (see :func:`setup_rank_logging`)."""

    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if record.levelno >= logging.WARNING or getattr(record, "console", False):
            return True
        return not self.terminal


def check_writable_dirs(*dirs: Path) -> None:
    """Refuse, before any work, output folders that cannot be written: each existing one (and
    the first one, created if missing) must take a file.

    Args:
        dirs: the run directory first, then folders inside it that may already exist.

    Raises:
        ConfigError: naming the folder and why.
    """
    for i, d in enumerate(dirs):
        try:
            if i == 0:
                d.mkdir(parents=True, exist_ok=True)
            elif not d.exists():
                continue
            if not d.is_dir():
                raise NotADirectoryError(20, "not a folder", str(d))
            probe = d / f".megavid-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"cannot write the output folder {d} ({e.strerror or e}); make it writable or "
                "set run.output_dir to a writable folder") from None


def format_run_summary(summary: dict[str, Any]) -> str:
    """The end-of-run block: steps, wall time, final loss and metrics, skipped samples by
    reason, where the checkpoint and the metrics are.

    Args:
        summary: ``Trainer.fit``'s summary (plus ``wall_time_s`` and ``checkpoint``).
    """
    wall = float(summary.get("wall_time_s") or 0.0)
    minutes, seconds = divmod(int(round(wall)), 60)
    stopped = summary.get("interrupted")
    head = f"stopped by {stopped}" if stopped else "finished"
    lines = [f"run {head}: step {summary.get('step')}/{summary.get('total_steps')} (epoch "
             f"{summary.get('epoch')}) in {minutes}m{seconds:02d}s"]
    loss = summary.get("loss")
    if isinstance(loss, float) and math.isfinite(loss):
        lines.append(f"  final loss: {loss:.6g}")
    ev = summary.get("eval") or {}
    if ev:
        lines.append("  eval: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(ev.items())))
    skipped = summary.get("skipped_samples") or {}
    total = sum(skipped.values())
    lines.append(f"  skipped samples: {total}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) + ")" if total else ""))
    if summary.get("nonfinite_skipped"):
        lines.append(f"  non-finite losses skipped: {summary['nonfinite_skipped']}")
    run_dir = summary.get("run_dir")
    lines.append(f"  checkpoint: {summary.get('checkpoint') or 'none (debug mode)'}")
    if run_dir and summary.get("checkpoint"):
        lines.append(f"  metrics: {Path(run_dir) / 'metrics.jsonl'}; logs: {Path(run_dir) / 'logs'}")
    return "\n".join(lines)


def format_train_line(step: int, total_steps: int, metrics: dict[str, Any]) -> str:
    """One plain line of training state for log files: step, epoch, loss, lr, samples/s,
    data-wait %, TFLOP/s and MFU (when known), skipped samples.

    Args:
        step: optimizer steps done.
        total_steps: the run's steps.
        metrics: the step's metrics (``Trainer._log_train``).
    """
    parts = [f"step {step}/{total_steps}"]
    if "epoch" in metrics:
        parts.append(f"epoch {metrics['epoch']}")
    for key, fmt in (("loss", "loss {:.6g}"), ("lr", "lr {:.4g}"), ("samples_per_s", "{:.1f} samples/s"),
                     ("data_wait_pct", "data wait {:.1f}%"),
                     ("loader_feed_ms_per_batch", "feed {:.1f} ms/batch"),
                     ("loader_decode_wait_ms_per_batch", "decode wait {:.1f} ms/batch"),
                     ("tflops_per_device", "{:.1f} TFLOP/s"),
                     ("mfu", "MFU {:.1%}")):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            parts.append(fmt.format(v))
    parts.append(f"skipped {int(metrics.get('skipped_samples', 0))}")
    return " | ".join(parts)


def get_env_info(world_info: Any = None, extra: dict | None = None) -> dict:
    """Versions, devices and world layout, for ``env.json``."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "deepspeed", "transformers", "timm", "webdataset", "av", "nvidia-dali-cuda130",
                "numpy", "megavid"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
    }
    if world_info is not None:
        info["world"] = world_info.to_dict() if hasattr(world_info, "to_dict") else dict(world_info)
    if extra:
        info.update(extra)
    return info


def save_run_files(cfg: Config, run_dir: Path, env_info: dict, ds_config: dict | None = None) -> None:
    """Write ``config.yaml`` (resolved), ``env.json`` and ``deepspeed_config.json`` (rank 0 only).

    Args:
        cfg: the resolved config.
        run_dir: the run directory.
        env_info: from :func:`get_env_info`.
        ds_config: the DeepSpeed config in use.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "env.json").write_text(json.dumps(env_info, indent=2, default=str) + "\n")
    if ds_config is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


class MetricsLogger:
    """Rank-0 sink for scalars: metrics.jsonl, tensorboard and a tqdm progress bar.

    Args:
        run_dir: the run directory (None: no files, e.g. debug mode).
        rank: global rank (only rank 0 writes or shows anything).
        total_steps: optimizer steps of the run (progress bar length).
        start_step: step the run starts from (resume).
        tensorboard: write tensorboard scalars under ``<run_dir>/tb``.
        progress: show the tqdm bar.
        wandb: also log to Weights & Biases (``train.wandb``; the caller turns it off in debug
            mode). Needs a run directory; offline unless ``WANDB_MODE`` says otherwise.
        run_name: the W&B run name.
        config: the resolved config as a dict, stored with the W&B run.
    """

    def __init__(self, run_dir: Path | None, rank: int, total_steps: int, start_step: int = 0,
                 *, tensorboard: bool = True, progress: bool = True, wandb: bool = False,
                 run_name: str = "megavid", config: dict | None = None) -> None:
        self.active = rank == 0
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._wandb = None
        if wandb:
            # checked on every rank, so a missing package fails the whole job the same way
            _import_wandb()
        if not self.active:
            return
        if wandb and run_dir is not None:
            self._wandb = _init_wandb(run_dir, run_name, config or {}, resume=start_step > 0)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            # append: a resumed run continues the same file (steps after the checkpoint repeat,
            # readers keep the last record of each step)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             disable=not sys.stderr.isatty() and os.environ.get("MEGAVID_PROGRESS") != "1")

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Record scalars of one optimizer step.

        Args:
            step: optimizer step (1-based: the number of updates done).
            metrics: name -> value; non-numbers are kept in the JSONL only.
            prefix: tensorboard tag prefix ('train', 'eval').
        """
        if not self.active:
            return
        record = {"step": step, "split": prefix, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
        if prefix == "train":
            # rank0.log always; stderr too when it is not a terminal (setup_rank_logging)
            log.info("%s", format_train_line(step, self.total_steps, metrics))
        if self._bar is not None and prefix == "train":
            shown = {k: metrics[k] for k in ("loss", "lr", "samples_per_s", "tokens_per_s") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._jsonl = self._wandb = None


def _import_wandb() -> Any:
    """The wandb module, imported only when asked for (it is not a megavid dependency)."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("train.wandb=true but Weights & Biases is not installed; "
                          "pip install wandb, or set train.wandb=false") from e
    return wandb


def _init_wandb(run_dir: Path, run_name: str, config: dict, resume: bool) -> Any:
    """Start the W&B run of this run directory (files under ``<run_dir>/wandb``).

    Offline by default: clusters often have no route out, and a training job must never hang
    or die on a logging service; ``WANDB_MODE=online`` (or ``wandb online``) opts in.
    """
    wandb = _import_wandb()
    mode = os.environ.get("WANDB_MODE") or "offline"
    # a resumed run starts a new W&B run (its name marks the resume); ids are left to W&B
    # because run names may hold characters W&B ids do not allow
    name = f"{run_name}-resumed" if resume else run_name
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or "megavid", name=name,
                      dir=str(run_dir), config=config, mode=mode)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return str(x)


def read_metrics(path: Path | str, split: str = "train") -> dict[int, dict]:
    """step -> last record of that step in a metrics.jsonl (later records win, as after a resume).

    Args:
        path: metrics.jsonl or a run directory.
        split: 'train' or 'eval'.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    out: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == split:
                out[rec["step"]] = rec
    return out
