"""The annotation record every reader returns (:mod:`megavid.shards.ingest.annotations`), the
per-record failure reasons, and the helpers the readers share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megavid.errors import DataError

REASON_NO_CAPTION = "no_caption"
REASON_BAD_CAPTION = "non_text_caption"
REASON_BAD_WINDOW = "bad_window"
REASON_NO_LABEL = "no_label"
_VIDEO_COLS = ("video", "video_id", "videoid", "video_path", "path", "file", "filename", "video_uid")
_CAPTION_COLS = ("caption", "captions", "text", "sentence", "name", "description", "clip_text")


@dataclass(kw_only=True, slots=True)
class Record:
    """One sample to make: a video (path relative to the video folder, or an id), its text."""

    video: str
    captions: list[Any]
    key: str = ""
    """Explicit key (otherwise derived from the video name and window)."""
    start: float | None = None
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra sample-JSON fields: qa, label, labels, segments, split, ..."""
    error: str = ""
    """A reason when the record itself is unusable (counted, not raised)."""
    line: int = 0
    """Where in the annotation file (1-based; 0 when not line based)."""


def _check_captions(rec: Record) -> Record:
    caps = rec.captions
    if not isinstance(caps, list):
        caps = [caps]
    if any(not isinstance(c, str) for c in caps if c is not None):
        rec.error = REASON_BAD_CAPTION
        return rec
    caps = [c.strip() for c in caps if c is not None and c.strip()]
    if not caps:
        rec.error = REASON_NO_CAPTION
    rec.captions = caps
    if rec.start is not None and rec.end is not None and not rec.error:
        if rec.end <= rec.start or rec.start < 0:
            rec.error = REASON_BAD_WINDOW
    return rec


def _float_or_none(v: Any, where: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: time {v!r} is not a number; fix the annotation file") from e


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"annotation file '{path}' does not exist; pass --annotations FILE")
    if not path.is_file():
        raise DataError(f"annotation path '{path}' is not a file; pass --annotations FILE")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file '{path}' ({e}); check its permissions/encoding") from e


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file '{path}' is not valid JSON ({e}); check --format") from e


def _group(records: list[Record]) -> list[Record]:
    """Merge records of the same (key, video, window) into one, captions in file order.
    (The same key on different videos stays separate: make-shards reports a duplicate.)"""
    out: dict[tuple, Record] = {}
    for r in records:
        k = (r.key, r.video, r.start, r.end)
        if k in out and not r.error and not out[k].error:
            out[k].captions = list(out[k].captions) + list(r.captions)
            for qa in r.extra.get("qa", []):
                out[k].extra.setdefault("qa", []).append(qa)
        elif k not in out:
            out[k] = r
        else:
            # an erroneous duplicate row: keep it separate so it is counted
            out[k + (len(out),)] = r
    return list(out.values())


def check_path_template(template: str, cols: list[str], path: Path) -> None:
    """Raise DataError unless every ``{field}`` of a ``--path-template`` is a column of ``path``."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"--path-template {template!r} is not a valid format string ({e})") from e
    bad = [f for f in fields if not f or f.split(".")[0].split("[")[0] not in cols]
    if bad or not fields:
        raise DataError(
            f"--path-template {template!r} names {', '.join(map(repr, bad)) or 'no column'}, which "
            f"{path} does not have (columns: {', '.join(cols)}); use {{column}} fields of the file"
        )


def apply_path_template(template: str | None, row: dict[str, Any], default: str, where: str) -> str:
    """The video path of one row: ``template.format(**row)`` (stripped values), or ``default``."""
    if not template:
        return default
    try:
        return template.format(**{k: (v or "").strip() for k, v in row.items() if k is not None})
    except (ValueError, IndexError, KeyError) as e:
        raise DataError(f"{where}: --path-template {template!r} does not apply to this row ({e})") from e
