"""Readers of the text-video retrieval datasets' released annotation files: MSR-VTT (the
annotation JSON and the 9k / 1k-A split files), WebVid, DiDeMo, ActivityNet Captions and EgoClip.
The formats and the options each serves are described in :mod:`megavid.shards.ingest.annotations`,
which dispatches to them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from megavid.errors import DataError
from megavid.shards.ingest.records import (
    Record,
    _check_captions,
    _float_or_none,
    _group,
    _load_json,
    _read_table_rows,
    missing_field,
    row_video,
)

WEBVID_TEMPLATE = "{page_dir}/{videoid}.mp4"
"""Where WebVid's download scripts and video2dataset (``--output-format files``) put a video."""


# --------------------------------------------------------------------------------------------
# MSR-VTT
# --------------------------------------------------------------------------------------------
def read_msrvtt(path: Path, split: str | None = None, split_file: str | Path | None = None) -> list[Record]:
    """MSR-VTT as released: the annotation JSON (``MSRVTT_data.json`` / ``videodatainfo.json``)
    with all its videos or those of one ``split`` (train/validate/test); or the videos of a split
    file: ``MSRVTT_train.9k.csv`` (``video_id``; the sentences come from the JSON) or
    ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``: the 1k-A test, its one
    sentence per video the query; the JSON is then optional, and ``path`` may be this file)."""
    if split and split_file:
        raise DataError("pass --split or --split-file for MSR-VTT, not both (a split file names "
                        "its videos)")
    if path.suffix.lower() == ".csv":
        if split or split_file:
            raise DataError(f"{path} is itself a split file: pass --annotations MSRVTT_data.json "
                            "with --split/--split-file, or this file alone")
        return _msrvtt_split_file(path, None)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise DataError(f"{path}: not an MSR-VTT file (no 'sentences' list); check --format")
    if split_file:
        return _msrvtt_split_file(Path(split_file), (path, data))
    videos, caps, broken = _msrvtt_index(path, data)
    if split:
        present = sorted({s for s in videos.values() if isinstance(s, str)})
        if split not in present:
            raise DataError(f"{path} has no split '{split}' (its splits: {', '.join(present) or 'none'}); "
                            "pass one of them to --split")
    out = []
    for vid, sp in videos.items():
        where = f"{path.name} video {vid}"
        if split and sp is None:
            out.append(missing_field(vid, where, "split"))  # in no split: reported, not dropped
        elif not split or sp == split:
            rec = Record(video=vid, captions=caps.get(vid, []), extra={"split": sp} if sp else {})
            out.append(_check_captions(rec, where))
    return out + _broken_of(broken, {r.video for r in out})


def _broken_of(broken: list[Record], videos: set[str]) -> list[Record]:
    """The broken entries a run reports: those of its videos, and those of no known video."""
    return [b for b in broken if not b.video or b.video in videos]


def _msrvtt_index(path: Path, data: dict) -> tuple[dict[str, str | None], dict[str, list], list[Record]]:
    """The videos of an MSR-VTT JSON in file order with their split, their sentences, and a
    ``missing_field`` record per entry without ``video_id`` / ``caption``."""
    videos: dict[str, str | None] = {}
    broken: list[Record] = []
    for i, v in enumerate(data.get("videos") or []):
        vid = v.get("video_id") if isinstance(v, dict) else None
        if not isinstance(vid, str) or not vid:
            broken.append(missing_field("", f"{path.name} videos[{i}]", "video_id"))
            continue
        videos.setdefault(vid, v.get("split"))
    caps: dict[str, list] = {}
    for i, s in enumerate(data["sentences"]):
        s = s if isinstance(s, dict) else {}
        vid = s.get("video_id")
        ids = ([f"sen_id {s['sen_id']}"] if "sen_id" in s else []) + ([str(vid)] if vid else [])
        where = f"{path.name} sentences[{i}]" + (f" ({', '.join(ids)})" if ids else "")
        gap = "video_id" if not vid else "caption" if s.get("caption") is None else ""
        blank = not gap and isinstance(s["caption"], str) and not s["caption"].strip()
        if gap or blank:
            broken.append(missing_field(str(vid or ""), where, gap or "caption", "empty" if blank else "no"))
            continue
        caps.setdefault(str(vid), []).append(s["caption"])
        videos.setdefault(str(vid), None)  # a video known only from its sentences
    return videos, caps, broken


def _msrvtt_split_file(path: Path, ann: tuple[Path, dict] | None) -> list[Record]:
    """The videos of a split file: with a ``sentence`` column one sample per video with its
    sentences from the file (1k-A), else the listed videos with the JSON's sentences (9k)."""
    rows, cols = _read_table_rows(path, {"video_id"}, "an MSR-VTT split file (MSRVTT_train.9k.csv: "
                                  "video_id; MSRVTT_JSFUSION_test.csv: key,vid_key,video_id,sentence)")
    with_text = "sentence" in cols
    if ann is None and not with_text:
        raise DataError(f"{path} lists videos only; pass --annotations MSRVTT_data.json "
                        f"--split-file {path.name} (the sentences are in the JSON)")
    videos: dict[str, str | None] = {}
    caps: dict[str, list] = {}
    broken: list[Record] = []
    json_name = ann[0].name if ann else ""
    if ann is not None:
        videos, caps, broken = _msrvtt_index(*ann)
        listed = dict.fromkeys((r.get("video_id") or "").strip() for r in rows)
        unknown = [v for v in listed if v and v not in videos]
        if unknown:
            raise DataError(f"{path} names videos that {json_name} does not have ({', '.join(unknown[:3])}"
                            f"{f', ... {len(unknown)} in all' if len(unknown) > 3 else ''}); check that "
                            "both files are MSR-VTT's")
    out: list[Record] = []
    for i, row in enumerate(rows, start=2):
        where = f"{path.name}:{i}"
        vid, gap = row_video(row, where, column="video_id")
        if gap:
            out.append(missing_field("", where, gap))
        elif with_text:  # the file's own sentence: the 1k-A query
            out.append(_check_captions(Record(video=vid, captions=[row.get("sentence")], line=i),
                                       f"{where} ({vid})", "sentence"))
        else:
            sp = videos[vid]
            rec = Record(video=vid, captions=caps.get(vid, []), extra={"split": sp} if sp else {}, line=i)
            out.append(_check_captions(rec, f"{json_name} video {vid}"))
    if with_text:
        return _group(out)  # the sentences of one video in one sample
    return out + _broken_of(broken, {r.video for r in out})


