"""Probe and fully decode a video with PyAV: the validation every video passes before a shard.

DALI fails a whole pipeline on one corrupt sample, so a video is only written to a shard
after *every* frame decoded here. Failures are classified into short, stable reason strings
(they key the ``failures`` counters of shard stats) by :class:`VideoProbeError`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import av

from megavid.video_io import open_input

# Reasons (stable strings: they are the keys of the failure counters in stats files).
REASON_MISSING = "missing_file"
REASON_EMPTY = "zero_length"
REASON_UNREADABLE = "unreadable_container"
REASON_NO_VIDEO = "no_video_stream"
REASON_DECODE = "decode_error"
REASON_NO_FRAMES = "no_frames"
REASON_TRUNCATED = "truncated"


class VideoProbeError(Exception):
    """A video that cannot be used; ``reason`` is one of the ``REASON_*`` strings."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(kw_only=True, slots=True)
class VideoInfo:
    """What a full decode of a video found."""

    duration: float
    """Seconds (decoded frames / fps when the container does not say)."""
    fps: float
    width: int
    height: int
    codec: str
    """FFmpeg decoder name of the stream: 'vp9', 'h264', 'mjpeg', ..."""
    num_frames: int
    """Frames actually decoded (0 when probed with ``decode=False``)."""
    container_duration: float | None = None
    """Duration the container claims, if any (for truncation checks)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(src: str | os.PathLike | bytes) -> av.container.InputContainer:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoProbeError(REASON_EMPTY, "0 bytes")
        fobj: Any = src
    else:
        path = Path(src)
        if not path.is_file():
            raise VideoProbeError(REASON_MISSING, str(path))
        if path.stat().st_size == 0:
            raise VideoProbeError(REASON_EMPTY, str(path))
        fobj = str(path)
    try:
        return open_input(fobj)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoProbeError(REASON_UNREADABLE, str(e)) from e


def probe_video(
    src: str | os.PathLike | bytes,
    *,
    decode: bool = True,
    on_frame: Callable[[av.VideoFrame, av.video.stream.VideoStream], None] | None = None,
) -> VideoInfo:
    """Probe a video (path or encoded bytes) and, by default, decode every frame.

    Args:
        src: a file path or the encoded file's bytes.
        decode: decode all frames (the validation DALI needs); ``False`` only reads headers.
        on_frame: called with each decoded frame and the stream, so that a transcoder can
            reuse the validation decode instead of decoding the video a second time.

    Raises:
        VideoProbeError: with ``reason`` naming why the video is unusable.
    """
    container = _open(src)
    try:
        if not container.streams.video:
            raise VideoProbeError(REASON_NO_VIDEO, "the file has no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        container_duration = None
        # how far the decoded span may fall short of the declared duration: the stream's own
        # duration is exact; the container's may include a longer audio track
        slack = 0.0
        if stream.duration is not None and stream.time_base is not None:
            container_duration = float(stream.duration * stream.time_base)
            slack = max(2.0 / fps if fps else 0.1, 0.05 * container_duration)
        elif container.duration is not None:
            container_duration = container.duration / 1e6  # AV_TIME_BASE units
            slack = max(1.0, 0.1 * container_duration)
        num_frames = 0
        width, height = cc.width, cc.height
        last_pts: Fraction | None = None
        if decode:
            # Count decoded frames; any decoder error (corrupt or cut-off bitstream) rejects it.
            try:
                for frame in container.decode(stream):
                    if on_frame is not None:
                        on_frame(frame, stream)
                    num_frames += 1
                    width, height = frame.width, frame.height
                    if frame.pts is not None and frame.time_base is not None:
                        last_pts = frame.pts * frame.time_base
            except (av.error.FFmpegError, ValueError) as e:
                raise VideoProbeError(REASON_DECODE, f"after {num_frames} frames: {e}") from e
            if num_frames == 0:
                raise VideoProbeError(REASON_NO_FRAMES, "no frame decoded")
            if fps <= 0 and last_pts is not None and last_pts > 0:
                fps = (num_frames - 1) / float(last_pts)
            # A file cut short decodes "fine" up to the cut: compare the decoded span with the
            # duration the container header promised (header written before the cut).
            if container_duration and fps > 0 and last_pts is not None:
                decoded_span = float(last_pts) + 1.0 / fps
                start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
                if decoded_span - start < container_duration - slack:
                    raise VideoProbeError(
                        REASON_TRUNCATED,
                        f"decoded {decoded_span - start:.2f}s of {container_duration:.2f}s",
                    )
        if not width or not height:
            raise VideoProbeError(REASON_NO_VIDEO, "stream has no frame size")
        if decode:
            duration = num_frames / fps if fps > 0 else float(container_duration or 0.0)
        else:
            duration = float(container_duration or 0.0)
        return VideoInfo(
            duration=round(duration, 6),
            fps=round(fps, 6),
            width=int(width),
            height=int(height),
            codec=cc.name,
            num_frames=num_frames,
            container_duration=None if container_duration is None else round(container_duration, 6),
        )
    finally:
        container.close()
