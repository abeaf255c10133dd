"""Annotation readers for ``megavid make-shards``: one format in, a list of records out.

Every reader returns :class:`Record` objects in a deterministic order (the file's order,
grouped by video and window), which fixes the sample order of the shards. Supported:

- ``csv`` / ``tsv``: one caption per row; ``--video-col``/``--caption-col``/``--key-col``/
  ``--start-col``/``--end-col`` map the columns (rows of the same video and window merge
  into one sample with several captions).
- ``jsonl``: one object per line with ``video`` and ``caption`` or ``captions`` (optional
  ``key``, ``start``, ``end``, ``qa``, ``label``, ``labels``); a JSON list of the same objects
  is read by ``json``.
- ``msrvtt``: MSR-VTT's ``MSRVTT_data.json`` / ``videodatainfo.json`` (``videos``: ``video_id``,
  ``split`` train/validate/test; ``sentences``: ``video_id``, ``caption``, ``sen_id``): one sample
  per video with all its sentences; ``--split`` keeps one split (the official 6513/497/2990).
  ``--split-file`` keeps the videos of a released split file instead: ``MSRVTT_train.9k.csv``
  (a ``video_id`` column; the sentences from the JSON) or ``MSRVTT_JSFUSION_test.csv``
  (``key,vid_key,video_id,sentence``: the 1k-A test, one sample per video whose caption is the
  file's sentence, the 1k-A query). The JSFUSION file carries its own text, so it may also be
  the ``--annotations`` file alone. Videos are ``<video_id>.mp4`` (found anywhere under
  ``--videos``: ``MSRVTT/videos/all`` or the ``TrainValVideo``/``TestVideo`` folders).
- ``webvid``: WebVid's ``results_2M_train.csv`` / ``results_2M_val.csv`` / ``results_10M_*.csv``
  (``videoid, contentUrl, duration, page_dir, name``) read unchanged: key ``videoid``, caption
  ``name``, video ``{page_dir}/{videoid}.mp4`` under ``--videos`` (see
  :func:`~megavid.shards.ingest.retrieval_annotations.read_webvid`). Not auto-detected: ``auto``
  reads the file as ``csv`` (video ``videoid``, caption ``name``, keyed by the video path).
- ``didemo``: DiDeMo moments (``video``, ``description``, ``times`` in 5 s units): one
  paragraph sample per video, the moments kept as ``segments`` metadata.
- ``activitynet``: ActivityNet Captions (``{video: {duration, timestamps, sentences}}``):
  one paragraph sample per video with ``segments``.
- ``egoclip``: EgoClip narrations (EgoVLP's ``egoclip.csv``, tab-separated: ``video_uid``,
  ``clip_start``, ``clip_end``, ``clip_text``, ``narration_ind``): one sample per narration, the
  clip window stored as ``start``/``end`` (the loader samples inside it; the video is not cut).
- ``qa``: question-answer JSON list (``video``/``video_id``, ``question``, ``answer``,
  optional ``type``/``choices``/``caption``) grouped per video; the caption defaults to the
  question + answer text.
- ``msrvtt_qa`` / ``msvd_qa`` / ``activitynet_qa``: the video QA releases read unchanged
  (MSRVTT-QA ``*_qa.json``, MSVD-QA ``*_qa.json`` + ``youtube_mapping.txt``, ActivityNet-QA
  ``{split}_q.json`` + ``{split}_a.json``): question types and question ids kept, see
  :mod:`megavid.shards.ingest.qa_annotations`.
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

Official layouts followed: MSR-VTT as packaged by github.com/ArrowLuo/CLIP4Clip
(``msrvtt_data.zip``: ``MSRVTT_data.json``, ``MSRVTT_train.9k.csv``, ``MSRVTT_JSFUSION_test.csv``,
the files its ``dataloader_msrvtt_retrieval.py`` reads) with the videos of
github.com/m-bain/frozen-in-time's ``MSRVTT.zip`` (``videos/all/<video_id>.mp4``); WebVid's
``results_*.csv`` as Frozen-in-Time's ``data_loader/WebVid_dataset.py`` and video2dataset's
WebVid example read them; QuerYD as repackaged by github.com/albanie/collaborative-experts
(the QuerYD release, robots.ox.ac.uk/~vgg/data/queryd); github.com/m-bain/CondensedMovies
(``metadata/``); github.com/epic-kitchens/epic-kitchens-100-annotations; Charades-Ego v1
(prior.allenai.org/projects/charades-ego, ``CharadesEgo.zip``); mmaction2's Kinetics video
lists and UCF-101's ``ucfTrainTestlist``.

Classification jobs read ``label``/``labels`` (``task.cls.label_field``), so these formats write
exactly those fields.

Options per format (:data:`OPTION_FORMATS`; an option given to a format it does not serve is
refused with one line, never ignored). ``--path-template`` builds the video path from an
entry's columns with :meth:`str.format` (``{page_dir}/{videoid}.mp4``), so it serves the formats
whose entries are rows or objects with named fields; the others name their videos by id in a
structure without such columns:

=====================================  ===============  =========================================
format                                 --path-template  --split / --split-file
=====================================  ===============  =========================================
csv, tsv                               yes              no
jsonl, json (an object's fields)       yes              no
msrvtt                                 no (by id)       --split train|validate|test; --split-file
webvid                                 yes (default     no
                                       ``{page_dir}/
                                       {videoid}.mp4``)
didemo, activitynet                    no (by id)       no
egoclip                                yes              no
qa                                     no               no
msrvtt_qa, msvd_qa, activitynet_qa     yes              no
queryd                                 no (by id)       --split (``<split>_list.txt``)
condensed_movies, epic_kitchens,       yes              no
charades_ego
classification, multilabel             yes (a CSV with  no
                                       a header row)
=====================================  ===============  =========================================

Problems with the whole file (missing, unreadable, not the declared format, a mapped column
that does not exist, an unknown ``--split``) raise :class:`DataError` before any video is
touched; problems with a single entry (no caption, a caption that is not text, an entry
missing a field such as an MSR-VTT sentence without ``caption``) are kept on a record as
``error`` with a ``detail`` naming the entry and the field, so that make-shards counts and
reports them with the other failures (reason ``missing_field`` for an entry that lacks a field
the format needs).
"""

