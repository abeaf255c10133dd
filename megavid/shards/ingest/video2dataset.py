"""``make-shards --from-video2dataset DIR``: ingest the output of video2dataset.

video2dataset (github.com/iejMac/video2dataset, webdataset output) writes ``NNNNN.tar`` files
with ``{key}.mp4`` (or another video extension), ``{key}.json`` (its metadata: ``url``,
``key``, ``status``, ``caption``, sizes, ``yt_meta_dict``, ...) and ``{key}.txt`` (the
caption), plus ``NNNNN_stats.json`` (``count``, ``successes``, ``failed_to_download``,
``failed_to_subsample``, ``status_dict``) and ``NNNNN.parquet`` per shard.

Its tars are not ready for DALI: no index files, and nothing guarantees that every video
decodes (DALI fails a whole pipeline on one bad sample). Ingest plans one make-shards task per
video member; a worker reads the member's bytes from the tar by offset, and the usual path
validates it by a full decode (optionally transcodes it) and the writer produces our shards
(sorted deterministic tars, ``.idx``, stats, ``index.jsonl``). Samples without a video member
or a caption, unreadable tars and duplicate keys are counted by reason, never fatal.

The video2dataset stats are summed into the summary (``video2dataset``: downloads that failed
before ingest). The ``.parquet`` files repeat the JSON members; they are not read (that would
need pyarrow, which megavid does not depend on).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from megavid.errors import DataError
from megavid.shards.format import VIDEO_EXTS, scan_tar
from megavid.shards.ingest.options import REASON_DUPLICATE, MakeShardsOptions, Task, sanitize_key
from megavid.shards.ingest.probe import REASON_MISSING
from megavid.shards.ingest.records import REASON_NO_CAPTION, Record, _check_captions
from megavid.shards.writer import SampleFailure

REASON_BAD_TAR = "unreadable_tar"
REASON_BAD_JSON = "bad_json"
_V2D_STATS_FIELDS = ("count", "successes", "failed_to_download", "failed_to_subsample")


def read_video2dataset_stats(src: Path) -> dict[str, Any]:
    """Sum of the video2dataset ``NNNNN_stats.json`` counters (``shards`` = files read)."""
    total: dict[str, Any] = {k: 0 for k in _V2D_STATS_FIELDS}
    total["shards"] = 0
    status: dict[str, int] = {}
    for p in sorted(src.glob("*_stats.json")):
        try:
            st = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue  # reported as missing from the sum; the videos themselves are what count
        total["shards"] += 1
        for k in _V2D_STATS_FIELDS:
            if isinstance(st.get(k), int):
                total[k] += st[k]
        for k, v in (st.get("status_dict") or {}).items():
            if isinstance(v, int):
                status[k] = status.get(k, 0) + v
    total["status_dict"] = dict(sorted(status.items()))
    return total


def plan_video2dataset(src: str | Path, opts: MakeShardsOptions) -> tuple[list[Task | SampleFailure], dict]:
    """Tasks for every video member of the video2dataset tars in ``src`` (sorted by tar name,
    then member order), plus the summed video2dataset stats.

    Args:
        src: the video2dataset output folder.
        opts: the make-shards options (codec, size, shard format apply to each video).

    Raises:
        DataError: ``src`` is not a folder or holds no ``.tar`` file.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"video2dataset folder '{src}' does not exist; pass --from-video2dataset DIR")
    tars = sorted(p for p in src.glob("*.tar") if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise DataError(f"'{src}' holds no .tar files; point --from-video2dataset at video2dataset's output folder")
    items: list[Task | SampleFailure] = []
    seen: set[str] = set()
    for tar in tars:
        try:
            scanned = scan_tar(tar)
        except (tarfile.TarError, OSError, EOFError):
            items.append(SampleFailure(source=str(tar), reason=REASON_BAD_TAR))
            continue
        with open(tar, "rb") as f:
            for key, bundle in scanned:
                members = {ext: (off, size) for ext, off, size, _ in bundle}
                source = f"{tar}:{key}"
                meta: dict[str, Any] = {}
                if "json" in members:
                    f.seek(members["json"][0])
                    try:
                        meta = json.loads(f.read(members["json"][1]))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        items.append(SampleFailure(source=source + ".json", reason=REASON_BAD_JSON))
                        continue
                    if not isinstance(meta, dict):
                        items.append(SampleFailure(source=source + ".json", reason=REASON_BAD_JSON))
                        continue
                caption: Any = meta.get("caption")
                if "txt" in members:
                    f.seek(members["txt"][0])
                    try:
                        caption = f.read(members["txt"][1]).decode("utf-8")
                    except UnicodeDecodeError:
                        caption = None
                rec = _check_captions(Record(video=key, captions=[caption]))
                vexts = sorted(e for e in members if e.lower() in VIDEO_EXTS)
                if rec.error:
                    items.append(SampleFailure(source=source, reason=rec.error or REASON_NO_CAPTION))
                    continue
                if not vexts:
                    items.append(SampleFailure(source=source, reason=REASON_MISSING))
                    continue
                skey = sanitize_key(key)
                vext = vexts[0]
                if skey in seen:
                    items.append(SampleFailure(source=f"{source}.{vext}", reason=REASON_DUPLICATE))
                    continue
                seen.add(skey)
                extra = {"video2dataset": {k: v for k, v in meta.items() if k not in ("caption", "key")}}
                off, size = members[vext]
                items.append(Task(
                    key=skey, path=str(tar), source=f"{source}.{vext}", captions=rec.captions,
                    start=None, end=None, extra=extra, codec=opts.codec, short_side=opts.short_side,
                    max_fps=opts.max_fps, shard_format=opts.shard_format, fps=opts.fps,
                    quality=opts.quality, gop=opts.gop, member=(off, size, vext),
                ))
    return items, read_video2dataset_stats(src)