# --------------------------------------------------------------------------------------------
# WebVid
# --------------------------------------------------------------------------------------------
def read_webvid(path: Path, path_template: str | None = None) -> list[Record]:
    """WebVid's released ``results_*.csv`` (``videoid, contentUrl, duration, page_dir, name``;
    the 10M files add ``page_idx``), read unchanged: one sample per row keyed by ``videoid``,
    ``name`` as its caption.

    Video paths are relative to ``--videos`` (make-shards requires it with annotations):
    ``{page_dir}/{videoid}.mp4``, the tree WebVid's download scripts and video2dataset's
    ``files`` output write, or ``--path-template``; a video not at that path is still found as
    ``<videoid>.<ext>`` anywhere under ``--videos`` (a flat download folder works too). A row
    with an empty ``videoid`` or ``page_dir`` is counted as ``missing_field``."""
    template = path_template or WEBVID_TEMPLATE
    need = {"videoid", "name"} | (set() if path_template else {"page_dir"})
    rows, _ = _read_table_rows(path, need, "a WebVid CSV (videoid, contentUrl, duration, page_dir, name)",
                               template)
    out = []
    for i, row in enumerate(rows, start=2):
        vid = (row.get("videoid") or "").strip()
        where = f"{path.name}:{i}" + (f" (videoid {vid})" if vid else "")
        video, gap = row_video(row, where, template)
        gap = gap or ("" if vid else "videoid")
        if gap:
            out.append(missing_field(vid, where, gap))
            continue
        out.append(_check_captions(Record(video=video, captions=[row.get("name")], key=vid, line=i),
                                   where, "name"))
    return out


# --------------------------------------------------------------------------------------------
# Paragraph datasets and windows
# --------------------------------------------------------------------------------------------
def read_didemo(path: Path) -> list[Record]:
    """DiDeMo moments -> one paragraph sample per video (segments kept as metadata); a moment
    without a ``description`` is counted as ``missing_field``."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: not a DiDeMo file (expected a list of moments); check --format")
    by_video: dict[str, list[dict]] = {}
    broken = []
    for i, m in enumerate(data):
        if not isinstance(m, dict) or "video" not in m:
            raise DataError(f"{path}[{i}]: a DiDeMo moment needs 'video' and 'description'")
        if m.get("description") is None:
            broken.append(missing_field(str(m["video"]), f"{path.name}[{i}] ({m['video']})", "description"))
            continue
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
            segments.append({"start": s, "end": e, "caption": m["description"]})
        out.append(_paragraph(video, [m["description"] for m in moments], segments,
                              f"{path.name} {video}", "description"))
    return out + broken


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
        segs = [{"start": float(t[0]), "end": float(t[1]), "caption": s.strip() if isinstance(s, str) else s}
                for t, s in zip(ann.get("timestamps", []), sents)]
        out.append(_paragraph(video, sents, segs, f"{path.name} {video}", "sentences"))
    return out


def _paragraph(video: str, sents: list[Any], segments: list[dict], where: str, field: str) -> Record:
    """One sample whose caption is its sentences joined (flagged when one is not text)."""
    if any(not isinstance(s, str) for s in sents):
        return _check_captions(Record(video=video, captions=[s for s in sents if not isinstance(s, str)]),
                               where, field)
    text = " ".join(s.strip() for s in sents if s.strip())
    return _check_captions(Record(video=video, captions=[text], extra={"segments": segments}), where, field)


def read_egoclip(path: Path, path_template: str | None = None) -> list[Record]:
    """EgoClip narrations: one windowed sample per narration (``#C`` markers removed)."""
    rows, _ = _read_table_rows(path, {"video_uid", "clip_start", "clip_end", "clip_text"},
                               "an EgoClip file", path_template)
    out = []
    for i, row in enumerate(rows, start=2):
        uid = (row.get("video_uid") or "").strip()
        key = f"{uid}_{row.get('narration_ind') or i}"
        where = f"{path.name}:{i} ({key})"
        video, gap = row_video(row, where, path_template, "video_uid")
        if gap:
            out.append(missing_field(uid, where, gap))
            continue
        caption = re.sub(r"^\s*#\w+\s*", "", row["clip_text"] or "")
        out.append(_check_captions(Record(
            video=video, captions=[caption], key=key,
            start=_float_or_none(row["clip_start"], f"{path}:{i}"),
            end=_float_or_none(row["clip_end"], f"{path}:{i}"), line=i,
        ), where, "clip_text"))
    return out
