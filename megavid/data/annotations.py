"""Annotation readers for ``megavid make-shards``: one format in, a list of records out.

Every reader returns :class:`Record` objects in a deterministic order (the file's order,
grouped by video and window), which fixes the sample order of the shards. Supported:

- ``csv`` / ``tsv``: one caption per row; ``--video-col``/``--caption-col``/``--key-col``/
  ``--start-col``/``--end-col`` map the columns (rows of the same video and window merge
  into one sample with several captions).
- ``jsonl``: one object per line with ``video`` and ``caption`` or ``captions`` (optional
  ``key``, ``start``, ``end``, ``qa``, ``label``, ``labels``); a JSON list of the same objects
  is read by ``json``.
- ``msrvtt``: the MSR-VTT ``videodatainfo`` JSON (``videos`` + ``sentences``), ``--split``
  selects one split.
- ``didemo``: DiDeMo moments (``video``, ``description``, ``times`` in 5 s units): one
  paragraph sample per video, the moments kept as ``segments`` metadata.
- ``activitynet``: ActivityNet Captions (``{video: {duration, timestamps, sentences}}``):
  one paragraph sample per video with ``segments``.
- ``egoclip``: EgoClip narrations (TSV: ``video_uid``, ``clip_start``, ``clip_end``,
  ``clip_text``, ``narration_ind``): one sample per narration, the clip window stored as
  ``start``/``end`` (the loader samples inside it; the video is not cut).
- ``qa``: question-answer JSON list (``video``/``video_id``, ``question``, ``answer``,
  optional ``type``/``choices``/``caption``) grouped per video; the caption defaults to the
  question + answer text.

Problems with the whole file (missing, unreadable, not the declared format, a mapped column
that does not exist) raise :class:`DataError` before any video is touched; problems with a
single record (no caption, a caption that is not text) are kept on the record as ``error``
so that make-shards counts them with the other failures.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megavid.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "json", "msrvtt", "didemo", "activitynet", "egoclip", "qa")
REASON_NO_CAPTION = "no_caption"
REASON_BAD_CAPTION = "non_text_caption"
REASON_BAD_WINDOW = "bad_window"
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


def read_table(path: Path, *, delimiter: str, video_col: str | None = None,
               caption_col: str | None = None, key_col: str | None = None,
               start_col: str | None = None, end_col: str | None = None) -> list[Record]:
    """CSV/TSV with a header row; columns picked by name (or common defaults)."""
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    cols = reader.fieldnames or []
    if not cols:
        raise DataError(f"annotation file '{path}' has no header row; add one naming the columns")

    def pick(given: str | None, defaults: tuple[str, ...], what: str, flag: str) -> str | None:
        if given:
            if given not in cols:
                raise DataError(f"{path}: no column '{given}' for {what} (columns: {', '.join(cols)}); fix {flag}")
            return given
        return next((c for c in defaults if c in cols), None)

    vcol = pick(video_col, _VIDEO_COLS, "the video", "--video-col")
    ccol = pick(caption_col, _CAPTION_COLS, "the caption", "--caption-col")
    if vcol is None or ccol is None:
        raise DataError(
            f"{path}: cannot tell which columns hold the video and the caption (columns: "
            f"{', '.join(cols)}); pass --video-col and --caption-col"
        )
    kcol = pick(key_col, (), "the key", "--key-col")
    scol = pick(start_col, (), "the start time", "--start-col")
    ecol = pick(end_col, (), "the end time", "--end-col")
    records = []
    for i, row in enumerate(reader, start=2):
        where = f"{path}:{i}"
        records.append(_check_captions(Record(
            video=(row.get(vcol) or "").strip(),
            captions=[row.get(ccol)],
            key=(row.get(kcol) or "").strip() if kcol else "",
            start=_float_or_none(row.get(scol), where) if scol else None,
            end=_float_or_none(row.get(ecol), where) if ecol else None,
            line=i,
        )))
    return _group(records)


def _from_obj(obj: Any, where: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per sample, got {type(obj).__name__}")
    video = obj.get("video", obj.get("video_id", obj.get("video_path", obj.get("path"))))
    if not isinstance(video, str) or not video:
        raise DataError(f"{where}: no 'video' field (the video file or id); fix the annotation")
    if "captions" in obj:
        caps = obj["captions"]
    elif "caption" in obj:
        caps = obj["caption"]
    else:
        caps = obj.get("text", obj.get("sentence", []))
    extra = {k: obj[k] for k in ("qa", "label", "labels", "type", "split", "segments") if k in obj}
    return _check_captions(Record(
        video=video,
        captions=caps if isinstance(caps, list) else [caps],
        key=str(obj.get("key", "") or ""),
        start=_float_or_none(obj.get("start"), where),
        end=_float_or_none(obj.get("end"), where),
        extra=extra,
        line=line,
    ))


def read_jsonl(path: Path) -> list[Record]:
    records = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e}); check --format") from e
        records.append(_from_obj(obj, f"{path}:{i}", i))
    return _group(records)


def read_json_list(path: Path) -> list[Record]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples; check --format")
    return _group([_from_obj(o, f"{path}[{i}]", i + 1) for i, o in enumerate(data)])


def read_msrvtt(path: Path, split: str | None = None) -> list[Record]:
    """MSR-VTT ``videodatainfo.json``: {"videos": [{"video_id", "split"}], "sentences": [...]}"""
    data = _load_json(path)
    if not isinstance(data, dict) or "sentences" not in data:
        raise DataError(f"{path}: not an MSR-VTT file (no 'sentences'); check --format")
    videos = data.get("videos") or [{"video_id": s["video_id"]} for s in data["sentences"]]
    splits = {v["video_id"]: v.get("split") for v in videos}
    caps: dict[str, list] = {}
    for s in data["sentences"]:
        caps.setdefault(s.get("video_id"), []).append(s.get("caption"))
    out = []
    for vid in dict.fromkeys(v["video_id"] for v in videos):
        if split and splits.get(vid) != split:
            continue
        extra = {"split": splits[vid]} if splits.get(vid) else {}
        out.append(_check_captions(Record(video=vid, captions=caps.get(vid, []), extra=extra)))
    return out


def read_didemo(path: Path) -> list[Record]:
    """DiDeMo moments -> one paragraph sample per video (segments kept as metadata)."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: not a DiDeMo file (expected a list of moments); check --format")
    by_video: dict[str, list[dict]] = {}
    for i, m in enumerate(data):
        if not isinstance(m, dict) or "video" not in m:
            raise DataError(f"{path}[{i}]: a DiDeMo moment needs 'video' and 'description'")
        by_video.setdefault(m["video"], []).append(m)
    out = []
    for video, moments in by_video.items():
        segments = []
        for m in moments:
            times = m.get("times") or [[0, 0]]
            # DiDeMo times are 5-second segment indices; the moment is their union (mean
            # start and end over annotators, as in the original evaluation)
            s = sum(t[0] for t in times) / len(times) * 5.0
            e = (sum(t[1] for t in times) / len(times) + 1) * 5.0
            segments.append({"start": s, "end": e, "caption": m.get("description")})
        descs = [m.get("description") for m in moments]
        if any(not isinstance(d, str) for d in descs):
            rec = Record(video=video, captions=[1], extra={})  # flagged as non-text below
        else:
            rec = Record(video=video, captions=[" ".join(d.strip() for d in descs if d.strip())],
                         extra={"segments": segments})
        out.append(_check_captions(rec))
    return out


