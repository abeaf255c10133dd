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
- ``queryd``: QuerYD as released with the collaborative-experts features
  (``structured-symlinks/raw_captions_combined_filtered-v2.pkl``: ``{video_id: [[token, ...],
  ...]}``, one token list per description sentence; the same mapping as JSON is accepted, and
  so are plain-text captions). ``--split train`` keeps the ids of ``train_list.txt`` beside it.
  One sample per video, its sentences as captions. The pickle is read with an unpickler that
  only builds dicts, lists and strings (a pickle can otherwise run code).
- ``condensed_movies``: Condensed Movies ``metadata/descriptions.csv`` (``videoid``,
  ``imdbid``, ``duration``, ``description``; ``caption`` is accepted for ``description``): one
  sample per clip, the clip description as caption. An ``upload_year`` column (as in
  ``metadata/clips.csv`` merged in) makes the video path ``<upload_year>/<videoid>`` (the
  released ``videos/<year>/<videoid>.mkv`` tree); otherwise the file is found by its id.
- ``epic_kitchens``: Epic-Kitchens-100 ``EPIC_100_train.csv``/``EPIC_100_validation.csv``
  (``narration_id, participant_id, video_id, narration_timestamp, start_timestamp,
  stop_timestamp`` (``HH:MM:SS.ff``), ``start_frame, stop_frame, narration, verb, verb_class,
  noun, noun_class, all_nouns, all_noun_classes``): one sample per narration, keyed by
  ``narration_id``, a window ``start``/``end`` inside the long video ``<video_id>`` (not cut),
  the narration as caption, and ``verb``/``verb_class``/``noun``/``noun_class``/``all_nouns``/
  ``all_noun_classes``/``participant_id``/``narration_id`` in the sample JSON (train with
  ``task.cls.label_field=verb_class`` or ``noun_class``).
- ``charades_ego``: Charades-Ego ``CharadesEgo_v1_train.csv``/``_test.csv`` (``id, subject,
  scene, quality, relevance, verified, script, objects, descriptions, actions, length``; later
  columns such as ``egocentric``/``charades_video`` are kept as metadata): one sample per video
  ``<id>``, captions = ``descriptions`` then ``script``, ``labels`` = the sorted class numbers of
  ``actions`` (``c092 11.90 21.20;c147 0.00 12.60`` -> ``[92, 147]``, multi-label), and one
  ``segments`` entry per action: ``{"start", "end", "label", "class_id", "caption"}``.
- ``classification``: single-label lists: ``path,label`` CSV (header optional; a header names
  ``path``/``video``/... and ``label``), or ``path label`` lines (Kinetics ``*_list_videos.txt``,
  UCF-101 ``trainlist01.txt``; a line with only a path, as in UCF's ``testlist01.txt``, takes
  its class folder as the label). The sample JSON gets ``label`` (an int when the file writes a
  number, else the class name) and the class name (or the folder name) as caption.
- ``multilabel``: ``path,l1;l2`` CSV (or ``path,l1,l2,...``) and ``path l1 l2 ...`` lines: the
  sample JSON gets ``labels`` (a list; ints where the file writes numbers).

Official layouts followed: QuerYD as repackaged by github.com/albanie/collaborative-experts
(the QuerYD release, robots.ox.ac.uk/~vgg/data/queryd); github.com/m-bain/CondensedMovies
(``metadata/``); github.com/epic-kitchens/epic-kitchens-100-annotations; Charades-Ego v1
(prior.allenai.org/projects/charades-ego, ``CharadesEgo.zip``); mmaction2's Kinetics video
lists and UCF-101's ``ucfTrainTestlist``.

Classification jobs read ``label``/``labels`` (``task.cls.label_field``), so these formats write
exactly those fields. ``--path-template`` (csv/tsv, classification CSVs) builds the video path
from a row's columns with :meth:`str.format`, e.g. WebVid's ``{page_dir}/{videoid}.mp4``.

Problems with the whole file (missing, unreadable, not the declared format, a mapped column
that does not exist) raise :class:`DataError` before any video is touched; problems with a
single record (no caption, a caption that is not text) are kept on the record as ``error``
so that make-shards counts them with the other failures.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable

from megavid.errors import DataError
from megavid.shards.ingest.dataset_annotations import (
    _EK100_COLS,
    read_charades_ego,
    read_condensed_movies,
    read_epic_kitchens,
    read_label_list,
    read_queryd,
)
from megavid.shards.ingest.records import (
    _CAPTION_COLS,
    _VIDEO_COLS,
    Record,
    _check_captions,
    _float_or_none,
    _group,
    _load_json,
    _read_text,
    apply_path_template,
    check_path_template,
)

FORMATS = ("csv", "tsv", "jsonl", "json", "msrvtt", "didemo", "activitynet", "egoclip", "qa",
           "queryd", "condensed_movies", "epic_kitchens", "charades_ego", "classification",
           "multilabel")


def read_table(path: Path, *, delimiter: str, video_col: str | None = None,
               caption_col: str | None = None, key_col: str | None = None,
               start_col: str | None = None, end_col: str | None = None,
               path_template: str | None = None) -> list[Record]:
    """CSV/TSV with a header row; columns picked by name (or common defaults).

    ``path_template`` (e.g. WebVid's ``{page_dir}/{videoid}.mp4``) builds the video path from
    the row's columns instead of reading it from ``video_col``."""
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    cols = reader.fieldnames or []
    if not cols:
        raise DataError(f"annotation file '{path}' has no header row; add one naming the columns")
    if path_template:
        check_path_template(path_template, cols, path)

    def pick(given: str | None, defaults: tuple[str, ...], what: str, flag: str) -> str | None:
        if given:
            if given not in cols:
                raise DataError(f"{path}: no column '{given}' for {what} (columns: {', '.join(cols)}); fix {flag}")
            return given
        return next((c for c in defaults if c in cols), None)

    vcol = pick(video_col, _VIDEO_COLS, "the video", "--video-col")
    ccol = pick(caption_col, _CAPTION_COLS, "the caption", "--caption-col")
    if (vcol is None and not path_template) or ccol is None:
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
            video=apply_path_template(path_template, row, (row.get(vcol) or "").strip() if vcol else "", where),
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
        head = {c.strip() for c in next(csv.reader([_read_text(path).split("\n", 1)[0]]), [])}
        if _EK100_COLS <= head:
            return "epic_kitchens"
        if {"id", "actions", "descriptions", "script"} <= head:
            return "charades_ego"
        if "videoid" in head and "description" in head:
            return "condensed_movies"
        return "csv"
    if suffix in (".pkl", ".pickle"):
        return "queryd"
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
        **options: ``video_col``, ``caption_col``, ``key_col``, ``start_col``, ``end_col``,
            ``path_template`` (csv/tsv; the template also for classification CSVs) and
            ``split`` (msrvtt, queryd).

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
        "queryd": lambda: read_queryd(path, options.get("split")),
        "condensed_movies": lambda: read_condensed_movies(path),
        "epic_kitchens": lambda: read_epic_kitchens(path),
        "charades_ego": lambda: read_charades_ego(path),
        "classification": lambda: read_label_list(path, multilabel=False,
                                                  path_template=options.get("path_template")),
        "multilabel": lambda: read_label_list(path, multilabel=True,
                                              path_template=options.get("path_template")),
    }
    if fmt not in readers:
        raise DataError(f"unknown annotation format '{fmt}'; use one of: auto, {', '.join(FORMATS)}")
    return readers[fmt]()


def _table_opts(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.get(k) for k in ("video_col", "caption_col", "key_col", "start_col", "end_col",
                                        "path_template")}
