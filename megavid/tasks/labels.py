"""The label space of the classification jobs (finetune-cls, linear-probe, eval-zeroshot-cls):
class names and the class index (or multi-hot row) of each sample.

Labels come from the sample JSON (``task.cls.label_field``: ``label``, ``labels`` or a dotted
path such as ``attributes.direction``) or from a label file beside the shards
(``task.cls.label_file``: a Charades-Ego style CSV with ``id`` + ``actions`` columns, or a
generic ``path,label`` CSV). Class names come from ``task.cls.classes``, ``task.cls.class_file``
(Charades style ``c000 Holding some clothes`` lines) or, failing both, the sorted label values
of the train split. The files are read by make-shards' readers
(:mod:`megavid.shards.ingest.labels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megavid.config import Config
from megavid.data.table import read_split_meta
from megavid.errors import ConfigError, DataError
from megavid.shards.ingest.labels import read_class_file, read_label_file
from megavid.tasks.base import get_data_file

log = logging.getLogger(__name__)


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


__all__ = ["LabelSpace", "build_label_space", "get_field"]