def read_activitynet(path: Path) -> list[Record]:
    """ActivityNet Captions ({video: {duration, timestamps, sentences}}) -> paragraphs."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not an ActivityNet Captions file (expected an object); check --format")
    out = []
    for video, ann in data.items():
        if not isinstance(ann, dict) or "sentences" not in ann:
            raise DataError(f"{path}: entry '{video}' has no 'sentences'; check --format")
        sents = ann["sentences"]
        if any(not isinstance(s, str) for s in sents):
            out.append(_check_captions(Record(video=video, captions=[1])))
            continue
        segs = [{"start": float(t[0]), "end": float(t[1]), "caption": s.strip()}
                for t, s in zip(ann.get("timestamps", []), sents)]
        out.append(_check_captions(Record(
            video=video, captions=[" ".join(s.strip() for s in sents if s.strip())],
            extra={"segments": segs})))
    return out


def read_egoclip(path: Path) -> list[Record]:
    """EgoClip narrations: one windowed sample per narration (``#C`` markers removed)."""
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    delim = "\t" if "\t" in first else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    need = {"video_uid", "clip_start", "clip_end", "clip_text"}
    missing = need - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path}: not an EgoClip file (missing columns {', '.join(sorted(missing))}); check --format")
    out = []
    for i, row in enumerate(reader, start=2):
        where = f"{path}:{i}"
        caption = re.sub(r"^\s*#\w+\s*", "", row["clip_text"] or "")
        ind = row.get("narration_ind") or str(i)
        out.append(_check_captions(Record(
            video=row["video_uid"],
            captions=[caption],
            key=f"{row['video_uid']}_{ind}",
            start=_float_or_none(row["clip_start"], where),
            end=_float_or_none(row["clip_end"], where),
            line=i,
        )))
    return out


