"""Video classification: finetuning (single- and multi-label) through the one engine loop, and
zero-shot classification from class names through prompt templates.

Labels come from the sample JSON (``task.cls.label_field``: ``label``, ``labels`` or a dotted
path such as ``attributes.direction``) or from a label file beside the shards
(``task.cls.label_file``: a Charades-Ego style CSV with ``id`` + ``actions`` columns, or a
generic ``path,label`` CSV). Class names come from ``task.cls.classes``, ``task.cls.class_file``
(Charades style ``c000 Holding some clothes`` lines) or, failing both, the sorted label values
of the train split.

The classifier finetuned by ``megavid finetune-cls`` is the video tower of the VideoLM (its
pooled token, the standard finetuning feature) plus a linear head; weights named by
``model.weights`` (a pretrained VideoLM) initialise the tower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megavid.config import Config, to_dict
from megavid.data.table import read_split_meta
from megavid.errors import CheckpointError, ConfigError, DataError
from megavid.tasks import register_task
from megavid.tasks.base import VideoTextTask

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def get_field(meta: dict, path: str) -> Any:
    """The value at a dotted path of a sample JSON (None when any part is missing).

    Args:
        meta: the sample JSON.
        path: e.g. ``label`` or ``attributes.direction``.
    """
    node: Any = meta
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def get_data_file(cfg: Config, value: str, name: str) -> Path:
    """A file named by a ``task.cls`` path: absolute as given; relative, looked up under
    ``data.root`` first (released annotation trees live beside the shards, so configs name the
    files as they are released), then in the working directory.

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


