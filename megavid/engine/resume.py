"""Resume that tells the truth: a resumed run compares its config with the checkpoint's, refuses
what cannot change, makes the rest take effect, and keeps a history of what changed.

The config a checkpoint was trained with is stored in its client state (``"config"``, see
``Trainer.client_state``); checkpoints written before that fall back to the ``config.yaml`` of
the run that wrote them, else the comparison is skipped (with a log line).

Every leaf key of :class:`megavid.config.Config` is in exactly one of three tables (a unit test
fails when a new key is added without a decision; :func:`classify` refuses unclassified keys):

``FIXED`` -- a resumed run refuses a change (CheckpointError, one line naming each key).

==================================================  ===========================================
keys                                                why
==================================================  ===========================================
run.seed                                            fixes the data order (loader permutations),
                                                    model init and every rank's RNG stream
model.name, model.video.* (all 13), model.text.*    parameter shapes / compute graph of the
(all 12), proj_dim, video_pool, text_pool,          checkpointed model (dropout and drop-path
queue_size, num_answers                             rates change every step's forward and RNG
                                                    draws; queue_size sizes buffers; num_answers
                                                    the QA head)
model.temperature                                   initial value of a learned parameter: the
                                                    checkpoint's value is used, so a change
                                                    cannot take effect
model.text_weights, video_weights, weights          initial weights: the checkpoint's weights
                                                    replace them, so a change cannot take effect
model.mask_token_id, pad/cls/sep_token_id,          the tokenizer the model was trained with
data.tokenizer, data.max_text_len                   (vocabulary ids, position embeddings)
data.num_frames, data.img_size                      tied to model.video.num_frames / img_size
data.name, shuffle, shuffle_block, drop_last,       the sample set, its per-epoch order and
resampled, image_ratio                              batch composition: the saved loader cursor
                                                    points into them
train.precision                                     master/working dtypes and loss scaling of
                                                    the optimizer state
train.offload_optimizer, train.offload_params       optimizer implementation and state layout
train.deepspeed_json                                arbitrary DeepSpeed settings megavid cannot
                                                    check against the checkpoint
task.name, task.cls.label_field, label_file,        the task and its heads / label space
classes, class_file, multilabel
==================================================  ===========================================

``CONDITIONAL`` -- may change under a rule; otherwise refused like ``FIXED``:

=========================================  ====================================================
keys                                       rule
=========================================  ====================================================
data.batch_size, train.grad_accum          the global batch (data.batch_size x train.grad_accum
                                           x world size) stays the same (the loader cursor
                                           counts samples, so micro batch vs accumulation may
                                           trade off)
train.zero_stage                           only when resuming a universal checkpoint (state
                                           mapped by name)
optim.backbone_lr                          stays > 0 or stays 0 (0 <-> > 0 adds or removes the
                                           backbone optimizer groups); a new value takes effect
                                           like optim.lr
model.vtc_weight, vtm_weight, mlm_weight,  stays > 0 or stays 0 (switching an objective or the
model.momentum                             momentum towers on/off changes the compute graph);
                                           a new value takes effect (read when the model is
                                           built)
=========================================  ====================================================

``MAY_CHANGE`` -- a change takes effect from the next step (one log line per key):

=================================================  ============================================
keys                                               how it takes effect
=================================================  ============================================
optim.lr, weight_decay, betas, eps,                after DeepSpeed restored the saved optimizer
backbone_lr (see above), schedule, warmup_steps,   and scheduler, :func:`apply_optim` sets every
warmup_ratio, warmup_epochs, min_lr_ratio,         param group's lr / weight_decay / betas / eps
reference_batch_size                               from this config (per-group rules of
                                                   ``build_param_groups``) and rebuilds the
                                                   schedule, fast-forwarded to the resumed step
train.max_steps, epochs, max_train_samples         total steps: the plan and the schedule
train.log_every, eval_every, ckpt_every,           read by the loop each step
keep_last, max_nonfinite, tensorboard, wandb,
max_eval_samples, grad_clip                        (grad_clip: the DeepSpeed config is built
                                                   from this config)
train.best_metric, best_mode                       the best so far was chosen by another rule:
                                                   best tracking restarts
model.attn_impl, kernel_impl, grad_checkpointing,  same parameters and math (another kernel,
grad_checkpointing_mode, compile                   activation recomputation, compiled code)
model.mlm_probability, distill_alpha, qa_weight    objective scalars read when the model is built
data.root, train, val, test, image_train,          data paths (the loader refuses a changed number
quarantine                                         of samples) and where bad samples are kept
data.backend, dali_device, dali_trim_gops,         loader settings that keep the sample set
num_workers, feed_workers, eval_batch_size,        (decoder, workers, failure limit, augmentation)
max_consecutive_failures, random_flip, crop_scale
data.synthetic.*                                   read by make-synthetic only
task.qa_pairs_per_sample                           read for every batch (seeded by run.seed, epoch
                                                   and sample)
task.cls.templates, probe_weight_decays,           read by evaluation and the other jobs
probe_max_iter, features_format; task.ego.*;
eval.*
run.name, output_dir, device, debug                where and how this process runs
=================================================  ============================================

The run folder keeps ``config.yaml`` as the config that is running now, and
``config_history.yaml``: a list whose first entry is the original config (``event: start``)
followed by one entry per resume (``step``, ``checkpoint``, ``changed: {key: {old, new}}``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from megavid.config import Config, to_dict
from megavid.errors import CheckpointError

log = logging.getLogger(__name__)

HISTORY_NAME = "config_history.yaml"

_MODEL_SHAPE = "model shape / compute graph of the checkpoint"
_TOKENIZER = "the tokenizer the model was trained with"
_DATA_ORDER = "the sample set and its order: the saved loader position points into it"
_HEADS = "the task and its heads / label space"

FIXED: dict[str, str] = {
    "run.seed": "fixes the data order and every RNG stream",
    "model.name": _MODEL_SHAPE,
    **{f"model.video.{k}": _MODEL_SHAPE for k in (
        "img_size", "patch_size", "num_frames", "in_chans", "embed_dim", "depth", "num_heads",
        "mlp_ratio", "qkv_bias", "attention_type", "drop_path_rate", "layer_norm_eps", "rgb_diff")},
    **{f"model.text.{k}": _MODEL_SHAPE for k in (
        "vocab_size", "hidden_size", "num_layers", "fusion_layers", "num_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout",
        "attention_dropout", "encoder_width")},
    "model.proj_dim": _MODEL_SHAPE,
    "model.video_pool": _MODEL_SHAPE,
    "model.text_pool": _MODEL_SHAPE,
    "model.queue_size": _MODEL_SHAPE,
    "model.num_answers": "the QA head's size",
    "model.temperature": "initial value of a learned parameter: the checkpoint's value is used",
    "model.text_weights": "initial weights: the checkpoint's weights replace them",
    "model.video_weights": "initial weights: the checkpoint's weights replace them",
    "model.weights": "initial weights: the checkpoint's weights replace them",
    "model.mask_token_id": _TOKENIZER,
    "model.pad_token_id": _TOKENIZER,
    "model.cls_token_id": _TOKENIZER,
    "model.sep_token_id": _TOKENIZER,
    "data.tokenizer": _TOKENIZER,
    "data.max_text_len": _TOKENIZER,
    "data.num_frames": "tied to model.video.num_frames",
    "data.img_size": "tied to model.video.img_size",
    "data.name": _DATA_ORDER,
    "data.shuffle": _DATA_ORDER,
    "data.shuffle_block": _DATA_ORDER,
    "data.drop_last": _DATA_ORDER,
    "data.resampled": _DATA_ORDER,
    "data.image_ratio": "the composition of every batch: the saved loader positions depend on it",
    "train.precision": "the dtypes and loss scaling of the optimizer state",
    "train.offload_optimizer": "the optimizer implementation and its state layout",
    "train.offload_params": "the optimizer implementation and its state layout",
    "train.deepspeed_json": "DeepSpeed settings megavid cannot check against the checkpoint",
    "task.name": _HEADS,
    **{f"task.cls.{k}": _HEADS for k in ("label_field", "label_file", "classes", "class_file", "multilabel")},
}

CONDITIONAL: dict[str, str] = {
    "data.batch_size": "only with the same global batch (data.batch_size x train.grad_accum x world size)",
    "train.grad_accum": "only with the same global batch (data.batch_size x train.grad_accum x world size)",
    "train.zero_stage": "only when resuming a universal checkpoint (convert_to_universal)",
    "optim.backbone_lr": "only if it stays > 0 or stays 0 (0 <-> > 0 adds/removes the backbone optimizer groups)",
    "model.vtc_weight": "only if it stays > 0 or stays 0 (switching the objective changes the compute graph)",
    "model.vtm_weight": "only if it stays > 0 or stays 0 (switching the objective changes the compute graph)",
    "model.mlm_weight": "only if it stays > 0 or stays 0 (switching the objective changes the compute graph)",
    "model.momentum": "only if it stays > 0 or stays 0 (0 <-> > 0 adds/removes the momentum towers)",
}

_OPTIM = "optimizer param groups and the rebuilt schedule"
MAY_CHANGE: dict[str, str] = {
    **{f"optim.{k}": _OPTIM for k in (
        "lr", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio", "warmup_epochs",
        "min_lr_ratio", "reference_batch_size")},
    "train.max_steps": "total steps (plan and schedule)",
    "train.epochs": "total steps (plan and schedule)",
    "train.max_train_samples": "total steps (plan and schedule)",
    **{f"train.{k}": "read by the training loop" for k in (
        "log_every", "eval_every", "ckpt_every", "keep_last", "max_nonfinite", "tensorboard", "wandb",
        "max_eval_samples")},
    "train.grad_clip": "the DeepSpeed config is built from this config",
    "train.best_metric": "best-checkpoint tracking restarts",
    "train.best_mode": "best-checkpoint tracking restarts",
    "model.attn_impl": "same parameters and math",
    "model.kernel_impl": "same parameters and math",
    "model.grad_checkpointing": "same parameters and math",
    "model.grad_checkpointing_mode": "same parameters and math (what backward recomputes)",
    "model.compile": "same parameters and math (compiled code; ZeRO-3 refused either way)",
    "model.mlm_probability": "read when the model is built",
    "model.distill_alpha": "read when the model is built",
    "model.qa_weight": "read when the model is built",
    **{f"data.{k}": "data path (the loader refuses a changed number of samples)" for k in (
        "root", "train", "val", "test", "image_train")},
    **{f"data.{k}": "read when the loader is built" for k in (
        "quarantine", "backend", "dali_device", "dali_trim_gops", "num_workers", "feed_workers",
        "eval_batch_size",
        "max_consecutive_failures", "random_flip", "crop_scale")},
    **{f"data.synthetic.{k}": "read by make-synthetic only" for k in (
        "num_train", "num_val", "num_test", "frames", "size", "fps", "codec", "seed")},
    "task.qa_pairs_per_sample": "read for every batch",
    **{f"task.cls.{k}": "read by evaluation and the other jobs" for k in (
        "templates", "probe_weight_decays", "probe_max_iter", "features_format")},
    **{f"task.ego.{k}": "read by evaluation and the other jobs" for k in (
        "relevancy", "relevancy_texts", "relevancy_videos", "egomcq")},
    **{f"eval.{k}": "read by evaluation" for k in (
        "split", "k_test", "low_resource", "chunk_size", "num_frames", "checkpoint", "temporal_check",
        "captions")},
    "run.name": "where this run writes",
    "run.output_dir": "where this run writes",
    "run.device": "the engine is built on it",
    "run.debug": "read at start",
}

_ON_OFF = ("optim.backbone_lr", "model.vtc_weight", "model.vtm_weight", "model.mlm_weight", "model.momentum")
_BATCH = ("data.batch_size", "train.grad_accum")
_FIX = "set them back to the checkpoint's values to resume, or start a new run with --overwrite or another run.name"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted names of every leaf setting of a config dataclass (``model.video.depth`` ...)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def classify(key: str) -> str:
    """'fixed', 'conditional' or 'may_change'; an unclassified key counts as fixed (safe)."""
    if key in MAY_CHANGE:
        return "may_change"
    if key in CONDITIONAL:
        return "conditional"
    return "fixed"


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


# --------------------------------------------------------------------------------------------
# The checkpoint's config
# --------------------------------------------------------------------------------------------
def read_saved_state(ckpt_dir: Path, tag: str, rank: int = 0) -> dict | None:
    """megavid's client state of a checkpoint, read without an engine (None when not found).

    From ``rng_rank<R>.pt`` (this rank's, else rank 0's: written by every megavid checkpoint and
    copied into universal ones), else DeepSpeed's model-states file (``state["megavid"]``).
    Files are read with ``checkpoint.safe_load`` (no code from the file runs).

    Raises:
        CheckpointError: a file is unreadable or holds more than tensors and plain data.
    """
    from megavid.engine.checkpoint import safe_load

    folder = Path(ckpt_dir) / tag
    for name in dict.fromkeys((f"rng_rank{rank}.pt", "rng_rank0.pt")):
        path = folder / name
        if path.is_file():
            saved = safe_load(path)
            if isinstance(saved, dict) and isinstance(saved.get("client_state"), dict):
                return saved["client_state"]
    for path in sorted(folder.glob("*model_states.pt")):
        saved = safe_load(path, mmap=True)
        if isinstance(saved, dict) and isinstance(saved.get("megavid"), dict):
            return saved["megavid"]
    return None


def read_saved_config(ckpt_dir: Path, tag: str, state: dict | None) -> tuple[dict | None, str]:
    """(the config a checkpoint was trained with as a nested dict, where it came from).

    The client state's ``config``; for checkpoints written before megavid stored it, the
    ``config.yaml`` of the run that wrote the checkpoint (``<run>/checkpoints/<tag>``); else
    (None, reason).
    """
    if state is not None and isinstance(state.get("config"), dict):
        return state["config"], "checkpoint"
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name == "checkpoints":
        path = ckpt_dir.parent / "config.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                return None, f"its run's {path} cannot be parsed ({e})"
            if isinstance(data, dict):
                return data, str(path)
            return None, f"its run's {path} holds no mapping"
        return None, f"the checkpoint stores no config and {path} does not exist"
    return None, "the checkpoint stores no config and is not inside a run's checkpoints folder"


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
@dataclass
class ResumePlan:
    """What a resume compared: the checkpoint's config (nested, or None when unknown) and the
    changes that take effect (key -> (old, new))."""

    where: str
    saved: dict | None
    source: str
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def log_changes(self, step: int) -> None:
        """One line per changed key that takes effect (rank 0 also shows them on stderr)."""
        if self.saved is None:
            log.warning("resume: not comparing the config with checkpoint %s: %s", self.where, self.source)
            return
        for key, (old, new) in self.changes.items():
            log.info("resume: %s %s -> %s takes effect from step %d", key, _fmt(old), _fmt(new), step + 1,
                     extra={"console": True})
        if self.skipped:
            log.info("resume: keys not in both configs (not compared): %s", ", ".join(self.skipped))


def compare(saved: dict, cfg: Config, *, world_size: int, universal: bool,
            saved_world_size: int | None = None) -> tuple[dict[str, tuple[Any, Any]], list[str], list[str]]:
    """Compare the checkpoint's config with this run's.

    Args:
        saved: the checkpoint's config (nested, as ``to_dict`` writes it).
        cfg: this run's config.
        world_size: ranks of this run.
        universal: resuming a universal checkpoint.
        saved_world_size: ranks of the run that wrote the checkpoint (None: assume the same).

    Returns:
        (changes that take effect: key -> (old, new), refusals: one phrase per refused key,
        keys present in only one of the two configs).
    """
    old, new = flatten(saved), flatten(to_dict(cfg))
    skipped = sorted(set(old) ^ set(new))
    changed = [k for k in new if k in old and old[k] != new[k]]
    ok: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []

    def refuse(key: str, why: str) -> None:
        refused.append(f"{key} {_fmt(old[key])} -> {_fmt(new[key])} ({why})")

    from megavid.engine.deepspeed_setup import BatchPlan

    old_gb = BatchPlan(int(old.get("data.batch_size", 0)), int(old.get("train.grad_accum", 0)),
                       saved_world_size or world_size).global_batch
    new_gb = BatchPlan.from_config(cfg, world_size).global_batch
    for key in changed:
        kind = classify(key)
        if kind == "may_change":
            ok[key] = (old[key], new[key])
        elif key in _BATCH:
            if old_gb == new_gb:
                ok[key] = (old[key], new[key])
            else:
                refuse(key, f"global batch {old_gb} -> {new_gb}, data.batch_size x train.grad_accum x "
                            "world size; set train.grad_accum so they match")
        elif key == "train.zero_stage":
            if universal:
                ok[key] = (old[key], new[key])
            else:
                refuse(key, CONDITIONAL[key])
        elif key in _ON_OFF:
            if (_num(old[key]) > 0) == (_num(new[key]) > 0):
                ok[key] = (old[key], new[key])
            else:
                refuse(key, CONDITIONAL[key])
        else:
            refuse(key, FIXED.get(key, "not classified for resume: refused to be safe"))
    return ok, refused, skipped


def check_resume_config(cfg: Config, ckpt_dir: Path, tag: str, *, world_size: int, universal: bool,
                        rank: int = 0) -> ResumePlan:
    """Before DeepSpeed loads anything: compare this run's config with the checkpoint's.

    Raises:
        CheckpointError: one line naming every setting that cannot change (old -> new, why) and
            the fix.
    """
    where = str(Path(ckpt_dir) / tag)
    state = read_saved_state(ckpt_dir, tag, rank)
    saved, source = read_saved_config(ckpt_dir, tag, state)
    plan = ResumePlan(where=where, saved=None, source=source)
    if saved is None:
        return plan
    saved_ws = state.get("world_size") if state is not None else None
    ok, refused, skipped = compare(saved, cfg, world_size=world_size, universal=universal,
                                   saved_world_size=saved_ws)
    if refused:
        raise CheckpointError(
            f"cannot resume from {where}: settings that cannot change in a resumed run differ from the "
            f"checkpoint's: {'; '.join(refused)}. Fix: {_FIX}")
    plan.saved, plan.changes, plan.skipped = saved, ok, skipped
    return plan


# --------------------------------------------------------------------------------------------
# Making changes take effect
# --------------------------------------------------------------------------------------------
def group_hparams(group_name: str, cfg: Config, global_batch: int) -> dict[str, Any]:
    """lr / weight_decay / betas / eps of an optimizer group named by ``build_param_groups``
    (``{backbone|new}_{decay|no_decay}``) under ``cfg``."""
    from megavid.engine.optim import get_lr_scale

    o = cfg.optim
    if group_name not in ("new_decay", "new_no_decay", "backbone_decay", "backbone_no_decay"):
        raise CheckpointError(f"optimizer group {group_name!r} is not one megavid builds; the checkpoint "
                              "was not written by this megavid")
    backbone = group_name.startswith("backbone_")
    scale = get_lr_scale(o, global_batch)
    return {"lr": (o.backbone_lr if backbone else o.lr) * scale,
            "weight_decay": 0.0 if group_name.endswith("_no_decay") else o.weight_decay,
            "betas": tuple(o.betas), "eps": o.eps}


def apply_optim(scheduler: Any, cfg: Config, *, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
    """After DeepSpeed restored the saved optimizer and scheduler: set every param group's
    hyperparameters from ``cfg`` and rebuild the schedule from ``cfg`` (``build_scheduler``)
    fast-forwarded to the restored scheduler's step, so the next steps use exactly what a fresh
    run with these settings would at those steps. With an unchanged config this changes nothing.

    Args:
        scheduler: the engine's LambdaLR (its optimizer holds the groups the update uses).
        cfg: this run's config.
        total_steps: optimizer steps of this run (the plan).
        steps_per_epoch: for ``optim.warmup_epochs``.
        global_batch: data.batch_size x train.grad_accum x world size (``reference_batch_size``).
    """
    from megavid.engine.optim import build_scheduler

    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise CheckpointError(f"cannot apply optim.* on resume: the scheduler is a {type(scheduler).__name__}")
    groups = scheduler.optimizer.param_groups
    base = []
    for g in groups:
        h = group_hparams(g.get("name", ""), cfg, global_batch)
        g["weight_decay"], g["betas"], g["eps"] = h["weight_decay"], h["betas"], h["eps"]
        g["initial_lr"] = h["lr"]
        base.append(h["lr"])
    # a fresh schedule with these settings (same code path as a new run), on stand-in groups
    dummy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base])
    fresh = build_scheduler(dummy, cfg.optim, total_steps, steps_per_epoch)
    step = scheduler.last_epoch  # optimizer steps the schedule has taken (restored)
    scheduler.lr_lambdas = list(fresh.lr_lambdas)
    scheduler.base_lrs = list(base)
    lrs = [b * fn(step) for b, fn in zip(base, scheduler.lr_lambdas)]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = list(lrs)
    if not all(math.isfinite(x) for x in lrs):
        raise CheckpointError(f"the rebuilt schedule gives lr {lrs} at step {step}; check optim.*")


def resumed_best(best: dict, plan: ResumePlan, cfg: Config) -> dict:
    """The saved best-checkpoint record, or {} when train.best_metric / best_mode changed (the
    best so far was chosen by another rule)."""
    if best and any(k in plan.changes for k in ("train.best_metric", "train.best_mode")):
        log.info("resume: best-checkpoint tracking restarts (train.best_metric=%r, best_mode=%s)",
                 cfg.train.best_metric, cfg.train.best_mode, extra={"console": True})
        return {}
    return best


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def read_history(run_dir: Path) -> list[dict]:
    """The entries of ``<run_dir>/config_history.yaml`` ([] when missing or unreadable)."""
    path = Path(run_dir) / HISTORY_NAME
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        log.warning("%s cannot be parsed (%s): starting a new history", path, e)
        return []
    return data if isinstance(data, list) else []


def record_history(run_dir: Path, cfg: Config, plan: ResumePlan | None, step: int) -> None:
    """Write ``config_history.yaml`` (rank 0, not in debug mode).

    A new run (``plan`` None) starts the history with its config; a resume appends its step,
    checkpoint and changed keys (the history starts with the checkpoint's config when the run
    folder has none yet).
    """
    run_dir = Path(run_dir)
    if plan is None:
        entries = [{"event": "start", "step": 0, "config": _plain(to_dict(cfg))}]
    else:
        entries = read_history(run_dir)
        if not entries:
            start: dict[str, Any] = {"event": "start", "step": 0,
                                     "config": _plain(plan.saved) if plan.saved is not None else None}
            if plan.saved is None:
                start["note"] = f"the original config is unknown: {plan.source}"
            entries = [start]
        entry: dict[str, Any] = {"event": "resume", "step": int(step), "checkpoint": plan.where}
        if plan.saved is None:
            entry["changed"] = None
            entry["note"] = f"not compared: {plan.source}"
        else:
            entry["changed"] = {k: {"old": _plain(o), "new": _plain(n)} for k, (o, n) in plan.changes.items()}
        entries.append(entry)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / HISTORY_NAME
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(entries, sort_keys=False))
    os.replace(tmp, path)
