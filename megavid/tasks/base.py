"""What every video-text task shares: model building (with weight import), loaders, moving a
batch to the device, the task protocol the engine's Trainer drives, and the one training
runner of the train jobs (:func:`train_task`).

Tasks override ``training_forward`` (and ``evaluate``) rather than copying the loop:
the loop itself lives in ``megavid.engine.trainer.Trainer``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megavid.config import Config
from megavid.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class VideoTextTask:
    """Base task for video-text jobs.

    Args:
        cfg: the resolved job config.
    """

    task_name = "base"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.rank = 0
        self.world_size = 1
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The text tokenizer of ``cfg.data.tokenizer`` (built once, from local files)."""
        if self._tokenizer is None:
            from megavid.data.text import build_tokenizer

            self._tokenizer = build_tokenizer(self.cfg.data.tokenizer)
        return self._tokenizer

    # -- engine protocol -----------------------------------------------------------------------
    def setup(
        self,
        device: torch.device,
        dtype: torch.dtype,
        rank: int,
        world_size: int,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.rank, self.world_size = rank, world_size
        self.gather = gather if world_size > 1 else None

    def build_model(self) -> nn.Module:
        from megavid.models import build_model

        model = build_model(self.cfg.model)
        load_initial_weights(model, self.cfg)
        return model

    def build_train_loader(self, rank: int, world_size: int):
        from megavid.data.build import build_loader

        data_cfg = dataclasses.replace(self.cfg.data, quarantine=get_quarantine(self.cfg))
        return build_loader(
            data_cfg, data_cfg.train, train=True, rank=rank,
            world_size=world_size, seed=self.cfg.run.seed,
        )

    def build_eval_loader(self, split: str, rank: int = 0, world_size: int = 1):
        """The loader of an evaluation split: every evaluation of every task comes from here.

        Clips have ``eval.num_frames`` frames (0: the training length): the TimeSformer resizes
        its time embedding to the clip at run time, so a 32-frame model evaluates 96-frame
        clips (TESTA's f32/f96) with its checkpoint unchanged.

        Args:
            split: 'train', 'val', 'test' (resolved through ``data.<split>``) or a shard spec.
            rank: this process's rank.
            world_size: number of ranks.
        """
        from megavid.data.build import build_loader

        data_cfg = self.cfg.data
        frames = get_eval_num_frames(self.cfg)
        if frames != data_cfg.num_frames:
            data_cfg = dataclasses.replace(data_cfg, num_frames=frames)
        return build_loader(
            data_cfg, split, train=False, rank=rank, world_size=world_size,
            seed=self.cfg.run.seed,
        )

    def batch_size(self, batch: dict[str, Any]) -> int:
        return int(batch["video"].shape[0])

    def tokens_per_sample(self, batch: dict[str, Any]) -> float:
        """Mean tokens per sample of ``batch``, for the engine's tokens/s.

        Video tokens = frames x patches per frame (``T * (H/p) * (W/p)`` of the clip as fed,
        ``p`` = model.video.patch_size); text tokens = the non-padding tokens
        (``attention_mask`` sum), averaged over the batch.

        Args:
            batch: a loader batch (see the shared contracts).
        """
        _, t, _, h, w = batch["video"].shape
        p = self.cfg.model.video.patch_size
        text = float(batch["attention_mask"].sum()) / max(int(batch["video"].shape[0]), 1)
        return float(t * (h // p) * (w // p)) + text

    def flops_per_sample(self, model: nn.Module) -> float:
        fn = getattr(model, "flops_per_sample", None)
        return float(fn(text_len=self.cfg.data.max_text_len)) if fn is not None else 0.0

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called by the engine after every optimizer step: EMA of the momentum encoders.

        Args:
            model: the trained module (unwrapped from the DeepSpeed engine).
        """
        update = getattr(getattr(model, "module", model), "momentum_update", None)
        if update is not None:
            update()

    # -- helpers -------------------------------------------------------------------------------
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Moves tensors to the device; the uint8 clip becomes a normalized float clip."""
        from megavid.data.transforms import normalize_clip

        out = dict(batch)
        out["video"] = normalize_clip(batch["video"], self.device, self.dtype)
        for k in ("input_ids", "attention_mask"):
            out[k] = batch[k].to(self.device, non_blocking=True)
        return out


def get_quarantine(cfg: Config) -> str:
    """The quarantine file of a training run's loader (``data.quarantine``, read by the DALI
    backend): the configured one, else ``<run_dir>/quarantine.json``, since DALI cannot skip
    a bad sample by itself and a resumed run must not feed it the ones it failed on again;
    '' (kept in memory) in debug runs, which write no files.

    Args:
        cfg: the resolved job config.
    """
    if cfg.data.quarantine or cfg.run.debug:
        return cfg.data.quarantine
    return str(cfg.run_dir / "quarantine.json")


def get_data_file(cfg: Config, value: str, name: str) -> Path:
    """A file a task's config names (labels, classes, benchmark files): absolute as given;
    relative, looked up under ``data.root`` first (released annotation trees live beside the
    shards, so configs name the files as they are released), then in the working directory.

    Args:
        cfg: the resolved config.
        value: the path as configured.
        name: the config key (for the error message).
    """
    p = Path(value)
    if p.is_absolute():
        return p
    for cand in (Path(cfg.data.root) / p, p):
        if cand.exists():
            return cand
    raise ConfigError(f"{name}={value!r} is neither under data.root={cfg.data.root!r} nor in the "
                      f"working directory; set data.root to the dataset folder or give {name} "
                      "an absolute path")


def check_data(cfg: Config, *splits: str) -> None:
    """Fails fast, before any process group or model is built, when shards are missing."""
    if cfg.data.name != "shards":
        return
    from megavid.data.table import get_split_spec
    from megavid.shards.format import list_shards

    for split in splits:
        list_shards(get_split_spec(cfg.data, split), cfg.data.root)


def get_eval_num_frames(cfg: Config) -> int:
    """Frames per clip of evaluation loaders: ``eval.num_frames``, or the training length.

    Args:
        cfg: the resolved job config.
    """
    return cfg.eval.num_frames or cfg.data.num_frames


def get_frame_counts(cfg: Config) -> dict[str, int]:
    """``{"train": T_train, "eval": T_eval}``: recorded in every results JSON, since the same
    checkpoint gives different numbers at different clip lengths.

    Args:
        cfg: the resolved job config.
    """
    return {"train": cfg.model.video.num_frames, "eval": get_eval_num_frames(cfg)}


# Task heads a finetuning run adds on top of a pretrained VideoLM: absent from pretraining
# checkpoints, so initialising from one leaves them at their fresh init (and says so).
NEW_HEAD_PREFIXES = ("qa_head.",)


def load_model_weights(model: nn.Module, path: str | Path, cfg: Config, *,
                       resize_time: bool = False, new_heads: tuple[str, ...] = ()) -> None:
    """Loads a megavid checkpoint or exported fp32 state dict into ``model`` (strict).

    The time embedding of a checkpoint trained at another clip length is either resized once
    here (``resize_time``: initialising a model that TRAINS at a new length, e.g. 4-frame
    pretraining -> 32-frame finetuning, as the imported-weights path does), or refused with
    the fix (evaluation): ``model.video.num_frames`` is the training length, recorded as such
    in results, and a different evaluation length is ``eval.num_frames``.

    A checkpoint written before megavid kept the BERT pooler lacks it: the model's pooler is
    kept (zero, or what ``model.text_weights`` imported), and that is logged.

    Args:
        model: the model built from ``cfg.model``.
        path: checkpoint folder, run directory or exported file.
        cfg: the resolved job config.
        resize_time: resize a time embedding of another length instead of raising.
        new_heads: key prefixes of task heads the checkpoint may lack (kept at their init);
            every other missing or unexpected key is an error.
    """
    from megavid.engine.checkpoint import load_model_state, load_state_strict
    from megavid.models.bert import POOLER_KEYS
    from megavid.models.timesformer import resize_time_embed

    state = load_model_state(path)
    frames = cfg.model.video.num_frames
    # the video tower and its momentum copy (video_encoder_m) each hold a time embedding
    for key in [k for k in state if k.endswith("time_embed")]:
        t = state[key]
        if t.ndim != 3 or t.shape[1] == frames:
            continue
        if not resize_time:
            raise CheckpointError(
                f"{path} was trained with {t.shape[1]}-frame clips but "
                f"model.video.num_frames={frames}; set model.video.num_frames={t.shape[1]} "
                f"(the training length) and eval.num_frames={frames} to evaluate "
                f"{frames}-frame clips"
            )
        log.info("%s: %s resized from %d to %d frames (model.video.num_frames)",
                 path, key, t.shape[1], frames)
        state = {**state, key: resize_time_embed(t, frames)}
    missing = [k for k in model.state_dict() if k not in state]
    fresh = [k for k in missing if k.startswith(new_heads)]
    pooler = [k for k in missing if k.endswith(tuple(f".{p}" for p in POOLER_KEYS))]
    if (fresh or pooler) and len(fresh) + len(pooler) == len(missing):
        if fresh:
            log.info("%s has no %s: initialised fresh for this task", path,
                     ", ".join(sorted({k.split(".")[0] for k in fresh})))
        if pooler:
            log.info("%s has no BERT pooler (written before megavid kept it): %s kept at their "
                     "current values", path, ", ".join(pooler))
        state = {**state, **{k: v for k, v in model.state_dict().items() if k in missing}}
    load_state_strict(model, state, path)  # another model size: one line, first keys named


def get_initial_weights(cfg: Config) -> dict[str, Path]:
    """The weights the model config imports, ``{"model.<key>": file or folder}`` in load
    order; Hugging Face names of the tower weights resolved through the Hugging Face cache
    (:func:`megavid.models.weights.resolve_weights`)."""
    from megavid.models.weights import resolve_weights

    mc = cfg.model
    out = {}
    if mc.weights:
        out["model.weights"] = Path(mc.weights).expanduser()
    if mc.text_weights:
        out["model.text_weights"] = resolve_weights(mc.text_weights, "model.text_weights")
    if mc.video_weights:
        out["model.video_weights"] = resolve_weights(mc.video_weights, "model.video_weights", timm_names=True)
    return out


def load_initial_weights(model: nn.Module, cfg: Config) -> None:
    """Imports the weights named in the model config (strict; a report of what was loaded)."""
    from megavid.models import weights as W

    for key, path in get_initial_weights(cfg).items():
        if key == "model.weights":
            blip = W.read_blip_alpro(path)
            if blip is not None:  # BLIP / ALPRO pretraining weights, converted to our keys
                W.load_blip_alpro_into(model, blip)  # logs its report
                log.info("%s has the BLIP/ALPRO layout: converted to megavid's keys", path)
            else:
                load_model_weights(model, path, cfg, resize_time=True, new_heads=NEW_HEAD_PREFIXES)
            log.info("loaded model weights from %s", path)
        elif key == "model.text_weights":
            W.load_bert_into(model.text_encoder, path)
        else:
            W.load_video_into(model.video_encoder, path, cfg.model.video)


@dataclass
class Trained:
    """What a training job has after :func:`train_task`.

    Attributes:
        task: the trained task (set up: device, rank, its config).
        summary: the trainer's summary (``Trainer.fit``).
        model: the trained model, unwrapped from the DeepSpeed engine.
    """

    task: VideoTextTask
    summary: dict
    model: nn.Module


def train_task(cfg: Config, task_cls: type[VideoTextTask], job: str, *, overwrite: bool = False,
               resume: str | None = None, task_args: dict[str, Any] | None = None) -> Trained:
    """The training of every train job: ``megavid <job>`` trains ``task_cls`` (its config
    records that task, :func:`megavid.tasks.registry.job_config`); the train shards are checked
    before any process group or model is built; the loop is the engine's one Trainer.

    Args:
        cfg: the resolved config.
        task_cls: the task the job trains.
        job: the subcommand (error messages).
        overwrite: start afresh in an existing run directory.
        resume: resume from this checkpoint.
        task_args: keyword arguments of the task's constructor besides the config.
    """
    from megavid.engine.trainer import Trainer
    from megavid.tasks.registry import job_config

    cfg = job_config(cfg, job, task_cls.task_name)
    check_data(cfg, cfg.data.train)
    task = task_cls(cfg, **(task_args or {}))
    trainer = Trainer(cfg, task, overwrite=overwrite, resume=resume)
    summary = trainer.fit()
    return Trained(task, summary, trainer.engine.module)
