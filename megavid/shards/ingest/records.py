"""The annotation record every reader returns (:mod:`megavid.shards.ingest.annotations`), the
per-record failure reasons, and the helpers the readers share."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megavid.errors import DataError

REASON_NO_CAPTION = "no_caption"
REASON_BAD_CAPTION = "non_text_caption"
REASON_BAD_WINDOW = "bad_window"
REASON_NO_LABEL = "no_label"
REASON_MISSING_FIELD = "missing_field"
"""An annotation entry lacks a field it needs (an MSR-VTT sentence without ``caption``, a row
whose video path column is empty); its ``detail`` names the entry and the field."""
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
    detail: str = ""
    """With ``error``: the entry and the field at fault, e.g. ``MSRVTT_data.json sentences[17]
    (sen_id 17, video7): no 'caption'`` (make-shards reports it as the failure's source)."""
    line: int = 0
    """Where in the annotation file (1-based; 0 when not line based)."""


def _check_captions(rec: Record, where: str = "", field: str = "caption") -> Record:
    """Strip the captions and flag a record without a usable one (or with a bad window).

    ``where`` names the entry (``a.csv:7 (video7)``) and ``field`` the caption's field in the
    file: together they make the record's ``detail`` when it is flagged."""
    caps = rec.captions
    if not isinstance(caps, list):
        caps = [caps]
    if any(not isinstance(c, str) for c in caps if c is not None):
        return _flag(rec, REASON_BAD_CAPTION, where, f"'{field}' is not text")
    text = [c.strip() for c in caps if c is not None and c.strip()]
    rec.captions = text
    if not text:
        absent = all(c is None for c in caps)
        return _flag(rec, REASON_NO_CAPTION, where, f"{'no' if absent else 'empty'} '{field}'")
    if rec.start is not None and rec.end is not None and (rec.end <= rec.start or rec.start < 0):
        return _flag(rec, REASON_BAD_WINDOW, where, f"window {rec.start}..{rec.end} s is not a time range")
    return rec


def _flag(rec: Record, reason: str, where: str, what: str) -> Record:
    rec.error = reason
    rec.detail = f"{where}: {what}" if where else ""
    return rec


def missing_field(video: str, where: str, field: str, what: str = "no") -> Record:
    """The failure record of an entry that lacks ``field`` (``what``: 'no' or 'empty'),
    counted by make-shards."""
    return Record(video=video, captions=[], error=REASON_MISSING_FIELD, detail=f"{where}: {what} '{field}'")


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


def _read_table_rows(path: Path, need: set[str], what: str,
                     template: str | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a CSV (or TSV, told by a tab in the header) that must have the ``need`` columns
    (and those of a ``--path-template``)."""
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in first else ",")
    cols = [c.strip() for c in reader.fieldnames or []]
    missing = need - set(cols)
    if missing:
        raise DataError(f"{path}: not {what} (missing columns {', '.join(sorted(missing))}); check --format")
    if template:
        check_path_template(template, cols, path)
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    return rows, cols


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


def template_fields(template: str) -> list[str]:
    """The columns a ``--path-template`` reads (``{time_start:0>6}`` -> ``time_start``).

    Raises:
        DataError: not a format string.
    """
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"--path-template {template!r} is not a valid format string ({e})") from e
    return [f.split(".")[0].split("[")[0] for f in fields]


def check_path_template(template: str, cols: list[str], path: Path) -> None:
    """Raise DataError unless every ``{field}`` of a ``--path-template`` is a column of ``path``."""
    fields = template_fields(template)
    bad = [f for f in fields if not f or f not in cols]
    if bad or not fields:
        raise DataError(
            f"--path-template {template!r} names {', '.join(map(repr, bad)) or 'no column'}, which "
            f"{path} does not have (columns: {', '.join(cols)}); use {{column}} fields of the file"
        )


def row_video(row: dict[str, Any], where: str, template: str | None = None,
              column: str | None = None) -> tuple[str, str]:
    """The video path of one annotation row and the column it lacks ('' when none).

    The path is ``template`` filled with the row's stripped values, else the value of
    ``column``; the column it lacks is the first one read that is empty, so that no path is
    built from an empty cell (the caller counts the row as ``missing_field``)."""
    values = {k: "" if v is None else str(v).strip() for k, v in row.items() if k is not None}
    if not template:
        video = values.get(column or "", "")
        return video, "" if video else (column or "video")
    gap = next((f for f in template_fields(template) if not values.get(f)), "")
    try:
        return template.format(**values), gap
    except (ValueError, IndexError, KeyError) as e:
        raise DataError(f"{where}: --path-template {template!r} does not apply to this row ({e})") from e
