"""The frames writer of ``make-shards --shard-format frames``: the source frames on screen at a
fixed rate, resized and stored as baseline JPEGs (layout: :mod:`megavid.shards.format`,
``docs/data.md``).

Why: DALI's ``fn.decoders.video`` costs ~85 ms per sample on an H100 (~12 clips/s), while the
same frames stored as JPEG and decoded by ``fn.decoders.image`` (device "mixed", hardware JPEG
engines) feed ~2,000 clips/s (measured on an H100).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from megavid.errors import DataError
from megavid.shards.format import (
    FRAME_TOLERANCE,
    FRAMES_CODEC,
    FRAMES_FORMAT,
    MAX_STORED_FRAMES,
    get_frame_ext,
)
from megavid.shards.ingest.transcode import _out_size

DEFAULT_QUALITY = 90


def encode_jpeg(rgb_HWC: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """Baseline JPEG (4:2:0, no progressive: what nvJPEG's hardware engines decode) of an RGB
    uint8 image; libjpeg is deterministic, so the same frame gives the same bytes.

    Args:
        rgb_HWC: uint8 [H, W, 3].
        quality: libjpeg quality 1..100.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb_HWC, "RGB").save(buf, format="JPEG", quality=int(quality),
                                         subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


class FrameExtractor:
    """``probe_video(..., on_frame=extractor)`` callback that keeps the source frames on screen
    at ``start + k / fps`` (k = 0, 1, ...) inside the window, resized and JPEG-encoded.

    Storing the *source* frame (not an interpolation) means each stored frame is a real
    frame of the video, at the time ``frame_times`` records (source index / source fps).

    Args:
        fps: stored frames per second (0, or at least the source rate: every source frame).
        short_side: downscale so the short side is this (0: keep; never upscales).
        quality: JPEG quality.
        start: window start in seconds (None: 0).
        end: window end in seconds (None: the end of the video).
    """

    def __init__(self, *, fps: float, short_side: int = 0, quality: int = DEFAULT_QUALITY,
                 start: float | None = None, end: float | None = None) -> None:
        if fps < 0:
            raise DataError(f"--fps {fps} must be >= 0 (0 keeps every source frame)")
        if not 1 <= quality <= 100:
            raise DataError(f"--quality {quality} must be in 1..100")
        self.fps, self.short_side, self.quality = float(fps), int(short_side), int(quality)
        self.start = 0.0 if start is None else max(0.0, float(start))
        self.end = math.inf if end is None else float(end)
        self.i = 0  # source frame index
        self.k = 0  # next target
        self.jpegs: list[bytes] = []
        self.src_indices: list[int] = []
        self.src_fps = 0.0
        self.size: tuple[int, int] = (0, 0)
        self.error: Exception | None = None

    def _wanted(self, i: int, src_fps: float) -> bool:
        # frame i is on screen during [i, i + 1) / src_fps (format.FRAME_TOLERANCE)
        first = math.floor(self.start * src_fps + FRAME_TOLERANCE)
        if i < first or i / src_fps >= self.end:
            return False
        if self.fps <= 0 or self.fps >= src_fps:
            return True
        keep = False
        # targets are visited in order; target k is the frame on screen at t_k
        while True:
            tk = self.start + self.k / self.fps
            if tk >= self.end:
                return keep
            j = math.floor(tk * src_fps + FRAME_TOLERANCE)
            if j > i:
                return keep
            keep = keep or j == i
            self.k += 1

    def __call__(self, frame: Any, stream: Any) -> None:
        if self.error is not None:
            return
        try:
            if not self.src_fps:
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                self.src_fps = float(rate) if rate else 0.0
                if self.src_fps <= 0:
                    raise DataError("the video has no frame rate")
                self.size = _out_size(frame.width, frame.height, self.short_side)
            i = self.i
            self.i += 1
            if not self._wanted(i, self.src_fps):
                return
            if len(self.jpegs) >= MAX_STORED_FRAMES:
                raise DataError(f"more than {MAX_STORED_FRAMES} frames to store")
            w, h = self.size
            rgb = frame.reformat(width=w, height=h, format="rgb24",
                                 interpolation="AREA").to_ndarray()
            self.jpegs.append(encode_jpeg(rgb, self.quality))
            self.src_indices.append(i)
        except Exception as e:  # noqa: BLE001 - reported by finish(), not as a decode failure
            self.error = e

    def finish(self) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The frame members ``{ext: jpeg}`` and the frame facts for the sample JSON."""
        if self.error is not None:
            raise self.error
        if not self.jpegs:
            raise DataError("no frame falls inside the window")
        stored_fps = self.src_fps if self.fps <= 0 else min(self.fps, self.src_fps)
        members = {get_frame_ext(j): b for j, b in enumerate(self.jpegs)}
        facts = {
            "format": FRAMES_FORMAT, "codec": FRAMES_CODEC, "num_frames": len(self.jpegs),
            "fps": stored_fps, "width": self.size[0], "height": self.size[1],
            "frame_times": [round(i / self.src_fps, 6) for i in self.src_indices],
            "quality": self.quality,
        }
        return members, facts
