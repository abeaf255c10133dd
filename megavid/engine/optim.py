"""AdamW parameter groups and the learning-rate schedule (warmup, then cosine/linear/constant)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from megavid.config import OptimConfig
from megavid.errors import ConfigError

log = logging.getLogger(__name__)


def _matches(name: str, names: set[str]) -> bool:
    """True when ``name`` is in ``names`` or ends with one of them at a module boundary."""
    if name in names:
        return True
    return any(name.endswith("." + n) for n in names)


def get_no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay.

    Biases, norm weights and other 1-D parameters, ``nn.Embedding`` weights, and whatever the
    model lists in ``no_weight_decay()`` (positional / time embeddings, cls tokens,
    temperatures): decaying those only pulls them toward zero for no regularisation benefit.

    Args:
        model: the model (not the DeepSpeed engine).
    """
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    embedding_weights = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.Embedding)
    }
    out = set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in embedding_weights or _matches(name, listed):
            out.add(name)
    return out


def get_lr_scale(optim_cfg: OptimConfig, global_batch_size: int) -> float:
    """Linear LR scaling factor ``global_batch / reference_batch_size`` (1 when not asked).

    Args:
        optim_cfg: optimizer settings (``reference_batch_size`` 0 disables scaling).
        global_batch_size: micro batch x grad accumulation x world size.
    """
    if optim_cfg.reference_batch_size <= 0:
        return 1.0
    return global_batch_size / optim_cfg.reference_batch_size


