"""PyAV (FFmpeg) CPU decoding of the frames a clip needs, with seeking.

:func:`decode_clip` converts timestamps to frame indices (:mod:`megavid.data.sampling`), seeks
to the keyframe at or before the first wanted frame and decodes forward only as far as the last
wanted frame, so a short clip out of a long video costs one GOP plus the clip, not the whole
file. Frames are identified by their presentation timestamp, so B-frame reordering and seeking
give exactly the frames a full decode from the start gives (tests check this).
"""

from __future__ import annotations

import io
import os

import av
import numpy as np

from megavid.data.sampling import timestamps_to_indices
from megavid.errors import DataError

# Seeking costs a demuxer/decoder flush; below this many frames into the video it is cheaper
# (and safer for files with a broken index) to decode from the start.
_SEEK_MIN_FRAMES = 8


def _open(data: bytes | str | os.PathLike) -> av.container.InputContainer:
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    return av.open(src, mode="r", metadata_errors="ignore")


def probe_video(data: bytes | str | os.PathLike) -> dict:
    """Container-level facts of a video: fps, num_frames (estimated when not stored), size.

    Args:
        data: the encoded file's bytes, or a path.
    """
    try:
        with _open(data) as container:
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
) -> np.ndarray:
    """Decode the frames nearest to ``timestamps`` (seconds from the first frame).

    Args:
        data: the encoded file's bytes (a shard member), or a path.
        timestamps: float array [T] from :func:`megavid.data.sampling.sample_timestamps`.
        fps: frame rate of the video (sample JSON ``fps``); None reads it from the container.
        num_video_frames: frames in the video (sample JSON ``num_frames``), for clamping; None
            reads the container's count or estimates it from duration x fps.
        threads: FFmpeg decoder threads. Fixed (default 1) because the loader already runs
            one decoder per worker process; FFmpeg's default (one per core) oversubscribes.

    Returns:
        uint8 array [T, H, W, 3] (RGB). A timestamp past the last decodable frame gets the last
        frame (truncated tail), so T is always ``len(timestamps)``.

    Raises:
        DataError: the data is not a decodable video (no stream, no frame decodes).
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    try:
        with _open(data) as container:
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
            return _decode_indices(container, stream, indices, rate)
    except av.FFmpegError as e:
        raise DataError(f"cannot decode video: {e}") from e


def _decode_indices(container, stream, indices: np.ndarray, fps: float) -> np.ndarray:
    tb = float(stream.time_base)
    t0 = stream.start_time or 0  # pts of frame 0, in stream time base
    wanted = set(int(i) for i in indices)
    first, last = min(wanted), max(wanted)

    def frame_index(frame) -> int:
        pts = frame.pts if frame.pts is not None else frame.dts
        return int(np.floor((pts - t0) * tb * fps + 0.5))

    def run(seek_to: int | None) -> dict[int, np.ndarray] | None:
        """Decode forward from the keyframe at or before frame ``seek_to`` (None: no seek)."""
        if seek_to is not None:
            container.seek(t0 + int(seek_to / fps / tb), stream=stream, backward=True,
                           any_frame=False)
        got: dict[int, np.ndarray] = {}
        latest, latest_i = None, -1  # the last frame seen: stands in for a truncated tail
        for n, frame in enumerate(container.decode(stream)):
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

    got = run(first if first >= _SEEK_MIN_FRAMES else None)
    if got is None:
        got = run(0)
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


IMAGE_EXTS = ("jpg", "jpeg", "png")
"""Shard member extensions of image samples (``{key}.jpg`` + ``{key}.json``)."""


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
