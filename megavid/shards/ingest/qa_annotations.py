"""Video QA annotation files as released, read unchanged by ``megavid make-shards``.

Every format gives one sample per video holding all its QA pairs (sample JSON ``qa``: a list of
``{"question", "answer", "type", "qid"}``; the caption is the question + answer text). Answers
are kept as released: scoring normalises them (:func:`megavid.eval.qa.normalize_answer`).

- ``msrvtt_qa``: MSRVTT-QA ``train_qa.json``/``val_qa.json``/``test_qa.json``, a list of
  ``{"answer", "category_id", "id", "question", "video_id": int}``. Video ``N`` is the MSR-VTT
  file ``videoN`` (``TrainValVideo/videoN.mp4``, ``TestVideo/videoN.mp4``; a ``video_id`` that
  is not a number is used as the name), ``category_id`` 0..4 becomes the type what / who /
  how / when / where (the question-type order of the release paper's tables; the release
  code never names the categories), ``id`` becomes ``qid``.
- ``msvd_qa``: MSVD-QA ``*_qa.json``, a list of ``{"answer", "id", "question", "video_id":
  int}``. Video ``N`` is named by the release's ``youtube_mapping.txt`` (lines
  ``-4wsuPCjDBc_5_15 vid1``: the YouTubeClips file name, then ``vid<N>``), which must lie
  beside the annotation file as in the release folder. The release has no category field:
  the type is the question's first word when it is what / who / how / when / where, else
  ``other`` (a ``category_id``, when present, is read as for MSRVTT-QA).
- ``activitynet_qa``: ActivityNet-QA ``{split}_q.json`` (``question``, ``question_id``,
  ``video_name``) + ``{split}_a.json`` (``answer``, ``question_id``, ``type``), joined by
  ``question_id``. ``--annotations`` names either file or their common prefix
  (``dataset/train``); the other file is found beside it. The video is ``v_<video_name>``
  (ActivityNet's file names); ``type`` 0..8 becomes motion / spatial_relation /
  temporal_relation / yes_no / color / object / location / number / other, the names of the
  release's ``evaluation/eval.py``; ``question_id`` becomes ``qid``.

Layouts followed: github.com/xudejing/video-question-answering (MSRVTT-QA and MSVD-QA; its
``preprocess_*.py`` and ``run_*.py``), the loaders of github.com/thaolmk54/hcrn-videoqa
(``video{id}.mp4``, ``youtube_mapping.txt`` read as ``name vid<N>``) and
github.com/antoyang/just-ask (``preproc_*.py``), and github.com/MILVLG/activitynet-qa
(``dataset/README.md``, ``evaluation/eval.py``).

``--format auto`` tells the files apart by their fields (an MSVD-QA file only when
``youtube_mapping.txt`` lies beside it; without it the file reads as the generic ``qa`` list);
an ActivityNet-QA prefix needs ``--format activitynet_qa``.

``--path-template`` builds the video path from an entry's fields instead, e.g.
``TrainValVideo/video{video_id}.mp4`` (ActivityNet-QA: the fields of both joined entries).

An entry without its question, answer or video id (absent, empty or not text), an ActivityNet-QA
question without an answer or an answer without a question is not dropped: it becomes a failed
record counted by make-shards as ``missing_field``, reported with the entry and the field
(``test_qa.json[3] (id 17): no 'answer'``); an MSVD-QA id missing from the mapping is counted as
``unmapped_video``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from megavid.errors import DataError
from megavid.shards.ingest.records import (
    Record,
    _check_captions,
    _group,
    _load_json,
    _read_text,
    check_path_template,
    missing_field,
    row_video,
)

REASON_QA_UNMAPPED = "unmapped_video"
"""An MSVD-QA ``video_id`` that ``youtube_mapping.txt`` does not name."""

QUESTION_WORDS = ("what", "who", "how", "when", "where")
MSRVTT_QA_TYPES: dict[int, str] = dict(enumerate(QUESTION_WORDS))
"""MSRVTT-QA ``category_id`` -> question type."""
ACTIVITYNET_QA_TYPES: dict[int, str] = dict(enumerate((
    "motion", "spatial_relation", "temporal_relation", "yes_no", "color", "object", "location",
    "number", "other")))
"""ActivityNet-QA ``type`` -> name (0-2 question types, 3-8 the answer types of free questions)."""
MSVD_MAPPING = "youtube_mapping.txt"
_ID_LIST_FIELDS = ("answer", "category_id", "id", "question", "video_id")
_ANET_FIELDS = ("question", "question_id", "video_name", "answer", "type")


def qa_sample(video: str, qa: dict[str, Any], line: int, caption: Any = None) -> Record:
    """One QA pair as a record of ``video`` (make-shards groups a video's records into one
    sample); the caption defaults to the question + answer text."""
    question, answer = qa["question"], qa["answer"]
    if caption is None and isinstance(question, str) and isinstance(answer, str):
        caption = f"{question.rstrip('?').strip()}? {answer}"
    return _check_captions(Record(video=video, captions=[caption], extra={"qa": [qa]}, line=line))


def question_word_type(question: str) -> str:
    """The question's first word when it is what/who/how/when/where, else ``other``."""
    words = question.lower().split()
    return words[0] if words and words[0] in QUESTION_WORDS else "other"