def build_param_groups(model: nn.Module, optim_cfg: OptimConfig, lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: (backbone | new) x (decay | no decay), empty groups dropped.

    Pretrained backbones get ``optim.backbone_lr`` when it is > 0 and the model exposes
    ``backbone_param_names()``; newly initialised layers get ``optim.lr``. Both are multiplied
    by ``lr_scale``. Each group carries a ``name`` for logging.

    Args:
        model: the model (plain ``nn.Module``).
        optim_cfg: optimizer settings.
        lr_scale: factor from :func:`get_lr_scale`.
    """
    no_decay = get_no_decay_names(model)
    backbone: set[str] = set()
    if optim_cfg.backbone_lr > 0 and hasattr(model, "backbone_param_names"):
        backbone = set(model.backbone_param_names())
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bb = name in backbone
        is_nd = name in no_decay
        g = groups.setdefault((is_bb, is_nd), {
            "name": f"{'backbone' if is_bb else 'new'}_{'no_decay' if is_nd else 'decay'}",
            "params": [],
            "param_names": [],
            "lr": (optim_cfg.backbone_lr if is_bb else optim_cfg.lr) * lr_scale,
            "weight_decay": 0.0 if is_nd else optim_cfg.weight_decay,
        })
        g["params"].append(p)
        g["param_names"].append(name)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check requires_grad / freezing settings")
    for g in groups.values():
        _align_order(g)
    # Fixed order so every rank (and a resumed run) builds identical groups.
    order = [(False, False), (False, True), (True, False), (True, True)]
    return [groups[k] for k in order if k in groups]


def get_param_order(model: nn.Module, optim_cfg: OptimConfig) -> dict[str, list[str]]:
    """Parameter names of each optimizer group in the order the optimizer (and DeepSpeed's
    flat ZeRO buffers) hold them: saved with every checkpoint, checked on resume."""
    return {g["name"]: g["param_names"] for g in build_param_groups(model, optim_cfg)}


def get_model_order(model: nn.Module, order: dict[str, list[str]]) -> dict[str, list[str]]:
    """``order``'s groups with their names in model order: how megavid grouped parameters
    before the groups were ordered for alignment (checkpoints written then carry no order)."""
    rank = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {g: sorted(names, key=rank.__getitem__) for g, names in order.items()}


# Elements per 16 bytes at 2 bytes per element: a parameter whose size is a multiple of this
# keeps the next one 16-byte aligned in a flat bf16/fp16 buffer (and in fp32: 8 x 4 bytes).
_ALIGN_ELEMENTS = 8


def _align_order(group: dict) -> None:
    """Reorder one group's parameters (and names, in step): sizes that are multiples of 8
    elements first, in model order, then the rest, largest first.

    DeepSpeed ZeRO 1/2 packs each group's parameters back to back into one flat buffer and
    makes every parameter a view into it. One odd-sized parameter early in a group (the
    1-element temperature, a 2-class head's bias) shifts every later one off 16-byte alignment,
    and cuBLAS then runs its GEMMs with slow fallback kernels: on an H200 the bf16 ZeRO-2 step
    of TimeSformer-B + BERT-B took 830 ms against 442 ms for the same model outside the engine
    (bench/model_step.py --impls bare,torch). With this order only the odd-sized tail (the
    largest of it, the MLM bias, still aligned) is off.
    """
    pairs = list(zip(group["params"], group["param_names"]))
    pairs.sort(key=lambda pn: (pn[0].numel() % _ALIGN_ELEMENTS != 0,
                               -pn[0].numel() if pn[0].numel() % _ALIGN_ELEMENTS else 0))
    group["params"] = [p for p, _ in pairs]
    group["param_names"] = [n for _, n in pairs]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, global_batch_size: int,
                    *, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`build_param_groups` (DeepSpeedCPUAdam when the optimizer is offloaded).

    Args:
        model: the model.
        optim_cfg: optimizer settings.
        global_batch_size: for LR scaling from ``optim.reference_batch_size``.
        cpu_adam: use DeepSpeed's CPU Adam (needed by ZeRO-Offload; JIT-builds a C++ op).
    """
    scale = get_lr_scale(optim_cfg, global_batch_size)
    if scale != 1.0:
        log.info("lr scaled by %.4g (global batch %d / reference %d)", scale, global_batch_size,
                 optim_cfg.reference_batch_size)
    groups = build_param_groups(model, optim_cfg, scale)
    # torch optimizers keep extra keys of a group; param_names is only for our logs/tests.
    torch_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(torch_groups, lr=optim_cfg.lr * scale, betas=optim_cfg.betas,
                                eps=optim_cfg.eps, adamw_mode=True)
    # foreach=False: the per-parameter loop gives bitwise-identical updates however the
    # parameters are grouped or partitioned, which the ZeRO-equivalence tests rely on.
    return torch.optim.AdamW(torch_groups, lr=optim_cfg.lr * scale, betas=optim_cfg.betas,
                             eps=optim_cfg.eps, foreach=False)


@dataclass
class LRSchedule:
    """LR multiplier at optimizer step ``s`` (0-based): warmup, then decay to ``min_ratio``.

    Warmup is linear from ``1/warmup`` (the first step is never wasted at lr 0) to 1 at step
    ``warmup - 1``. A plain object (not a lambda) so LambdaLR's state_dict can save it.
    """

    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.schedule == "linear":
            shape = 1.0 - progress
        else:
            raise ConfigError(f"optim.schedule={self.schedule!r} must be cosine, linear or constant")
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def get_warmup_steps(optim_cfg: OptimConfig, total_steps: int, steps_per_epoch: int = 0) -> int:
    """Warmup length in optimizer steps, from whichever of the three settings is given.

    The first one set wins: ``optim.warmup_steps`` as is, then
    ``round(warmup_epochs * steps_per_epoch)``, then ``round(warmup_ratio * total_steps)``;
    none set means no warmup.

    Args:
        optim_cfg: optimizer settings.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (loader length // grad accumulation);
            needed only with ``optim.warmup_epochs``.
    """
    if optim_cfg.warmup_steps < 0 or not 0.0 <= optim_cfg.warmup_ratio < 1.0 or optim_cfg.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_steps={optim_cfg.warmup_steps} and optim.warmup_epochs="
                          f"{optim_cfg.warmup_epochs} must be >= 0 and optim.warmup_ratio="
                          f"{optim_cfg.warmup_ratio} in [0, 1)")
    if optim_cfg.warmup_steps > 0:
        return optim_cfg.warmup_steps
    if optim_cfg.warmup_epochs > 0:
        if steps_per_epoch < 1:
            raise ConfigError("optim.warmup_epochs needs the epoch length, which this job does not know; "
                              "use optim.warmup_steps or optim.warmup_ratio")
        return int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    return int(round(optim_cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig,
                    total_steps: int, steps_per_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine/linear/constant decay over ``total_steps`` optimizer steps.

    Args:
        optimizer: the client optimizer (DeepSpeed steps the scheduler after each update).
        optim_cfg: optimizer settings.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (for ``optim.warmup_epochs``).
    """
    warmup = get_warmup_steps(optim_cfg, total_steps, steps_per_epoch)
    fn = LRSchedule(total_steps=total_steps, warmup_steps=warmup,
                    schedule=optim_cfg.schedule, min_ratio=optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
