"""Helpers of the loader tests (tests/unit/data_loader): tiny real VP9 clips encoded with
PyAV/libvpx."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from megavid.config import DataConfig

SIZE = 32
FPS = 8
FRAMES = 8
NUM_SAMPLES = 24


def encode_video(frames_THWC: np.ndarray, fps: int, *, codec: str = "libvpx-vp9",
                 gop: int = 8, fmt: str = "webm") -> bytes:
    """Encode RGB frames into a real video file (bytes)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        if codec.startswith("libvpx"):
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "0"}
        for arr in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def sample_colour(i: int) -> int:
    """Red level of sample i: far enough apart to identify a decoded clip's sample."""
    return 16 + 9 * i


def frame_level(t: int) -> int:
    """Green level of frame t: identifies which frame of a clip was decoded."""
    return 20 + 25 * t


def make_clip(i: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    clip[..., 0] = sample_colour(i)
    for t in range(frames):
        clip[t, ..., 1] = frame_level(t)
    clip[..., 2] = 128
    return clip


def sample_meta(i: int, captions: list[str] | None = None) -> dict:
    return {
        "key": f"s{i:03d}",
        "captions": [f"clip number {i} variant {v}" for v in "abc"] if captions is None
        else captions,
        "duration": FRAMES / FPS, "fps": float(FPS), "num_frames": FRAMES,
        "width": SIZE, "height": SIZE, "codec": "vp9", "source": f"test/{i}.webm",
        "start": None, "end": None,
    }


def data_config(root: Path, **kw) -> DataConfig:
    base = dict(name="shards", root=str(root), backend="pyav", num_frames=4, img_size=SIZE,
                batch_size=3, eval_batch_size=5, num_workers=0, max_text_len=16,
                dali_device="cpu")
    base.update(kw)
    return DataConfig(**base)