def _text(entry: dict[str, Any], field: str) -> str | None:
    value = entry.get(field)
    return value if isinstance(value, str) and value.strip() else None


def _entries(path: Path, what: str) -> list[Any]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: not {what} (expected a JSON list of entries); check --format")
    return data


def _template(path_template: str | None, fields: tuple[str, ...], path: Path) -> None:
    if path_template:
        check_path_template(path_template, list(fields), path)


def _video_path(path_template: str | None, entry: dict[str, Any], default: str,
                where: str) -> tuple[str, str]:
    """(video path, the entry field it lacks or ''): ``default``, or the template filled in."""
    return row_video(entry, where, path_template) if path_template else (default, "")


def _video_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _first_gap(fields: tuple[tuple[str, str | None], ...]) -> str:
    """The name of the first (name, value) pair without a value ('' when none)."""
    return next((name for name, value in fields if value is None), "")


def _read_id_list(path: Path, fmt: str, video_of: Callable[[Any, str], str | Record],
                  path_template: str | None) -> list[Record]:
    """MSRVTT-QA / MSVD-QA: a list of {answer, id, question, video_id[, category_id]};
    ``video_of(video_id, where)`` gives the video name, or the entry's failed record."""
    _template(path_template, _ID_LIST_FIELDS, path)
    good, failed = [], []
    for i, entry in enumerate(_entries(path, f"a {fmt} file")):
        if not isinstance(entry, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object per question; check --format")
        qid = entry.get("id")
        where = f"{path.name}[{i}] (id {qid})"
        question, answer = _text(entry, "question"), _text(entry, "answer")
        video = video_of(entry.get("video_id"), where)
        if isinstance(video, Record):
            failed.append(video)
            continue
        gap = _first_gap((("question", question), ("answer", answer)))
        if not gap:
            video, gap = _video_path(path_template, entry, video, where)
        if gap:
            failed.append(missing_field(video, where, gap))
            continue
        category = entry.get("category_id")
        qtype = (MSRVTT_QA_TYPES.get(category) if isinstance(category, int) else None) \
            or question_word_type(question)
        qa = {"question": question, "answer": answer, "type": qtype, "qid": qid}
        good.append(qa_sample(video, qa, i + 1))
    return _group(good) + failed


def read_msrvtt_qa(path: Path, path_template: str | None = None) -> list[Record]:
    """MSRVTT-QA ``*_qa.json`` -> one sample per video ``video<N>`` with its QA pairs."""

    def video_of(value: Any, where: str) -> str | Record:
        n = _video_number(value)
        if n is not None:
            return f"video{n}"
        if isinstance(value, str) and value.strip():
            return value.strip()
        return missing_field("", where, "video_id")

    return _read_id_list(path, "msrvtt_qa", video_of, path_template)


def read_msvd_mapping(path: Path) -> dict[int, str]:
    """``youtube_mapping.txt`` -> {N: YouTube clip name} from lines ``<name> vid<N>``."""
    out: dict[int, str] = {}
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        m = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
        if m is None:
            raise DataError(f"{path}:{i}: expected '<youtube clip name> vid<N>', got {line.strip()!r}; "
                            "use the MSVD-QA release's youtube_mapping.txt")
        out[int(m.group(1))] = parts[0]
    return out


def read_msvd_qa(path: Path, path_template: str | None = None) -> list[Record]:
    """MSVD-QA ``*_qa.json`` -> one sample per YouTube clip (named through the release's
    ``youtube_mapping.txt`` beside the file) with its QA pairs."""
    mapping_file = path.parent / MSVD_MAPPING
    if not mapping_file.is_file():
        raise DataError(f"MSVD-QA names videos by number: put the release's {MSVD_MAPPING} "
                        f"(lines '<youtube clip name> vid<N>') beside {path}")
    mapping = read_msvd_mapping(mapping_file)

    def video_of(value: Any, where: str) -> str | Record:
        n = _video_number(value)
        if n is None:
            return missing_field("", where, "video_id")
        if n not in mapping:
            return Record(video=f"vid{n}", captions=[], error=REASON_QA_UNMAPPED,
                          detail=f"{where}: vid{n} is not in {mapping_file}")
        return mapping[n]

    return _read_id_list(path, "msvd_qa", video_of, path_template)


def activitynet_qa_files(path: Path) -> tuple[Path, Path]:
    """The (questions, answers) files of ActivityNet-QA given either file or their prefix."""
    stem = path.name
    for suffix in ("_q.json", "_a.json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return path.with_name(f"{stem}_q.json"), path.with_name(f"{stem}_a.json")


def read_activitynet_qa(path: Path, path_template: str | None = None) -> list[Record]:
    """ActivityNet-QA ``{split}_q.json`` + ``{split}_a.json`` joined by ``question_id`` -> one
    sample per video ``v_<video_name>`` with its QA pairs."""
    q_path, a_path = activitynet_qa_files(path)
    _template(path_template, _ANET_FIELDS, q_path)
    answers: dict[Any, tuple[int, dict[str, Any]]] = {}
    for i, a in enumerate(_entries(a_path, "an ActivityNet-QA answers file")):
        if not isinstance(a, dict) or "question_id" not in a:
            raise DataError(f"{a_path}[{i}]: an answer entry needs 'question_id'; check the file")
        answers.setdefault(a["question_id"], (i, a))
    good, failed, asked = [], [], set()
    for i, q in enumerate(_entries(q_path, "an ActivityNet-QA questions file")):
        if not isinstance(q, dict):
            raise DataError(f"{q_path}[{i}]: expected a JSON object per question; check --format")
        qid = q.get("question_id")
        where = f"{q_path.name}[{i}] (question_id {qid})"
        asked.add(qid)
        entry = {**q, **answers[qid][1]} if qid in answers else q
        name, question, answer = _text(q, "video_name"), _text(q, "question"), _text(entry, "answer")
        video = f"v_{name}" if name else ""
        gap = _first_gap((("video_name", name), ("question", question), ("answer", answer)))
        if not gap:
            video, gap = _video_path(path_template, entry, video, where)
        if gap:
            failed.append(missing_field(video, where, gap))
            continue
        t = entry.get("type")
        qa = {"question": question, "answer": answer,
              "type": ACTIVITYNET_QA_TYPES.get(t, "open" if t is None else str(t)), "qid": qid}
        good.append(qa_sample(video, qa, i + 1))
    for qid, (i, _) in answers.items():
        if qid not in asked:  # an answer whose question is not in the questions file
            failed.append(missing_field("", f"{a_path.name}[{i}] (question_id {qid})", "question"))
    return _group(good) + failed


def detect_released_qa(path: Path, first: dict[str, Any]) -> str | None:
    """The released QA layout a JSON list file is in, from its first entry (None: not one)."""
    keys = set(first)
    if {"video_name", "question", "question_id"} <= keys or (
            {"answer", "question_id", "type"} <= keys and "question" not in keys):
        return "activitynet_qa"
    if {"answer", "id", "question", "video_id"} <= keys:
        if "category_id" in keys:
            return "msrvtt_qa"
        if _video_number(first["video_id"]) is not None and (path.parent / MSVD_MAPPING).is_file():
            return "msvd_qa"
    return None