def read_class_file(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
    """Class names, one per line; Charades style ``c000 Holding some clothes`` lines give the
    name after the id and let the id stand for the class too.

    Returns:
        (names in file order, alias -> index for ids and names).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.cls.class_file={str(p)!r} does not exist; point it at a file "
                          "with one class name per line")
    names: list[str] = []
    alias: dict[str, int] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        # a Charades id is a letter followed by digits ("c000"); anything else is a plain name
        if rest and head[:1].isalpha() and head[1:].isdigit():
            alias[head] = len(names)
            name = rest.strip()
        else:
            name = line
        alias[name] = len(names)
        names.append(name)
    if not names:
        raise ConfigError(f"task.cls.class_file={str(p)!r} holds no class names")
    return names, alias


def read_label_file(path: str | os.PathLike[str], *, multilabel: bool = False) -> dict[str, Any]:
    """Labels from a label file beside the shards, read by make-shards' own annotation readers
    (:mod:`megavid.shards.ingest.annotations`, so each format has one parser): a Charades-Ego CSV
    (``id``, ``actions`` = ``c092 11.9 21.2;c147 0.0 12.6``: the class numbers of a video) or a
    ``path,label`` list (``classification``; ``multilabel``: ``path,l1;l2``).

    Args:
        path: the file (``task.cls.label_file``).
        multilabel: read a generic list as multi-label (Charades-Ego always is).

    Returns:
        video id (the video's path and its stem) -> label, or list of labels.
    """
    from megavid.shards.ingest.annotations import detect_format, read_annotations

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.cls.label_file={str(p)!r} does not exist")
    if p.suffix.lower() == ".csv" and detect_format(p) == "charades_ego":
        fmt = "charades_ego"
    else:
        fmt = "multilabel" if multilabel else "classification"
    out: dict[str, Any] = {}
    for rec in read_annotations(p, fmt):
        if "labels" in rec.extra:
            value = list(rec.extra["labels"])
        elif "label" in rec.extra:
            value = rec.extra["label"]
        else:  # a row without a label: make-shards counts it; here it simply has no entry
            continue
        out[rec.video] = value
        out.setdefault(Path(rec.video).stem, value)
    if not out:
        raise DataError(f"label file {p} holds no labelled rows; check its format ({fmt})")
    return out


def _sample_ids(meta: dict) -> list[str]:
    ids = [str(meta.get("key", ""))]
    src = meta.get("source")
    if isinstance(src, str) and src:
        ids += [Path(src).stem, src]
    return ids


@dataclass
class LabelSpace:
    """Class names and the mapping of raw label values to class indices.

    Args:
        classes: class names, in label order.
        multilabel: targets are multi-hot [N, C] instead of indices [N].
        alias: extra raw value -> index entries (class ids such as ``c092``).
        label_field: dotted sample-JSON path of the label.
        label_map: labels from a label file, by sample id (key, source stem or source).
    """

    classes: list[str]
    multilabel: bool = False
    alias: dict[str, int] = field(default_factory=dict)
    label_field: str = "label"
    label_map: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._index.update(self.alias)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raw(self, meta: dict) -> Any:
        """The raw label value(s) of one sample."""
        if self.label_map is not None:
            for sid in _sample_ids(meta):
                if sid in self.label_map:
                    return self.label_map[sid]
            raise DataError(f"sample {meta.get('key')!r} (source {meta.get('source')!r}) has no "
                            "row in task.cls.label_file; add it or remove the sample")
        value = get_field(meta, self.label_field)
        if value is None and self.label_field == "label" and "labels" in meta:
            value = meta["labels"]
        if value is None:
            raise DataError(f"sample {meta.get('key')!r} has no '{self.label_field}' field; set "
                            "task.cls.label_field (e.g. attributes.direction) or task.cls.label_file")
        return value

    def index(self, value: Any) -> int:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            if not 0 <= value < self.num_classes:
                raise DataError(f"label {value} is outside 0..{self.num_classes - 1}; check "
                                "task.cls.classes / class_file")
            return value
        key = str(value)
        if key not in self._index:
            raise DataError(f"label {key!r} is not a known class ({self.num_classes} classes, e.g. "
                            f"{', '.join(self.classes[:5])}); add it to task.cls.classes")
        return self._index[key]

    def targets(self, metas: list[dict]) -> torch.Tensor:
        """int64 [N] class indices, or float [N, C] multi-hot targets (multi-label)."""
        if not self.multilabel:
            out = []
            for m in metas:
                v = self.raw(m)
                if isinstance(v, list):
                    if len(v) != 1:
                        raise DataError(f"sample {m.get('key')!r} has {len(v)} labels but "
                                        "task.cls.multilabel=false; set it true")
                    v = v[0]
                out.append(self.index(v))
            return torch.tensor(out, dtype=torch.int64)
        y = torch.zeros(len(metas), self.num_classes)
        for i, m in enumerate(metas):
            v = self.raw(m)
            for x in v if isinstance(v, list) else [v]:
                y[i, self.index(x)] = 1.0
        return y

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "multilabel": self.multilabel}


def build_label_space(cfg: Config) -> LabelSpace:
    """The label space of ``cfg.task.cls`` (class names from the config, a class file, or the
    sorted label values of the train split)."""
    c = cfg.task.cls
    label_map = (read_label_file(get_data_file(cfg, c.label_file, "task.cls.label_file"),
                                 multilabel=c.multilabel) if c.label_file else None)
    alias: dict[str, int] = {}
    if c.classes:
        classes = list(c.classes)
    elif c.class_file:
        classes, alias = read_class_file(get_data_file(cfg, c.class_file, "task.cls.class_file"))
    else:
        probe = LabelSpace(classes=[], label_field=c.label_field, label_map=label_map)
        values: set = set()
        for m in read_split_meta(cfg.data, cfg.data.train):
            v = probe.raw(m)
            values.update(v if isinstance(v, list) else [v])
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            classes = [str(i) for i in range(max(values) + 1)]
        else:
            classes = sorted(str(v) for v in values)
        log.info("classes from the train split's labels: %s", classes)
    if len(set(classes)) != len(classes):
        raise ConfigError("task.cls.classes has duplicate names; each class needs its own name")
    if len(classes) < 2 and not c.multilabel:
        raise ConfigError(f"single-label classification needs >= 2 classes, found {classes}")
    return LabelSpace(classes=classes, multilabel=c.multilabel, alias=alias,
                      label_field=c.label_field, label_map=label_map)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class VideoClassifier(nn.Module):
    """A video encoder's pooled feature -> linear class head.

    Args:
        video_encoder: a TimeSformer returning ``(tokens, pooled [B, D])``.
        embed_dim: D.
        num_classes: C.
    """

    def __init__(self, video_encoder: nn.Module, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.video_encoder = video_encoder
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, video_BTCHW: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of normalised clips."""
        _, pooled = self.video_encoder(video_BTCHW)
        return self.head(pooled)

    def set_grad_checkpointing(self, every_n: int = 1) -> None:
        self.video_encoder.set_grad_checkpointing(every_n)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters()
                if p.ndim < 2 or "embed" in n or n.endswith("cls_token")}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per clip: the analytic TimeSformer count of
        megavid.models.flops plus the head; the stem's input gradient is not computed."""
        from megavid.models.flops import timesformer_forward_flops

        fwd, stem = timesformer_forward_flops(self.video_encoder)
        fwd += 2.0 * self.head.in_features * self.head.out_features
        return 3.0 * fwd - stem


def evaluate_classifier(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """top-1/top-5 (single-label) or mAP (multi-label), in percent."""
    from megavid.eval import multilabel_map, topk_accuracy

    if multilabel:
        return multilabel_map(logits.float(), targets)
    return topk_accuracy(logits.float(), targets, ks=(1, min(5, logits.shape[1])))


@register_task("classification")
class ClassificationTask(VideoTextTask):
    """Finetune a video classifier: softmax cross-entropy, or per-class BCE (multi-label)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._labels: LabelSpace | None = None

    @property
    def labels(self) -> LabelSpace:
        if self._labels is None:
            self._labels = build_label_space(self.cfg)
        return self._labels

    def build_model(self) -> nn.Module:
        videolm = super().build_model()  # loads model.weights / video_weights when set
        return VideoClassifier(videolm.video_encoder, self.cfg.model.video.embed_dim,
                               self.labels.num_classes)

    def flops_per_sample(self, model: nn.Module) -> float:
        return float(getattr(model, "module", model).flops_per_sample())

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from megavid.data.transforms import normalize_clip

        video = normalize_clip(batch["video"], self.device, self.dtype)
        y = self.labels.targets(batch["meta"]).to(self.device)
        logits = model(video).float()
        if self.labels.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = F.cross_entropy(logits, y)
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(logits [N, C], targets, keys) of a split, every sample once (all ranks gathered)."""
        from megavid.data.transforms import normalize_clip
        from megavid.eval.gather import gather_features, gather_objects

        loader = self.build_eval_loader(split, self.rank, self.world_size)
        logits, targets, keys, valids, indices = [], [], [], [], []
        for batch in loader:
            video = normalize_clip(batch["video"], self.device, self.dtype)
            logits.append(model(video).float().cpu())
            targets.append(self.labels.targets(batch["meta"]))
            keys += batch["keys"]
            valids.append(batch.get("valid", torch.ones(len(batch["keys"]), dtype=torch.bool)))
            indices.append(batch.get("indices"))
        valid = torch.cat(valids)
        # dataset order whatever the number of ranks (each rank reads its own part)
        index = torch.cat(indices) if indices and all(i is not None for i in indices) else None
        return (gather_features(torch.cat(logits), valid, indices=index),
                gather_features(torch.cat(targets).float(), valid, indices=index),
                gather_objects(keys, valid, indices=index))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy (or mAP) on ``data.val`` (run by the engine every ``train.eval_every``)."""
        logits, y, _ = self.predict(model, self.cfg.data.val)
        return evaluate_classifier(logits, y if self.labels.multilabel else y.long(),
                                   self.labels.multilabel)


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------
def _device() -> torch.device:
    from megavid.engine.dist import get_world_info

    info = get_world_info()
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def resolve_eval_checkpoint(cfg: Config, resume: str | None, *, allow_random: bool = False) -> str | None:
    """The checkpoint an evaluation job uses: ``--resume``, ``eval.checkpoint`` (a run directory
    means its newest weights), or the run's newest weights (a stale export is re-exported).
    ``eval.checkpoint=random`` (where ``allow_random``) evaluates a randomly initialised model
    (seeded by ``run.seed``) and returns None.
    """
    from megavid.engine.checkpoint import find_checkpoint, select_checkpoint

    if allow_random and (resume or cfg.eval.checkpoint) == "random":
        return None
    named = resume or cfg.eval.checkpoint
    ckpt = select_checkpoint(named).path if named else find_checkpoint(cfg.run_dir)
    if not ckpt:
        raise CheckpointError(
            f"no checkpoint to evaluate in {cfg.run_dir}; train first or pass "
            "eval.checkpoint=PATH" + (" (or eval.checkpoint=random for a random-init baseline)"
                                      if allow_random else ""))
    if not Path(ckpt).exists():
        raise CheckpointError(f"checkpoint {ckpt} does not exist; pass eval.checkpoint=PATH")
    return str(ckpt)


def load_videolm(cfg: Config, task: VideoTextTask, ckpt: str | None) -> nn.Module:
    """A VideoLM in eval mode on the task's device, with the checkpoint's weights (strict)."""
    from megavid.engine.checkpoint import load_model_state, load_state_strict
    from megavid.engine.trainer import seed_everything

    seed_everything(cfg.run.seed)  # the random-init baseline is reproducible
    model = task.build_model()
    if ckpt is not None:
        load_state_strict(model, load_model_state(ckpt), ckpt)
    return model.to(task.device).eval()


def _setup(task: VideoTextTask) -> None:
    from megavid.engine.dist import get_world_info, init_distributed

    info = get_world_info()
    if info.world_size > 1:
        init_distributed()
    task.setup(_device(), torch.float32, info.rank, info.world_size)


def run_finetune_cls(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid finetune-cls`: finetune a classifier with the engine, then evaluate the final
    checkpoint on ``eval.split``; writes ``<run_dir>/eval/cls_<split>.json``.

    Args:
        cfg: the resolved config (``task.cls`` for labels).
        overwrite: start afresh in an existing run directory.
        resume: resume training from this checkpoint.
    """
    from megavid.engine.checkpoint import find_checkpoint, load_model_state, load_state_strict
    from megavid.engine.dist import get_rank
    from megavid.engine.trainer import Trainer
    from megavid.eval.results import write_results

    if cfg.task.name == "pretrain":
        cfg.task.name = "classification"
    task = ClassificationTask(cfg)
    summary = Trainer(cfg, task, overwrite=overwrite, resume=resume).fit()
    ckpt = find_checkpoint(cfg.run_dir)
    if ckpt is None:  # debug runs write no checkpoint
        return {"train": summary}
    model = task.build_model()
    load_state_strict(model, load_model_state(ckpt), ckpt)
    model.to(task.device).eval()
    task.dtype = torch.float32
    logits, y, keys = task.predict(model, cfg.eval.split)
    lab = task.labels
    metrics = evaluate_classifier(logits, y if lab.multilabel else y.long(), lab.multilabel)
    result = {"split": cfg.eval.split, "num_samples": len(keys), "metrics": metrics,
              "chance": _chance(y, lab), "labels": lab.to_dict(), "train": summary}
    if get_rank() == 0:
        out = Path(cfg.run_dir) / "eval" / f"cls_{cfg.eval.split}.json"
        result["scores"] = write_scores(out.with_name(f"{out.stem}_scores.pt"), keys, logits,
                                        y if lab.multilabel else y.long(), lab)
        write_results(out, result, to_dict(cfg), ckpt)
        print(f"finetune-cls on {len(keys)} clips of '{cfg.eval.split}': "
              + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()) + f"\nresults: {out}")
    return result


def _chance(y: torch.Tensor, lab: LabelSpace) -> dict[str, float]:
    if lab.multilabel:
        # a random ranking's AP is about the positive rate of each class
        pos = y.float().mean(0)
        return {"mAP": float(pos[pos > 0].mean() * 100) if bool((pos > 0).any()) else 0.0}
    c = lab.num_classes
    return {"top1": 100.0 / c, f"top{min(5, c)}": 100.0 * min(5, c) / c}


def write_scores(path: str | os.PathLike[str], keys: list[str], scores: torch.Tensor,
                 targets: torch.Tensor, labels: LabelSpace) -> dict[str, str]:
    """Per-sample class scores beside a results JSON, so every reported number can be
    recomputed elsewhere (a test, a significance test between two runs, another metric).

    The file is a ``torch.save`` dict: ``keys`` (sample keys, row order), ``scores`` [N, C]
    (exactly the tensor the metrics were computed from), ``targets`` ([N] class indices, or
    [N, C] multi-hot), ``classes`` and ``multilabel``.

    Args:
        path: the ``.pt`` file to write.
        keys: sample keys.
        scores: [N, C] class scores.
        targets: the targets the metrics used.
        labels: the label space.

    Returns:
        ``{"file": name, "sha256": digest}`` for the results JSON.
    """
    from megavid.eval.results import file_sha256

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"keys": list(keys), "scores": scores.detach().cpu(), "targets": targets.detach().cpu(),
                "classes": list(labels.classes), "multilabel": labels.multilabel}, p)
    return {"file": p.name, "sha256": file_sha256(p)}