from __future__ import annotations

import csv
import json
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
from megavid.shards.ingest.qa_annotations import (
    detect_released_qa,
    qa_sample,
    read_activitynet_qa,
    read_msrvtt_qa,
    read_msvd_qa,
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
    check_path_template,
    missing_field,
    row_video,
)
from megavid.shards.ingest.retrieval_annotations import (
    read_activitynet,
    read_didemo,
    read_egoclip,
    read_msrvtt,
    read_webvid,
)

FORMATS = ("csv", "tsv", "jsonl", "json", "msrvtt", "webvid", "didemo", "activitynet", "egoclip",
           "qa", "msrvtt_qa", "msvd_qa", "activitynet_qa",
           "queryd", "condensed_movies", "epic_kitchens", "charades_ego", "classification",
           "multilabel")

OPTION_FORMATS: dict[str, tuple[str, ...]] = {
    "path_template": ("csv", "tsv", "jsonl", "json", "webvid", "egoclip", "msrvtt_qa", "msvd_qa",
                      "activitynet_qa", "condensed_movies", "epic_kitchens", "charades_ego",
                      "classification", "multilabel"),
    "split": ("msrvtt", "queryd"),
    "split_file": ("msrvtt",),
}
"""The formats each reader option serves (the table of the module doc); make-shards refuses an
option given to any other format rather than ignore it."""


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
        key = (row.get(kcol) or "").strip() if kcol else ""
        video, gap = row_video(row, where, path_template, vcol)
        entry = f"{path.name}:{i}" + (f" ({key or video})" if key or video else "")
        if gap:
            records.append(missing_field(video, entry, gap))
            continue
        records.append(_check_captions(Record(
            video=video,
            captions=[row.get(ccol)],
            key=key,
            start=_float_or_none(row.get(scol), where) if scol else None,
            end=_float_or_none(row.get(ecol), where) if ecol else None,
            line=i,
        ), entry, ccol))
    return _group(records)


