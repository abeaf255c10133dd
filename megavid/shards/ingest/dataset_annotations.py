"""Readers of dataset-specific annotation files (QuerYD, Condensed Movies, Epic-Kitchens-100,
Charades-Ego, classification and multi-label lists); the formats are described in
:mod:`megavid.shards.ingest.annotations`, which dispatches to them."""

from __future__ import annotations

import ast
import csv
import io
import pickle
import re
from pathlib import Path
from typing import Any

from megavid.errors import DataError
from megavid.shards.ingest.records import (
    REASON_NO_LABEL,
    Record,
    _check_captions,
    _float_or_none,
    _load_json,
    _read_table_rows,
    _read_text,
    check_path_template,
    missing_field,
    row_video,
)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: a pickle can name any callable, and an
    annotation file must never run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an annotation pickle")


def read_queryd(path: Path, split: str | None = None) -> list[Record]:
    """QuerYD ``raw_captions_combined_filtered*.pkl`` (or the same mapping as JSON):
    ``{video_id: [[token, ...], ...]}`` -> one sample per video, a caption per sentence."""
    if path.suffix.lower() in (".pkl", ".pickle"):
        if not path.is_file():
            _read_text(path)  # raises the "does not exist / not a file" error
        try:
            data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            raise DataError(f"{path}: not a QuerYD caption pickle ({e}); check --format") from e
    else:
        data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a QuerYD caption file (expected {{video_id: sentences}}); check --format")
    keep: set[str] | None = None
    if split:
        split_file = path.parent / f"{split}_list.txt"
        if not split_file.is_file():
            present = sorted(p.name[: -len("_list.txt")] for p in path.parent.glob("*_list.txt"))
            raise DataError(f"QuerYD has no split '{split}' beside {path.name} (no {split_file.name}; "
                            f"splits there: {', '.join(present) or 'none'}); pass one of them to --split")
        keep = {ln.strip() for ln in _read_text(split_file).splitlines() if ln.strip()}
    out = []
    for vid, sents in data.items():
        if keep is not None and vid not in keep:
            continue
        caps: list[Any] = []
        for s in sents if isinstance(sents, list) else [sents]:
            if isinstance(s, list) and all(isinstance(t, str) for t in s):
                caps.append(" ".join(t.strip() for t in s if t.strip()))  # a token list
            else:
                caps.append(s)  # a string, or something _check_captions rejects
        extra = {"split": split} if split else {}
        out.append(_check_captions(Record(video=str(vid), captions=caps, extra=extra),
                                   f"{path.name} {vid}", "sentences"))
    return out


def read_condensed_movies(path: Path, path_template: str | None = None) -> list[Record]:
    """Condensed Movies ``descriptions.csv``: one sample per clip (``videoid``)."""
    text_cols = ("description", "caption")
    rows, cols = _read_table_rows(path, {"videoid"}, "a Condensed Movies metadata CSV", path_template)
    tcol = next((c for c in text_cols if c in cols), None)
    if tcol is None:
        raise DataError(f"{path}: no 'description' (or 'caption') column; check --format")
    out = []
    for i, row in enumerate(rows, start=2):
        vid = (row.get("videoid") or "").strip()
        where = f"{path.name}:{i}" + (f" ({vid})" if vid else "")
        video, gap = row_video(row, where, path_template, "videoid")
        if gap:
            out.append(missing_field(vid, where, gap))
            continue
        year = (row.get("upload_year") or "").strip()
        if year.endswith(".0"):  # pandas-written years
            year = year[:-2]
        extra = {k: row[k].strip() for k in ("imdbid", "title", "clip_name")
                 if row.get(k) and row[k].strip()}
        if year:
            extra["upload_year"] = year
        out.append(_check_captions(Record(
            video=f"{year}/{vid}" if year and not path_template else video, captions=[row.get(tcol)],
            key=vid, extra=extra, line=i), where, tcol))
    return out