def read_qa(path: Path) -> list[Record]:
    """A QA JSON list -> one sample per video holding all its QA pairs."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of QA pairs; check --format")
    recs = []
    for i, q in enumerate(data):
        if not isinstance(q, dict) or "question" not in q or "answer" not in q:
            raise DataError(f"{path}[{i}]: a QA entry needs 'question' and 'answer'")
        video = q.get("video", q.get("video_id"))
        if not isinstance(video, str) and not isinstance(video, int):
            raise DataError(f"{path}[{i}]: no 'video'/'video_id'")
        qa = {"question": q["question"], "answer": q["answer"], "type": q.get("type", "open")}
        if "choices" in q:
            qa["choices"] = q["choices"]
        caption = q.get("caption")
        if caption is None and isinstance(q["question"], str) and isinstance(q["answer"], str):
            caption = f"{q['question'].rstrip('?').strip()}? {q['answer']}"
        recs.append(_check_captions(Record(video=str(video), captions=[caption], extra={"qa": [qa]}, line=i + 1)))
    return _group(recs)


def detect_format(path: Path) -> str:
    """Guess the format from the extension and (for JSON) the top-level shape."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        head = _read_text(path).split("\n", 1)[0]
        return "egoclip" if "clip_text" in head and "video_uid" in head else "tsv"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict):
            if "sentences" in data:
                return "msrvtt"
            if data and all(isinstance(v, dict) and "sentences" in v for v in data.values()):
                return "activitynet"
        if isinstance(data, list) and data and isinstance(data[0], dict):
            if "description" in data[0] and "times" in data[0]:
                return "didemo"
            if "question" in data[0]:
                return "qa"
            return "json"
    raise DataError(f"cannot tell the format of '{path}'; pass --format ({', '.join(FORMATS)})")


def read_annotations(path: str | Path, fmt: str = "auto", **options: Any) -> list[Record]:
    """Read an annotation file into records.

    Args:
        path: the annotation file.
        fmt: one of :data:`FORMATS` or ``auto``.
        **options: ``video_col``, ``caption_col``, ``key_col``, ``start_col``, ``end_col``
            (csv/tsv) and ``split`` (msrvtt).

    Raises:
        DataError: the file is missing, unreadable, or not in the format.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    readers: dict[str, Callable[[], list[Record]]] = {
        "csv": lambda: read_table(path, delimiter=",", **_table_opts(options)),
        "tsv": lambda: read_table(path, delimiter="\t", **_table_opts(options)),
        "jsonl": lambda: read_jsonl(path),
        "json": lambda: read_json_list(path),
        "msrvtt": lambda: read_msrvtt(path, options.get("split")),
        "didemo": lambda: read_didemo(path),
        "activitynet": lambda: read_activitynet(path),
        "egoclip": lambda: read_egoclip(path),
        "qa": lambda: read_qa(path),
    }
    if fmt not in readers:
        raise DataError(f"unknown annotation format '{fmt}'; use one of: auto, {', '.join(FORMATS)}")
    return readers[fmt]()


def _table_opts(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.get(k) for k in ("video_col", "caption_col", "key_col", "start_col", "end_col")}