def _from_obj(obj: Any, where: str, line: int, path_template: str | None = None) -> Record:
    """One JSON sample object; ``where`` names it (``a.jsonl:3``) in errors and failure details."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per sample, got {type(obj).__name__}")
    video = obj.get("video", obj.get("video_id", obj.get("video_path", obj.get("path"))))
    entry = f"{Path(where).name} ({obj.get('key') or video})" if obj.get("key") or video else Path(where).name
    if path_template:
        video, gap = row_video(obj, where, path_template)
        if gap:
            return missing_field(video, entry, gap)
    elif not isinstance(video, str) or not video:
        raise DataError(f"{where}: no 'video' field (the video file or id); fix the annotation")
    field = next((f for f in ("captions", "caption", "text", "sentence") if f in obj), "caption")
    caps = obj.get(field, [])
    extra = {k: obj[k] for k in ("qa", "label", "labels", "type", "split", "segments") if k in obj}
    return _check_captions(Record(
        video=video,
        captions=caps if isinstance(caps, list) else [caps],
        key=str(obj.get("key", "") or ""),
        start=_float_or_none(obj.get("start"), where),
        end=_float_or_none(obj.get("end"), where),
        extra=extra,
        line=line,
    ), entry, field)


def read_jsonl(path: Path, path_template: str | None = None) -> list[Record]:
    records = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e}); check --format") from e
        records.append(_from_obj(obj, f"{path}:{i}", i, path_template))
    return _group(records)


def read_json_list(path: Path, path_template: str | None = None) -> list[Record]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples; check --format")
    return _group([_from_obj(o, f"{path}[{i}]", i + 1, path_template) for i, o in enumerate(data)])


def read_qa(path: Path) -> list[Record]:
    """A QA JSON list -> one sample per video holding all its QA pairs (``choices`` and a
    question id ``qid`` kept when given)."""
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
        qa.update({k: q[k] for k in ("choices", "qid") if k in q})
        recs.append(qa_sample(str(video), qa, i + 1, q.get("caption")))
    return _group(recs)


def detect_format(path: Path) -> str:
    """Guess the format from the extension and (for JSON) the top-level shape."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        first = _read_text(path).split("\n", 1)[0]
        if "\t" in first and "clip_text" in first and "video_uid" in first:
            return "egoclip"  # EgoVLP's egoclip.csv is tab-separated
        head = {c.strip() for c in next(csv.reader([first]), [])}
        if _EK100_COLS <= head:
            return "epic_kitchens"
        if {"id", "actions", "descriptions", "script"} <= head:
            return "charades_ego"
        if "videoid" in head and "description" in head:
            return "condensed_movies"
        if head == {"video_id"} or {"vid_key", "video_id", "sentence"} <= head:
            return "msrvtt"  # MSRVTT_train.9k.csv / MSRVTT_JSFUSION_test.csv
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
            released_qa = detect_released_qa(path, data[0])
            if released_qa:
                return released_qa
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
            (csv/tsv), and ``path_template``, ``split``, ``split_file`` for the formats of
            :data:`OPTION_FORMATS`.

    Raises:
        DataError: the file is missing, unreadable, or not in the format, or an option is
            given to a format it does not apply to.
    """
    path = Path(path)
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(path)
    for opt, fmts in OPTION_FORMATS.items():
        if options.get(opt) and fmt in FORMATS and fmt not in fmts:
            flag = "--" + opt.replace("_", "-")
            raise DataError(f"{flag} does not apply to --format {fmt}"
                            + (f" (detected from {path.name})" if detected else "")
                            + f"; it serves: {', '.join(fmts)}")
    template = options.get("path_template")
    readers: dict[str, Callable[[], list[Record]]] = {
        "csv": lambda: read_table(path, delimiter=",", **_table_opts(options)),
        "tsv": lambda: read_table(path, delimiter="\t", **_table_opts(options)),
        "jsonl": lambda: read_jsonl(path, template),
        "json": lambda: read_json_list(path, template),
        "msrvtt": lambda: read_msrvtt(path, options.get("split"), options.get("split_file")),
        "webvid": lambda: read_webvid(path, template),
        "didemo": lambda: read_didemo(path),
        "activitynet": lambda: read_activitynet(path),
        "egoclip": lambda: read_egoclip(path, template),
        "qa": lambda: read_qa(path),
        "msrvtt_qa": lambda: read_msrvtt_qa(path, template),
        "msvd_qa": lambda: read_msvd_qa(path, template),
        "activitynet_qa": lambda: read_activitynet_qa(path, template),
        "queryd": lambda: read_queryd(path, options.get("split")),
        "condensed_movies": lambda: read_condensed_movies(path, template),
        "epic_kitchens": lambda: read_epic_kitchens(path, template),
        "charades_ego": lambda: read_charades_ego(path, template),
        "classification": lambda: read_label_list(path, multilabel=False, path_template=template),
        "multilabel": lambda: read_label_list(path, multilabel=True, path_template=template),
    }
    if fmt not in readers:
        raise DataError(f"unknown annotation format '{fmt}'; use one of: auto, {', '.join(FORMATS)}")
    return readers[fmt]()


def _table_opts(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.get(k) for k in ("video_col", "caption_col", "key_col", "start_col", "end_col",
                                        "path_template")}