def parse_timestamp(value: str, where: str) -> float:
    """``HH:MM:SS.ff`` (Epic-Kitchens) or plain seconds -> seconds."""
    parts = (value or "").strip().split(":")
    try:
        secs = 0.0
        for part in parts:
            secs = secs * 60 + float(part)
        if len(parts) > 3 or not parts[-1]:
            raise ValueError(value)
        return secs
    except ValueError as e:
        raise DataError(f"{where}: timestamp {value!r} is not HH:MM:SS.ff; fix the annotation file") from e


def _literal(value: str) -> Any:
    """A Python literal column (EK-100 ``all_nouns`` = ``['door', 'tap']``), else the text."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _int_or_str(value: str) -> int | str:
    value = value.strip()
    return int(value) if re.fullmatch(r"-?\d+", value) else value


_EK100_COLS = {"narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
               "narration", "verb", "verb_class", "noun", "noun_class"}


def read_epic_kitchens(path: Path, path_template: str | None = None) -> list[Record]:
    """EPIC_100_{train,validation}.csv: one windowed sample per narration (the video is not cut)."""
    rows, _ = _read_table_rows(path, _EK100_COLS, "an Epic-Kitchens-100 CSV", path_template)
    out = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        entry = f"{path.name}:{i} ({row['narration_id'].strip()})"
        video, gap = row_video(row, entry, path_template, "video_id")
        if gap:
            out.append(missing_field(video, entry, gap))
            continue
        extra: dict[str, Any] = {
            "narration_id": row["narration_id"].strip(), "participant_id": row["participant_id"].strip(),
            "verb": row["verb"].strip(), "noun": row["noun"].strip(),
        }
        for k in ("verb_class", "noun_class"):
            v = _int_or_str(row[k] or "")
            if not isinstance(v, int):
                raise DataError(f"{where}: {k} {row[k]!r} is not an integer; fix the annotation file")
            extra[k] = v
        for k in ("all_nouns", "all_noun_classes"):
            if row.get(k):
                extra[k] = _literal(row[k])
        for k in ("start_frame", "stop_frame"):
            if (row.get(k) or "").strip().isdigit():
                extra[k] = int(row[k])
        out.append(_check_captions(Record(
            video=video, captions=[row["narration"]], key=row["narration_id"].strip(),
            start=parse_timestamp(row["start_timestamp"], where),
            end=parse_timestamp(row["stop_timestamp"], where), extra=extra, line=i), entry, "narration"))
    return out


CHARADES_CLASS_ID = re.compile(r"c\d+")
"""A Charades class id (``c092``): in the ``actions`` of an annotation row and at the start of
each line of the class list (``c092 Holding some clothes``)."""


def parse_charades_actions(actions: str, where: str) -> list[tuple[str, float, float]]:
    """``c092 11.90 21.20;c147 0.00 12.60`` -> [(class id, start s, end s), ...]."""
    out = []
    for part in (actions or "").split(";"):
        if not part.strip():
            continue
        fields = part.split()
        if len(fields) != 3 or not CHARADES_CLASS_ID.fullmatch(fields[0]):
            raise DataError(f"{where}: action {part.strip()!r} is not 'cNNN start end'; fix the annotation file")
        out.append((fields[0], _float_or_none(fields[1], where) or 0.0, _float_or_none(fields[2], where) or 0.0))
    return out


def read_charades_ego(path: Path, path_template: str | None = None) -> list[Record]:
    """CharadesEgo_v1_{train,test}.csv: one multi-label sample per video with action windows."""
    rows, cols = _read_table_rows(path, {"id", "script", "descriptions", "actions"}, "a Charades-Ego CSV",
                                path_template)
    meta_cols = [c for c in cols if c not in ("id", "script", "descriptions", "actions", "objects")]
    out = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        entry = f"{path.name}:{i}" + (f" ({row['id'].strip()})" if (row["id"] or "").strip() else "")
        video, gap = row_video(row, entry, path_template, "id")
        if gap:
            out.append(missing_field(video, entry, gap))
            continue
        actions = parse_charades_actions(row["actions"], where)
        segments = [{"start": s, "end": e, "label": int(c[1:]), "class_id": c} for c, s, e in actions]
        extra: dict[str, Any] = {"labels": sorted({int(c[1:]) for c, _, _ in actions}),
                                 "segments": segments}
        extra.update({c: row[c].strip() for c in meta_cols if row.get(c) and row[c].strip()})
        if row.get("objects"):
            extra["objects"] = [o for o in row["objects"].split(";") if o]
        caps = [row.get("descriptions"), row.get("script")]
        out.append(_check_captions(Record(
            video=video, captions=[c for c in caps if c and c.strip()] or [None],
            extra=extra, line=i), entry, "descriptions' or 'script"))
    return out


_LABEL_HEADER_VIDEO = ("path", "video", "video_id", "videoid", "filename", "file", "id")


def read_label_list(path: Path, *, multilabel: bool, path_template: str | None = None) -> list[Record]:
    """Classification lists (see the module doc): ``label`` or ``labels`` + a caption."""
    text = _read_text(path)
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise DataError(f"label file '{path}' is empty; check --annotations")
    is_csv = path.suffix.lower() == ".csv" or "," in lines[0][1]
    rows: list[tuple[int, str, list[str], str]] = []  # (line, video, raw labels, missing column)
    table = list(csv.reader([ln for _, ln in lines])) if is_csv else []
    header = [h.strip().lower() for h in table[0]] if table else []
    lcol = next((c for c in ("labels", "label") if c in header), None)
    if path_template and lcol is None:
        raise DataError(f"--path-template reads named columns; {path} has no header row naming them "
                        "(a CSV whose header has 'label'/'labels'): drop --path-template")
    if is_csv:
        vcol = next((c for c in _LABEL_HEADER_VIDEO if c in header), None)
        if lcol is not None:
            if vcol is None and not path_template:
                raise DataError(f"{path}: no video column (one of {', '.join(_LABEL_HEADER_VIDEO)}); "
                                "rename it or pass --path-template")
            if path_template:
                check_path_template(path_template, list(table[0]), path)
            i_v = header.index(vcol) if vcol else -1
            i_l = header.index(lcol)
            for (line, _), r in zip(lines[1:], table[1:]):
                row = dict(zip(table[0], r))
                video, gap = row_video(row, f"{path}:{line}", path_template, table[0][i_v] if vcol else None)
                raw = r[i_l] if i_l < len(r) else ""
                rows.append((line, video, re.split(r"[;|]", raw) if multilabel else [raw], gap))
        else:
            for (line, _), r in zip(lines, table):
                raw = r[1:] if multilabel else r[1:2]
                if multilabel and len(raw) == 1:
                    raw = re.split(r"[;|\s]+", raw[0])
                rows.append((line, r[0].strip(), raw, "" if r[0].strip() else "path"))
    else:
        for line, ln in lines:
            if multilabel:
                video, *raw = ln.split()
            else:
                parts = ln.rsplit(None, 1)
                # "folder/v_x.avi 12" or "folder/v_x.avi" (UCF-101 test lists: the folder is the class)
                if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
                    video, raw = parts[0].strip(), [parts[1]]
                else:
                    video = ln.strip()
                    raw = [Path(video).parent.name]
            rows.append((line, video, raw, ""))
    out = []
    for line, video, raw, gap in rows:
        where = f"{path.name}:{line}" + (f" ({video})" if video else "")
        labels = [_int_or_str(v) for v in raw if v.strip()]
        folder = Path(video).parent.name
        if gap:
            out.append(missing_field(video, where, gap))
            continue
        if not labels and not multilabel:
            out.append(Record(video=video, captions=[], error=REASON_NO_LABEL, line=line,
                              detail=f"{where}: no label"))
            continue
        # the caption: class names as text (a label file has no sentence of its own)
        names = [v for v in labels if isinstance(v, str)] or ([folder] if folder else [str(v) for v in labels])
        caption = ", ".join(n.replace("_", " ") for n in names) or None
        extra: dict[str, Any] = {"labels": labels} if multilabel else {"label": labels[0]}
        out.append(_check_captions(Record(video=video, captions=[caption], extra=extra, line=line), where, "label"))
    return out
