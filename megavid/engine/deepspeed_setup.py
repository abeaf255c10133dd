"""The batch plan, the DeepSpeed config derived from the YAML config, and the engine built from it.

:class:`BatchPlan` is the only place where batch math lives: micro batch per rank =
``data.batch_size``, accumulation = ``train.grad_accum``, global = micro x accum x world. The
DeepSpeed config, the LR scaling, the trainer's step accounting, checkpoints' and resume's
global-batch checks and the throughput meter all read it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megavid.config import Config
from megavid.errors import ConfigError
from megavid.engine.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Precision spellings users bring from other stacks -> megavid's train.precision.
PRECISION_ALIASES: dict[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16", "--bf16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "--fp16": "fp16", "16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32", "--fp32": "fp32",
}
# apex amp opt levels: not used (apex is not a dependency); say what replaces them.
_APEX_LEVELS = {"o0": "fp32", "o1": "bf16", "o2": "bf16", "o3": "bf16", "amp": "bf16", "apex": "bf16"}

# Keys megavid derives from the YAML config; a user JSON may not silently change them.
_DERIVED_KEYS = (
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
    "gradient_clipping", "zero_optimization.stage", "bf16.enabled", "fp16.enabled",
    "zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device",
)
# Which YAML key sets each derived key (for the error message).
_YAML_KEY = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size x train.grad_accum x world size",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
}


@dataclass(frozen=True)
class BatchPlan:
    """How many samples one optimizer step takes.

    Args:
        micro: samples per rank per forward (``data.batch_size``).
        accumulation: forwards per optimizer step (``train.grad_accum``).
        world: data-parallel ranks.
    """

    micro: int
    accumulation: int
    world: int

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> BatchPlan:
        """The plan of ``cfg`` on ``world_size`` ranks; a micro batch below 1 raises ConfigError."""
        if cfg.data.batch_size < 1:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
        return cls(cfg.data.batch_size, cfg.train.grad_accum, world_size)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: micro x accumulation x world."""
        return self.micro * self.accumulation * self.world

    def steps_per_epoch(self, micro_batches: int, max_samples: int = 0) -> int:
        """Optimizer steps in an epoch of ``micro_batches`` per rank.

        Args:
            micro_batches: the train loader's length (micro-batches per rank and epoch).
            max_samples: ``train.max_train_samples`` (> 0: at most that many samples' worth of
                steps, but at least one).

        Raises:
            ConfigError: an epoch shorter than one optimizer step.
        """
        steps = micro_batches // self.accumulation
        if max_samples > 0:
            steps = min(steps, max(1, max_samples // self.global_batch))
        if steps < 1:
            raise ConfigError(
                f"an epoch has {micro_batches} micro-batches per rank, fewer than train.grad_accum="
                f"{self.accumulation}; lower data.batch_size / train.grad_accum or add data")
        return steps


def resolve_precision(request: str, device_type: str = "cpu") -> str:
    """Map a precision request (``--fp16``, ``bfloat16``, apex ``O1`` ...) to bf16/fp16/fp32.

    fp16 needs a GPU (DeepSpeed's loss-scaled fp16 has no CPU path); apex amp is not used:
    DeepSpeed's bf16 (or fp16 with dynamic loss scaling) replaces it.

    Args:
        request: what the user asked for.
        device_type: 'cpu' or 'cuda'.
    """
    key = request.strip().lower()
    if key in _APEX_LEVELS or key.startswith("apex"):
        use = _APEX_LEVELS.get(key, "bf16")
        raise ConfigError(
            f"precision {request!r}: NVIDIA apex amp is not used by megavid; DeepSpeed handles mixed "
            f"precision: set train.precision={use} (or fp16 on a GPU without bf16)")
    if key not in PRECISION_ALIASES:
        raise ConfigError(f"precision {request!r} is not understood; use train.precision=bf16, fp16 or fp32")
    prec = PRECISION_ALIASES[key]
    if prec == "fp16" and device_type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling has no "
                          "CPU path); use train.precision=bf16 or fp32 on CPU")
    return prec


def get_dtype(precision: str) -> torch.dtype:
    """torch dtype of model weights/activations for a resolved precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_user_config(derived: dict, user: dict) -> dict:
    """Merge a user DeepSpeed dict over the derived one; conflicts raise ConfigError.

    Keys megavid derives (batch sizes, precision, ZeRO stage, clipping, offload) may appear in
    the user JSON only with the same value; everything else (bucket sizes, overlap_comm,
    comms logging, ...) is taken from the user.

    Args:
        derived: output of the YAML-derived config.
        user: the user's DeepSpeed JSON.
    """
    if "amp" in user and _get(user, "amp.enabled") is not False:
        raise ConfigError("the DeepSpeed JSON enables 'amp' (NVIDIA apex), which megavid does not use; "
                          "remove it and set train.precision=bf16 (or fp16 on GPU)")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"the DeepSpeed JSON has an '{key}' section; megavid builds the optimizer and "
                              f"schedule from the optim.* config (AdamW groups, warmup); remove '{key}'")
    conflicts = []
    for key in _DERIVED_KEYS:
        u, d = _get(user, key), _get(derived, key)
        if u is not None and u != d and not (u is False and d is None):
            conflicts.append(f"{key}={u!r} (derived {d!r} from {_YAML_KEY[key]})")
    if conflicts:
        raise ConfigError("train.deepspeed_json conflicts with the megavid config: " + "; ".join(conflicts)
                          + ". Set these through the YAML keys named, not the JSON")
    return _merge(derived, user)


def build_ds_config(cfg: Config, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks.

    Args:
        cfg: the resolved megavid config.
        world_size: number of data-parallel ranks.
        device_type: 'cpu' or 'cuda' (fp16 and pinned memory are GPU-only).
    """
    t = cfg.train
    precision = resolve_precision(t.precision, device_type)
    batch = BatchPlan.from_config(cfg, world_size)
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError("train.offload_params=true needs train.zero_stage=3 (only ZeRO-3 partitions parameters)")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage>=1")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        # contiguous_gradients/overlap_comm help on GPU; on CPU gloo they only add copies.
        zero.update({"contiguous_gradients": device_type == "cuda", "overlap_comm": device_type == "cuda",
                     "reduce_scatter": True})
    if t.zero_stage == 3:
        zero.update({"contiguous_gradients": device_type == "cuda", "overlap_comm": device_type == "cuda",
                     "stage3_gather_16bit_weights_on_model_save": False})
    pin = device_type == "cuda"
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch.micro,
        "gradient_accumulation_steps": batch.accumulation,
        "train_batch_size": batch.global_batch,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # megavid logs; keep DeepSpeed's own prints quiet
        "wall_clock_breakdown": False,
        # our AdamW groups are a torch optimizer, which ZeRO accepts with this flag
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if t.deepspeed_json:
        path = Path(t.deepspeed_json)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_json={t.deepspeed_json} does not exist; fix the path or clear it")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed_json={t.deepspeed_json} is not valid JSON: {e}") from e
        if not isinstance(user, dict):
            raise ConfigError(f"train.deepspeed_json={t.deepspeed_json} must hold a JSON object")
        ds = merge_user_config(ds, user)
    return ds


def build_engine(model: nn.Module, cfg: Config, *, world_size: int, total_steps: int,
                 device_type: str = "cpu", steps_per_epoch: int = 0, universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with megavid's AdamW groups and LR schedule.

    Returns ``(engine, optimizer, lr_scheduler, ds_config)``; DeepSpeed steps the scheduler
    after each optimizer update.

    Args:
        model: the model (plain ``nn.Module``, fp32 weights; DeepSpeed casts for bf16/fp16).
        cfg: the resolved config.
        world_size: data-parallel ranks (the process group must be initialised).
        total_steps: optimizer steps of the whole run (for the schedule).
        device_type: 'cpu' or 'cuda'.
        steps_per_epoch: optimizer steps per epoch (for ``optim.warmup_epochs``).
        universal: the engine will load a universal checkpoint (DeepSpeed must be told at
            initialize time: ``checkpoint.load_universal``).
    """
    import deepspeed

    ds_config = build_ds_config(cfg, world_size, device_type)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    optimizer = build_optimizer(model, cfg.optim, ds_config["train_batch_size"],
                                cpu_adam=cfg.train.offload_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler, ds_config
