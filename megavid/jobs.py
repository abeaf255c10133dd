"""The jobs of the ``megavid`` program and what their ``--help`` says.

One table, :data:`CONFIG_JOBS` and :data:`TOOL_JOBS`: each job's runner, its section and
one-line summary in ``megavid --help`` and, for a config job, what it does, reads and writes,
the config keys it needs (shown with their defaults, read from :class:`megavid.config.Config`),
the files of ``configs/`` it uses (listed as found there when the help is printed), an example
and the run switches its runner takes. :mod:`megavid.cli` builds the parsers from it.
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

from megavid.config import CONFIG_DIR, GROUPS, Config, to_dict

WIDTH = 90
"""Column at which help text is wrapped."""


@dataclass(frozen=True)
class Job:
    """One ``megavid`` subcommand: what runs it and what its help says.

    Attributes:
        target: ``"module:function"``; config jobs are called as ``fn(cfg, **switches)``, tools
            as ``fn(argv)``.
        section: the heading it is listed under in ``megavid --help``.
        summary: one line in ``megavid --help``, in user words.
        about: config jobs: what the job does (the first paragraph of its ``--help``).
        reads: config jobs: the files it reads.
        writes: config jobs: the files it writes.
        keys: config jobs: the config keys a user sets for it -> what they mean to this job.
            A job with ``run.name`` writes into a run directory and is offered ``--name``.
        configs: config jobs: ``<folder>/<glob>`` patterns of the files in ``configs/`` it uses,
            listed in its help as they are found there.
        example: config jobs: one command line.
        switches: config jobs: the runner's keyword arguments (``overwrite``, ``resume``) ->
            their help; exactly the parameters of the runner besides ``cfg``.
    """

    target: str
    section: str
    summary: str
    about: str = ""
    reads: str = ""
    writes: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    configs: tuple[str, ...] = ()
    example: str = ""
    switches: dict[str, str] = field(default_factory=dict)


SECTIONS = ("data", "train", "evaluate", "tools")
"""The headings of ``megavid --help``, in order."""

_RUN_DIR = "<run.output_dir>/<run.name>/"
_TRAIN_WRITES = f"{_RUN_DIR}: config.yaml, checkpoints/, logs/, metrics.jsonl and tb/"
_TRAIN_SWITCHES = {
    "overwrite": "start afresh in an existing run directory (its checkpoints, logs and metrics "
                 "are deleted first)",
    "resume": "resume from this checkpoint (a run directory or step_<N> folder) instead of the "
              "run's latest",
}
_EVAL_SWITCHES = {
    "overwrite": "replace an existing results file (without it the job stops before evaluating)",
    "resume": "evaluate this checkpoint or exported file instead of eval.checkpoint or the run's "
              "newest",
}
_CACHED_EVAL_SWITCHES = {
    **_EVAL_SWITCHES,
    "overwrite": "replace an existing results file and re-extract the cached features",
}
_TRAIN_KEYS = {
    "run.name": "the run directory <run.output_dir>/<run.name> (--name sets it)",
    "train.max_steps": "optimizer steps (0: train.epochs epochs)",
    "data.batch_size": "clips per rank per micro batch",
    "optim.lr": "peak learning rate",
    "train.eval_every": "evaluate on data.val every N steps (0: never)",
    "train.ckpt_every": "checkpoint every N steps (0: only at the end)",
    "train.tensorboard": "also write TensorBoard events under <run_dir>/tb",
    "train.wandb": "also log to Weights & Biases (pip install wandb)",
}
_EVAL_WEIGHTS_KEYS = {
    "run.name": "the run whose newest checkpoint is evaluated, and where results go "
                "(--name sets it)",
    "eval.checkpoint": "the checkpoint or exported file to evaluate instead",
    "model.weights": "weights to evaluate in a run folder without a checkpoint: a megavid export (model_fp32.pt) or a BLIP/ALPRO checkpoint",
}
_EVAL_READS = ("the shards of eval.split, and the weights: --resume or eval.checkpoint, else the "
               "run's newest checkpoint, else model.weights (or the tower weights "
               "model.text_weights / model.video_weights)")
_CLS_LABEL_KEYS = {
    "task.cls.label_field": "sample JSON field holding the label ('label', 'labels' or a dotted "
                            "path such as attributes.colour)",
    "task.cls.classes": "class names in label order (else task.cls.class_file, else the sorted "
                        "train labels)",
    "task.cls.class_file": "a file with one class name per line",
}

CONFIG_JOBS: dict[str, Job] = {
    "make-synthetic": Job(
        "megavid.shards.synthetic:run_make_synthetic", "data",
        "generate the moving-shapes demo dataset: videos, captions, shards",
        about="Generate the deterministic moving-shapes dataset: short clips of a coloured "
              "shape moving left, right, up or down, with captions and question-answer pairs, "
              "written as videos and as train, val and test shards. The same settings give the "
              "same bytes, and a second run with them does nothing.",
        reads="nothing: every clip is drawn from data.synthetic.seed",
        writes="<data.root>/raw/ (the videos and one JSONL per split), "
               "<data.root>/shards/{train,val,test}/ and <data.root>/manifest.json",
        keys={
            "data.root": "the folder the dataset is written to",
            "data.synthetic.num_train": "clips in the train split",
            "data.synthetic.num_val": "clips in the val split",
            "data.synthetic.num_test": "clips in the test split (a multiple of 4, at most 320)",
            "data.synthetic.frames": "frames per clip",
            "data.synthetic.size": "frame width and height in pixels",
            "data.synthetic.codec": "vp9 (WebM) or h264 (MP4)",
            "data.synthetic.seed": "seed of every clip's attributes",
        },
        configs=("experiment/*", "data/*"),
        example="megavid make-synthetic experiment=demo",
        switches={"overwrite": "regenerate even when data.root already holds this dataset, "
                               "and replace a different one"},
    ),
    "pretrain": Job(
        "megavid.tasks.pretrain:run_pretrain", "train",
        "pretrain the video and text towers on video-caption pairs",
        about="Train the video tower (TimeSformer) and the text tower (BERT, whose last layers "
              "attend to the video) together on video-caption pairs with DeepSpeed, on one or "
              "many GPUs or on the CPU. The losses are video-text contrast (VTC), video-text "
              "matching (VTM) and masked language modelling (MLM). A run directory that holds "
              "checkpoints is resumed from its latest.",
        reads="the train and val shards (data.train, data.val under data.root), and the "
              "weights to start from, if any (model.weights, model.text_weights, "
              "model.video_weights)",
        writes=_TRAIN_WRITES,
        keys={
            "data.root": "the dataset folder: split names are <data.root>/shards/<split>",
            "data.train": "train shards: a split name, a folder or a glob",
            "data.val": "validation shards, evaluated every train.eval_every steps",
            "model.vtc_weight": "weight of the contrastive loss (0: off)",
            "model.vtm_weight": "weight of the matching loss (0: off)",
            "model.mlm_weight": "weight of the masked language modelling loss (0: off)",
            "model.text_weights": "BERT weights for the text tower (a folder, a file or a "
                                  "Hugging Face name)",
            "model.video_weights": "ViT or TimeSformer weights for the video tower",
            **_TRAIN_KEYS,
        },
        configs=("experiment/*", "model/*", "data/*", "pretrain/*"),
        example="megavid pretrain experiment=demo train.max_steps=100",
        switches=_TRAIN_SWITCHES,
    ),
    "finetune-retrieval": Job(
        "megavid.tasks.retrieval:run_finetune_retrieval", "train",
        "finetune a model for text-to-video retrieval",
        about="Finetune a pretrained model for text-to-video retrieval with the pretraining "
              "losses (task.name=retrieval). Its evaluation on data.val, every "
              "train.eval_every steps, ranks videos by contrastive similarity and, with "
              "model.vtm_weight > 0, re-ranks each query's top eval.k_test candidates with the "
              "matching head.",
        reads="the train and val shards (data.train, data.val under data.root), and the "
              "pretrained weights (model.weights)",
        writes=_TRAIN_WRITES,
        keys={
            "model.weights": "the pretrained model to start from (an exported model_fp32.pt)",
            "data.root": "the dataset folder: split names are <data.root>/shards/<split>",
            "data.train": "train shards: a split name, a folder or a glob",
            "data.val": "validation shards, evaluated every train.eval_every steps",
            "model.vtm_weight": "weight of the matching loss; above 0 evaluation re-ranks with "
                                "the matching head",
            "eval.k_test": "candidates re-ranked per query (0: contrastive similarity only)",
            **_TRAIN_KEYS,
        },
        configs=("model/*", "retrieval/*"),
        example="megavid finetune-retrieval model=timesformer_base retrieval=msrvtt "
                "model.weights=runs/pre/model_fp32.pt",
        switches=_TRAIN_SWITCHES,
    ),
    "finetune-qa": Job(
        "megavid.tasks.qa:run_finetune_qa", "train",
        "finetune for open-ended video question answering",
        about="Finetune a model for open-ended video question answering, as classification "
              "over the model.num_answers most frequent answers of the train split, then test "
              "it on eval.split: accuracy per question type beside the majority-answer "
              "baseline.",
        reads="the train and val shards with their question-answer pairs (data.train, "
              "data.val), the shards of eval.split, and the weights to start from "
              "(model.weights)",
        writes=f"{_TRAIN_WRITES}, answers.json, eval/qa_<split>.json and "
               "eval/qa_<split>_predictions.jsonl",
        keys={
            "model.num_answers": "size of the answer vocabulary (required: e.g. 1000, or 17 for "
                                 "the synthetic data)",
            "model.weights": "the pretrained model to start from (an exported model_fp32.pt)",
            "data.root": "the dataset folder: split names are <data.root>/shards/<split>",
            "data.train": "train shards: a split name, a folder or a glob",
            "data.val": "validation shards, evaluated every train.eval_every steps",
            "eval.split": "the split tested after training",
            "task.qa_pairs_per_sample": "questions trained per visit of a video (0: all)",
            **_TRAIN_KEYS,
        },
        configs=("experiment/*", "model/*", "data/*", "task/qa"),
        example="megavid finetune-qa experiment=demo task=qa model.num_answers=17 "
                "model.weights=runs/demo/model_fp32.pt --name demo_qa",
        switches=_TRAIN_SWITCHES,
    ),
    "finetune-cls": Job(
        "megavid.tasks.classification:run_finetune_cls", "train",
        "finetune a video classifier (top-1/top-5 accuracy or mAP)",
        about="Finetune a video classifier on labelled shards (task.name=classification), then "
              "test the final checkpoint on eval.split: top-1 and top-5 accuracy, or mAP for "
              "multi-label classes.",
        reads="the train and val shards (data.train, data.val), the shards of eval.split, the "
              "label and class files named by task.cls, and the weights to start from "
              "(model.weights)",
        writes=f"{_TRAIN_WRITES}, eval/cls_<split>.json and eval/cls_<split>_scores.pt",
        keys={
            **_CLS_LABEL_KEYS,
            "task.cls.label_file": "labels from a CSV instead of the shards",
            "task.cls.multilabel": "multi-label (mAP) instead of single-label (top-1, top-5)",
            "model.weights": "the pretrained model to start from (an exported model_fp32.pt)",
            "data.root": "the dataset folder: split names are <data.root>/shards/<split>",
            "data.train": "train shards: a split name, a folder or a glob",
            "data.val": "validation shards, evaluated every train.eval_every steps",
            "eval.split": "the split tested after training",
            **_TRAIN_KEYS,
        },
        configs=("experiment/*", "model/*", "data/*", "task/finetune_cls", "task/cls_*"),
        example="megavid finetune-cls experiment=demo task=cls_synthetic_colour "
                "model.weights=runs/demo/model_fp32.pt --name demo_colour",
        switches=_TRAIN_SWITCHES,
    ),
    "eval-zeroshot": Job(
        "megavid.tasks.zeroshot:run_eval_zeroshot", "evaluate",
        "evaluate text-video retrieval of a model as it is, with no training",
        about="Evaluate text-to-video and video-to-text retrieval (R@1/5/10, median and mean "
              "rank, beside chance) of a model as it is, with no training: a run's checkpoint, "
              "an exported file or imported weights. Shards whose question-answer pairs "
              "have answer choices also get zero-shot multiple-choice QA.",
        reads=_EVAL_READS,
        writes=f"{_RUN_DIR}eval/zeroshot_<split>_step<N>.json",
        keys={
            **_EVAL_WEIGHTS_KEYS,
            "eval.split": "the split evaluated: train, val, test (data.<split>) or a shard folder",
            "data.root": "the dataset folder: split names are <data.root>/shards/<split>",
            "eval.captions": "the text queries: each video's first caption, all of them, or "
                             "all joined into a paragraph",
            "eval.k_test": "candidates re-ranked per query by the matching head (when "
                           "model.vtm_weight > 0)",
            "eval.num_frames": "frames per clip (0: the training length)",
            "eval.low_resource": "score in blocks on the CPU, for long clips",
        },
        configs=("experiment/*", "model/*", "data/*", "retrieval/*"),
        example="megavid eval-zeroshot experiment=demo eval.split=test",
        switches=_EVAL_SWITCHES,
    ),
    "eval-zeroshot-cls": Job(
        "megavid.tasks.zeroshot_cls:run_eval_zeroshot_cls", "evaluate",
        "classify videos by class-name prompts, with no training",
        about="Classify the clips of eval.split by the similarity of their video feature to "
              "prompts built from the class names (task.cls.templates), with no training: "
              "top-1 and top-5 accuracy, or mAP, beside chance.",
        reads=f"{_EVAL_READS}; the class and label files named by task.cls",
        writes=f"{_RUN_DIR}eval/zeroshot_cls_<split>_step<N>.json and its _scores.pt",
        keys={
            **_CLS_LABEL_KEYS,
            "task.cls.templates": "prompt templates with one {} for the class name",
            **_EVAL_WEIGHTS_KEYS,
            "eval.checkpoint": "the checkpoint or exported file to evaluate instead (random: a "
                               "random-init baseline)",
            "eval.split": "the split evaluated: train, val, test (data.<split>) or a shard folder",
        },
        configs=("experiment/*", "model/*", "data/*", "task/cls_*"),
        example="megavid eval-zeroshot-cls experiment=demo task=cls_synthetic_direction",
        switches=_EVAL_SWITCHES,
    ),
    "linear-probe": Job(
        "megavid.tasks.linear_probe:run_linear_probe", "evaluate",
        "fit a linear classifier on frozen video features (an L2 sweep)",
        about="Measure how much a frozen video encoder knows: fit a linear classifier on its "
              "features of data.train for each weight decay of task.cls.probe_weight_decays, "
              "keep the best on data.val, and report it on eval.split. The features are "
              "cached.",
        reads=f"{_EVAL_READS}; the train and val shards too",
        writes=f"{_RUN_DIR}eval/linear_probe_<split>_step<N>.json and its _scores.pt, and "
               "features/<split>/ of each split (the cache)",
        keys={
            **_CLS_LABEL_KEYS,
            "task.cls.probe_weight_decays": "the L2 sweep",
            "task.cls.probe_max_iter": "L-BFGS iterations per fit",
            "data.train": "the split the probe is fitted on",
            "data.val": "the split the weight decay is chosen on",
            "eval.split": "the held-out split reported",
            **_EVAL_WEIGHTS_KEYS,
            "eval.checkpoint": "the checkpoint or exported file to probe instead (random: a "
                               "random-init baseline)",
        },
        configs=("experiment/*", "model/*", "data/*", "task/linear_probe", "task/cls_*"),
        example="megavid linear-probe experiment=demo task=cls_synthetic_colour",
        switches=_CACHED_EVAL_SWITCHES,
    ),
    "extract-features": Job(
        "megavid.tasks.features:run_extract_features", "evaluate",
        "save the video and text features of a split to files",
        about="Encode every clip and caption of eval.split and save the features, one file per "
              "video plus an index, for use outside megavid. A matching earlier extraction is "
              "reused.",
        reads=_EVAL_READS,
        writes=f"{_RUN_DIR}features/<split>/: one .pt or .npy file per video and index.jsonl",
        keys={
            **_EVAL_WEIGHTS_KEYS,
            "eval.checkpoint": "the checkpoint or exported file to use instead (random: a "
                               "random-init model)",
            "eval.split": "the split encoded: train, val, test (data.<split>) or a shard folder",
            "task.cls.features_format": "pt or npy",
        },
        configs=("experiment/*", "model/*", "data/*"),
        example="megavid extract-features experiment=demo eval.split=val "
                "task.cls.features_format=npy",
        switches={
            "overwrite": "re-extract even when a matching extraction exists",
            "resume": _EVAL_SWITCHES["resume"],
        },
    ),
    "eval-egocentric": Job(
        "megavid.tasks.egocentric:run_eval_egocentric", "evaluate",
        "evaluate EK-100 multi-instance retrieval and EgoMCQ",
        about="Evaluate egocentric benchmarks from their released files: Epic-Kitchens-100 "
              "multi-instance retrieval (mAP and nDCG against the relevancy matrix) and/or "
              "EgoMCQ (inter- and intra-video accuracy). The features of eval.split are cached.",
        reads=f"{_EVAL_READS}; the benchmark files named by task.ego (relative paths under "
              "data.root first)",
        writes=f"{_RUN_DIR}eval/egocentric_<split>_step<N>.json and features/<split>/ (the cache)",
        keys={
            "task.ego.relevancy": "EK-100: the relevancy matrix (.pkl, .npy or .pt)",
            "task.ego.relevancy_texts": "EK-100: the query sentences",
            "task.ego.relevancy_videos": "EK-100: the CSV naming the video of each matrix row",
            "task.ego.egomcq": "EgoMCQ: egomcq.json",
            "data.root": "where relative task.ego files are looked up first",
            "eval.split": "the shards of the benchmark's clips",
            **_EVAL_WEIGHTS_KEYS,
        },
        configs=("model/*", "task/ek100_mir", "task/egomcq"),
        example="megavid eval-egocentric model=timesformer_base task=ek100_mir "
                "data.root=data/ek100 eval.checkpoint=runs/ego/model_fp32.pt",
        switches=_CACHED_EVAL_SWITCHES,
    ),
    "export-checkpoint": Job(
        "megavid.engine.checkpoint:run_export_checkpoint", "tools",
        "write a run's latest checkpoint as one fp32 file, model_fp32.pt",
        about="Consolidate a run's latest DeepSpeed checkpoint (ZeRO shards included) into one "
              "fp32 state dict, the file model.weights and eval.checkpoint take.",
        reads=f"{_RUN_DIR}checkpoints/ (or the checkpoint given with --resume)",
        writes=f"{_RUN_DIR}model_fp32.pt",
        keys={
            "run.name": "the run to export (--name sets it)",
            "run.output_dir": "the folder that holds run directories",
        },
        configs=("experiment/*",),
        example="megavid export-checkpoint experiment=demo",
        switches={
            "overwrite": "replace an existing model_fp32.pt",
            "resume": "export this checkpoint (a run directory, checkpoints folder or step_<N> "
                      "folder) instead of the run's latest",
        },
    ),
}
"""The config jobs, in the order ``megavid --help`` lists them within a section."""

TOOL_JOBS: dict[str, Job] = {
    "make-shards": Job(
        "megavid.shards.ingest.make_shards:main", "data",
        "turn your videos and an annotation file into validated shards"),
    "verify-shards": Job(
        "megavid.shards.verify:verify_main", "data",
        "check every shard, index and stats file, decoding every video"),
    "shard-stats": Job(
        "megavid.shards.stats:main", "data",
        "what a shard folder holds: totals, durations, codecs, failures"),
    "info": Job(
        "megavid.info:main", "tools",
        "versions, devices, working video decoders, the plan for your shards"),
    "bench-loader": Job(
        "megavid.data.bench:main", "tools",
        "measure clips/s of each decode path on your shards"),
    "launch": Job(
        "megavid.launch:main", "tools",
        "run a job on several nodes: hostfile, DeepSpeed, torchrun, SLURM"),
}
"""The jobs with their own parser (``megavid <tool> --help``)."""

DESCRIPTION = ("megavid trains and evaluates video-language models (a TimeSformer video tower "
               "and a BERT text tower, trained with DeepSpeed) on videos stored as webdataset "
               "shards.")
EPILOG = (
    "Run `megavid JOB --help` for what a job reads and writes, the config keys it needs and an "
    "example. Config jobs take tokens: group=name loads configs/<group>/<name>.yaml, a .yaml "
    "path merges that file and key.sub=value sets one key; docs/configuration.md lists every "
    "key. Logs, metrics.jsonl, TensorBoard, Weights & Biases (train.wandb=true) and the "
    "progress bar (MEGAVID_PROGRESS=1 shows it when stderr is not a terminal) are described "
    "in docs/monitoring.md; shards and decoders in docs/data.md.")
CONFIG_EPILOG = (
    "Config tokens: group=name loads configs/<group>/<name>.yaml, a .yaml path merges that "
    "file, key.sub=value sets one key; later tokens win, and --print-config prints the result "
    "without running. Every key, its type and default: docs/configuration.md.")
TRAIN_EPILOG = (
    "While it trains: a progress bar on a terminal (MEGAVID_PROGRESS=1 shows it when stderr is "
    "not a terminal), every rank's log in logs/rank<R>.log, the scalars in metrics.jsonl and, "
    "with train.tensorboard=true, TensorBoard events in tb/; train.wandb=true also sends them "
    "to Weights & Biases (pip install wandb). See docs/monitoring.md.")


def _fill(text: str, indent: str = "") -> str:
    """``text`` wrapped at :data:`WIDTH`, every line indented by ``indent``."""
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent)


def _rows(items: dict[str, str], width: int = 0) -> str:
    """``name  text`` rows, the text column (at ``width``, else after the longest name, at
    most 34) aligned and wrapped under itself; a longer name has its text on the next line."""
    width = width or min(max(map(len, items)) + 2, 34)
    indent = " " * (width + 2)
    rows = []
    for name, text in items.items():
        if len(name) + 2 > width:
            rows += [f"  {name}", textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent)]
        else:
            rows.append(textwrap.fill(f"{name:<{width}}{text}", WIDTH, initial_indent="  ",
                                      subsequent_indent=indent))
    return "\n".join(rows)


@functools.cache
def _defaults() -> dict[str, Any]:
    return to_dict(Config())


def _format_default(key: str) -> str:
    """``key``'s default as it is written after ``key=`` (a KeyError for a key that does not
    exist)."""
    value: Any = _defaults()
    for part in key.split("."):
        value = value[part]
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def find_config_files(patterns: tuple[str, ...]) -> list[str]:
    """The files of ``configs/`` matching ``<folder>/<glob>`` patterns, as a job takes them:
    ``group=name`` for a config group's folder, the file's path for the other folders."""
    found = []
    for pattern in patterns:
        folder = pattern.split("/", 1)[0]
        for path in sorted(CONFIG_DIR.glob(f"{pattern}.yaml")):
            found.append(f"{folder}={path.stem}" if folder in GROUPS else f"configs/{folder}/{path.name}")
    return found


def describe_job(job: Job) -> str:
    """A config job's ``--help`` description: what it does, reads and writes, the keys it
    needs with their defaults, the config files it uses (as found now) and an example."""
    keys = {f"{key}={_format_default(key)}": note for key, note in job.keys.items()}
    parts = [_fill(job.about), "reads:\n" + _fill(job.reads, "  "), "writes:\n" + _fill(job.writes, "  "),
             "config keys it needs (shown with their defaults; set them with key=value):\n" + _rows(keys)]
    files = find_config_files(job.configs)
    if files:
        parts.append("config files it uses (group=name, or the file's path):\n"
                     + _fill(", ".join(files), "  "))
    parts.append(f"example:\n  {job.example}")
    return "\n\n".join(parts)


def describe_jobs() -> str:
    """``megavid --help``'s description: what megavid is, then every job by section."""
    jobs = {**CONFIG_JOBS, **TOOL_JOBS}
    width = max(map(len, jobs)) + 2
    parts = [_fill(DESCRIPTION)]
    for section in SECTIONS:
        rows = {name: job.summary for name, job in jobs.items() if job.section == section}
        parts.append(f"{section}:\n" + _rows(rows, width))
    return "\n\n".join(parts)


def job_epilog(job: Job) -> str:
    """A config job's ``--help`` epilog: how config tokens work and, for a training job, where
    its progress, logs and metrics go."""
    return _fill(CONFIG_EPILOG) + ("\n\n" + _fill(TRAIN_EPILOG) if job.section == "train" else "")


def jobs_epilog() -> str:
    """``megavid --help``'s epilog: where to read more."""
    return _fill(EPILOG)
