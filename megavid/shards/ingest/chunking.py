"""Chunking long videos for ``make-shards --chunk-seconds N`` (EgoVLPv2 uses 600 s).

Each video is cut into chunks of at most N seconds, each its own sample ``<key>_cNNN``: chunk
i holds the source frames whose time ``index / fps`` lies in ``[i N, (i + 1) N)``.

Chunks are always re-encoded (``--codec keep`` re-encodes to the source's codec, H.264 for
others): a stream copy could only cut at keyframes, and the chunk boundaries must be exact
frame times. A chunk decodes only its own frames, from the keyframe before its start (seek), so
a long video is decoded about once in total and its chunks run in parallel workers; together
the chunk decodes validate every frame, and each chunk's own file is decoded again before it
is written.

Windows that overlap a chunk (narrations, DiDeMo/ActivityNet moments, Charades-Ego actions) go
into its ``segments``, re-based to the chunk's time and clipped to it, with their source times
(``source_start``/``source_end``); the chunk's captions are those of its windows (or, with none,
the video's own captions). The sample JSON's ``chunk`` holds ``index``, ``seconds``,
``source_start``/``source_end`` (seconds in the source), ``first_frame`` and
``num_source_frames``.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from megavid.shards.ingest.options import (
    REASON_BAD_WINDOW,
    REASON_TRANSCODE,
    MakeShardsOptions,
    Task,
    make_key,
    sanitize_key,
)
from megavid.shards.ingest.probe import (
    REASON_DECODE,
    REASON_TRUNCATED,
    REASON_UNREADABLE,
    VideoProbeError,
    probe_video,
)
from megavid.shards.ingest.records import Record
from megavid.shards.ingest.transcode import _SOURCE_TO_CODEC, Transcoder
from megavid.shards.writer import SampleFailure, ShardSample
from megavid.video_io import open_input

REASON_CHUNK_NO_TEXT = "chunk_without_text"


def get_chunk_bounds(num_frames: int, fps: float, chunk_seconds: float) -> list[tuple[int, int]]:
    """Source frame ranges ``[first, stop)`` of the chunks of a video: chunk i holds the frames
    whose time ``index / fps`` lies in ``[i * chunk_seconds, (i + 1) * chunk_seconds)``.

    Args:
        num_frames: frames of the video (its duration x fps, from the header).
        fps: the video's frame rate.
        chunk_seconds: the longest chunk.
    """
    per = chunk_seconds * fps
    bounds = []
    i = 0
    while True:
        first = math.ceil(i * per - 1e-6)
        if first >= num_frames:
            return bounds or [(0, num_frames)]
        bounds.append((first, min(num_frames, math.ceil((i + 1) * per - 1e-6))))
        i += 1


def decode_frame_range(path: str | os.PathLike, first: int, stop: int,
                       on_frame: Any) -> tuple[list[int], float]:
    """Decode the source frames ``first <= index < stop`` (``stop`` -1: to the end), seeking to
    the keyframe before ``first``; ``on_frame(frame, stream)`` is called for each of them.

    A frame's index is ``round((pts * time_base - stream start) * fps)``: the index a decode from
    the start would give it (constant frame rate), whatever keyframe the seek landed on.

    Returns:
        (the decoded frame indices, fps).

    Raises:
        VideoProbeError: the file does not open or a frame does not decode.
    """
    try:
        container = open_input(path)
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoProbeError(REASON_UNREADABLE, str(e)) from e
    indices: list[int] = []
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate)
        t0 = stream.start_time or 0
        tb = stream.time_base
        if first > 0:
            # seek target in stream time_base units; backward=True lands on the keyframe at or
            # before it, and the frames before `first` are decoded and dropped
            container.seek(t0 + int(Fraction(first) / Fraction(fps).limit_denominator(100000) / tb),
                           stream=stream, backward=True, any_frame=False)
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise VideoProbeError(REASON_DECODE, "a frame without a timestamp")
                i = round(float((frame.pts - t0) * tb) * fps)
                if i < first:
                    continue
                if 0 <= stop <= i:
                    break
                on_frame(frame, stream)
                indices.append(i)
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoProbeError(REASON_DECODE, f"after {len(indices)} frames: {e}") from e
    finally:
        container.close()
    return indices, fps


def _rebase(item: dict[str, Any], lo: float, hi: float) -> dict[str, Any] | None:
    """A window in source time -> chunk time (clipped to [lo, hi)), or None if outside."""
    s, e = item.get("start"), item.get("end")
    s = 0.0 if s is None else float(s)
    e = hi if e is None else float(e)
    if e <= lo or s >= hi:
        return None
    out = {k: v for k, v in item.items() if k not in ("start", "end")}
    out.update(start=round(max(s, lo) - lo, 6), end=round(min(e, hi) - lo, 6),
               source_start=s, source_end=e)
    return out


def process_chunk(task: Task) -> ShardSample | SampleFailure:
    """One chunk of a video: decode its frames, re-encode them, attach the windows inside."""
    head = probe_video(task.path, decode=False)
    codec = task.codec if task.codec != "keep" else _SOURCE_TO_CODEC.get(head.codec, "h264")
    transcoder = Transcoder(codec, short_side=task.short_side, max_fps=task.max_fps, gop=task.gop)
    indices, fps = decode_frame_range(task.path, task.chunk_first, task.chunk_stop, transcoder)
    want_stop = task.chunk_stop if task.chunk_stop >= 0 else round(head.duration * fps)
    # a chunk must hold all its frames: a gap or a short end means a cut or corrupt file
    # (the last chunk gets the slack probe_video allows a whole video)
    slack = 0 if task.chunk_stop >= 0 else max(2, int(0.05 * head.duration * fps))
    if not indices or indices[0] != task.chunk_first or indices[-1] + 1 < want_stop - slack:
        return SampleFailure(source=f"{task.source}#c{task.chunk_index}",
                             reason=REASON_TRUNCATED if indices else REASON_BAD_WINDOW)
    lo, hi = indices[0] / fps, (indices[-1] + 1) / fps
    segments = [r for r in (_rebase(t, lo, hi) for t in task.timed) if r is not None]
    captions = [c for sg in segments for c in sg.get("captions", [sg.get("caption")]) if isinstance(c, str)]
    if not captions:
        captions = list(task.captions)
    if not captions:
        return SampleFailure(source=f"{task.source}#c{task.chunk_index}", reason=REASON_CHUNK_NO_TEXT)
    try:
        video, ext = transcoder.finish(), transcoder.ext
    except Exception as e:  # noqa: BLE001 - an encoder failure is this chunk's failure
        return SampleFailure(source=task.source, reason=f"{REASON_TRANSCODE}:{type(e).__name__}")
    info = probe_video(video, decode=True)  # validate what goes into the shard
    meta: dict[str, Any] = {
        "key": task.key, "captions": captions, "duration": info.duration, "fps": info.fps,
        "num_frames": info.num_frames, "width": info.width, "height": info.height,
        "codec": info.codec, "source": task.source, "start": None, "end": None,
    }
    meta.update(task.extra)
    if "labels" in task.extra and any("label" in sg for sg in segments + task.timed):
        # multi-label videos with labelled windows (Charades-Ego): the labels of this chunk
        meta["labels"] = sorted({sg["label"] for sg in segments if "label" in sg})
    if task.gop > 0 and codec != "mjpeg":
        meta["gop"] = task.gop  # as in make_shards._process: the keyframe interval
    meta["segments"] = segments
    meta["chunk"] = {"index": task.chunk_index, "seconds": task.chunk_seconds,
                     "source_start": round(lo, 6), "source_end": round(hi, 6),
                     "first_frame": indices[0], "num_source_frames": len(indices)}
    meta["original"] = {k: getattr(head, k) for k in ("width", "height", "fps", "codec")}
    meta["original"]["duration"] = head.duration
    return ShardSample(key=task.key, video=video, ext=ext, meta=meta, source=task.source)


def plan_chunks(path: Path, key: str, whole: list[Record], windowed: list[Record],
                 opts: MakeShardsOptions) -> list[Task | SampleFailure]:
    """The chunk tasks of one video (its records grouped), from a header probe."""
    try:
        head = probe_video(path, decode=False)
    except VideoProbeError as e:
        return [SampleFailure(source=str(path), reason=e.reason)]
    if head.fps <= 0 or head.duration <= 0:
        return [SampleFailure(source=str(path), reason=REASON_BAD_WINDOW)]
    timed: list[dict[str, Any]] = []
    for r in windowed:
        item = {"key": r.key or make_key(r.video, r.start, r.end), "start": r.start, "end": r.end,
                "captions": list(r.captions)}
        item.update(r.extra)
        timed.append(item)
    captions: list[str] = []
    extra: dict[str, Any] = {}
    for r in whole:
        captions += [c for c in r.captions if c not in captions]
        for k, v in r.extra.items():
            if k == "segments" and isinstance(v, list):
                timed += [dict(sg) for sg in v if isinstance(sg, dict)]  # DiDeMo/ANet/Charades
            else:
                extra.setdefault(k, v)
    tasks: list[Task | SampleFailure] = []
    bounds = get_chunk_bounds(round(head.duration * head.fps), head.fps, opts.chunk_seconds)
    for i, (first, stop) in enumerate(bounds):
        tasks.append(Task(
            key=sanitize_key(f"{key}_c{i:03d}"), path=str(path), source=str(path),
            captions=captions, start=None, end=None, extra=extra, codec=opts.codec,
            short_side=opts.short_side, max_fps=opts.max_fps, gop=opts.gop, chunk_index=i,
            chunk_first=first,
            chunk_stop=stop if i < len(bounds) - 1 else -1, chunk_seconds=opts.chunk_seconds,
            timed=timed,
        ))
    return tasks