def zeroshot_classifier(model: nn.Module, task: VideoTextTask, classes: list[str],
                        templates: list[str] | None = None) -> torch.Tensor:
    """The [P, C] zero-shot classifier of a VideoLM: prompt embeddings averaged per class.

    Args:
        model: a VideoLM.
        task: gives the tokenizer, max text length and device.
        classes: class names in label order.
        templates: prompt templates ("{}" = class name); None: the default video templates.
    """
    from megavid.data.text import tokenize
    from megavid.eval import DEFAULT_VIDEO_TEMPLATES, build_zeroshot_classifier

    def encode(texts: list[str]) -> torch.Tensor:
        ids, mask = tokenize(task.tokenizer, texts, task.cfg.data.max_text_len)
        return model.encode_text(ids.to(task.device), mask.to(task.device))[1].float().cpu()

    return build_zeroshot_classifier(encode, classes, templates or DEFAULT_VIDEO_TEMPLATES)


def run_eval_zeroshot_cls(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid eval-zeroshot-cls`: zero-shot classification of ``eval.split`` with a pretrained
    VideoLM; writes ``<run_dir>/eval/zeroshot_cls_<split>.json``.

    Args:
        cfg: the resolved config (``task.cls``: labels, classes, templates).
        overwrite: unused (evaluation never overwrites a run).
        resume: the checkpoint to evaluate (default: eval.checkpoint or the run's latest).
    """
    from megavid.eval.results import write_results
    from megavid.tasks.zeroshot import encode_split

    ckpt = resolve_eval_checkpoint(cfg, resume, allow_random=True)
    task = VideoTextTask(cfg)
    _setup(task)
    labels = build_label_space(cfg)
    model = load_videolm(cfg, task, ckpt)
    enc = encode_split(model, task.build_eval_loader(cfg.eval.split, task.rank, task.world_size), task)
    with torch.no_grad():
        classifier = zeroshot_classifier(model, task, labels.classes, list(cfg.task.cls.templates))
    logits = enc.video_feat @ classifier
    y = labels.targets(enc.meta)
    metrics = evaluate_classifier(logits, y, labels.multilabel)
    result = {"split": cfg.eval.split, "num_samples": len(enc.keys), "metrics": metrics,
              "chance": _chance(y, labels), "labels": labels.to_dict(),
              "templates": list(cfg.task.cls.templates) or None}
    if task.rank == 0:
        out = Path(cfg.run_dir) / "eval" / f"zeroshot_cls_{cfg.eval.split}.json"
        result["scores"] = write_scores(out.with_name(f"{out.stem}_scores.pt"), enc.keys, logits,
                                        y, labels)
        write_results(out, result, to_dict(cfg), ckpt)
        print(f"zero-shot classification on {len(enc.keys)} clips: "
              + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())
              + f" (chance {result['chance']})\nresults: {out}")
    return result


__all__: list[str] = [
    "ClassificationTask", "LabelSpace", "VideoClassifier", "build_label_space",
    "evaluate_classifier", "get_data_file", "get_field", "load_videolm", "read_class_file", "read_label_file",
    "read_split_meta", "resolve_eval_checkpoint", "run_eval_zeroshot_cls", "run_finetune_cls",
    "write_scores", "zeroshot_classifier",
]
