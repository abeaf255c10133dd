"""The options of ``megavid make-shards`` and the per-video task they plan, with the shard-key
rules (keys derived from video names and windows)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megavid.shards.format import MAX_KEY_LEN, VIDEO_EXTS
from megavid.shards.ingest.frames import DEFAULT_QUALITY
from megavid.shards.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT

REASON_DUPLICATE = "duplicate_key"
REASON_TRANSCODE = "transcode_error"
REASON_BAD_WINDOW = "bad_window"
CODECS = ("keep", "h264", "vp9", "mjpeg")
SHARD_FORMATS = ("video", "frames")


@dataclass(kw_only=True, slots=True)
class MakeShardsOptions:
    """Everything a make-shards run depends on (recorded in ``<out>/make_shards.json``)."""

    videos: str
    """Folder holding the videos (annotation paths are relative to it)."""
    annotations: str
    out: str
    format: str = "auto"
    video_col: str | None = None
    caption_col: str | None = None
    key_col: str | None = None
    start_col: str | None = None
    end_col: str | None = None
    split: str | None = None
    """MSR-VTT: only the videos of this split (train/validate/test); QuerYD: the ids of
    ``<split>_list.txt`` beside the captions."""
    split_file: str | None = None
    """MSR-VTT: only the videos of this released split file (``MSRVTT_train.9k.csv``, or
    ``MSRVTT_JSFUSION_test.csv``: the 1k-A test with its one sentence per video)."""
    codec: str = "keep"
    short_side: int = 0
    """Resize so the short side is at most this (0: keep)."""
    max_fps: float = 0.0
    """Drop frames so the frame rate is at most this (0: keep)."""
    max_count: int = DEFAULT_MAX_COUNT
    max_bytes: int = DEFAULT_MAX_BYTES
    workers: int = 2
    shard_format: str = "video"
    """'video' (one encoded video member) or 'frames' (JPEG frame members, for DALI's JPEG
    decoder; see docs/data.md)."""
    fps: float = 8.0
    """Frames shards: stored frames per second (0: every source frame)."""
    quality: int = DEFAULT_QUALITY
    """Frames shards: JPEG quality."""
    gop: int = 0
    """Video shards: re-encode with a keyframe every this many frames (0: encoder default;
    with codec keep the source's codec is re-encoded). Short GOPs make PyAV decode only the
    GOPs of the sampled frames (bench/loader_gpu.py measures it)."""
    path_template: str | None = None
    """Video path from an entry's columns, e.g. ``{page_dir}/{videoid}.mp4`` (the formats with
    per-row columns; :data:`megavid.shards.ingest.annotations.OPTION_FORMATS`)."""
    chunk_seconds: float = 0.0
    """Cut videos into re-encoded chunks of at most this many seconds (0: no chunking)."""
    from_video2dataset: str = ""
    """Ingest this video2dataset output folder instead of ``videos`` + ``annotations``."""


@dataclass(kw_only=True, slots=True)
class Task:
    """One video to process (picklable: sent to a worker)."""

    key: str
    path: str
    source: str
    captions: list[str]
    start: float | None
    end: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    codec: str = "keep"
    short_side: int = 0
    max_fps: float = 0.0
    shard_format: str = "video"
    fps: float = 8.0
    quality: int = DEFAULT_QUALITY
    gop: int = 0
    chunk_index: int = -1
    """Chunking: which chunk of the video this task makes (-1: the whole video)."""
    chunk_first: int = 0
    """Chunking: the chunk's first source frame index."""
    chunk_stop: int = -1
    """Chunking: one past the chunk's last source frame (-1: to the end of the video)."""
    chunk_seconds: float = 0.0
    timed: list[dict[str, Any]] = field(default_factory=list)
    """Chunking: the video's windows/segments in source time, ``{"start", "end", ...}``."""
    member: tuple[int, int, str] | None = None
    """Ingest: the video is ``(offset, size, extension)`` inside the tar at ``path``."""


def make_key(video: str, start: float | None = None, end: float | None = None) -> str:
    """A shard key from a video name (+ window): dots/slashes become '_', long keys hashed."""
    stem = video
    suffix = Path(video).suffix
    if suffix.lstrip(".").lower() in VIDEO_EXTS:
        stem = video[: -len(suffix)]
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem).strip("_") or "video"
    if start is not None or end is not None:
        key += f"_{int(round((start or 0) * 1000))}_{'' if end is None else int(round(end * 1000))}"
    return sanitize_key(key)


def sanitize_key(key: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        key = f"{key[: MAX_KEY_LEN - 13]}_{digest}"
    return key
