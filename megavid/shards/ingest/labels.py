"""Class labels kept outside the shards, read with the annotation readers of make-shards (one
parser per format): a label file beside the shards (``task.cls.label_file``: a Charades-Ego
CSV or a ``path,label`` list) and a class list (``task.cls.class_file``: one name per line, or
Charades' ``c000 Holding some clothes``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megavid.errors import ConfigError, DataError
from megavid.shards.ingest.annotations import detect_format, read_annotations
from megavid.shards.ingest.dataset_annotations import CHARADES_CLASS_ID


def read_class_file(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
    """Class names, one per line; Charades style ``c000 Holding some clothes`` lines give the
    name after the id and let the id stand for the class too.

    Args:
        path: the file (``task.cls.class_file``).

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
        if rest and CHARADES_CLASS_ID.fullmatch(head):
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
    (:mod:`megavid.shards.ingest.annotations`): a Charades-Ego CSV (``id``, ``actions`` =
    ``c092 11.9 21.2;c147 0.0 12.6``: the class numbers of a video) or a ``path,label`` list
    (``classification``; ``multilabel``: ``path,l1;l2``).

    Args:
        path: the file (``task.cls.label_file``).
        multilabel: read a generic list as multi-label (Charades-Ego always is).

    Returns:
        video id (the video's path and its stem) -> label, or list of labels.
    """
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


__all__ = ["read_class_file", "read_label_file"]
