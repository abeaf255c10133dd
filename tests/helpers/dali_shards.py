"""Helpers of the DALI backend tests (tests/unit/data_dali): small real VP9 (and H.264) shards
written to tmp dirs.

Videos are encoded with PyAV (libvpx-vp9 / libx264) and written with the project's shard
writer (``megavid.shards.writer.write_shards``), so the tars, ``.idx`` files and
``index.jsonl`` are the ones every loader reads. Frames are smooth gradients with a moving
bar and a per-frame brightness ramp: each frame index is identifiable, and resampling
differences between backends stay small (no high-frequency noise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NUM_FRAMES = 20
FPS = 10
WIDTH, HEIGHT = 96, 64


def render(index: int, frames: int = NUM_FRAMES, width: int = WIDTH,
           height: int = HEIGHT) -> np.ndarray:
    """uint8 [frames, H, W, 3]: a gradient background, a bar moving right, brightness that
    grows with the frame index (so frame t and t+1 differ by a known amount)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = np.stack([xx / width * 160, yy / height * 160,
                        np.full_like(xx, (index * 37) % 160)], -1) + 6.0 * t
        x0 = (8 + 4 * t + 3 * index) % (width - 12)
        img[:, x0:x0 + 12] = (250, 250 - 5 * t, 40)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_shards(out_dir: Path, n: int, *, codec: str = "vp9", max_count: int = 5,
                frames: int = NUM_FRAMES, width: int = WIDTH, height: int = HEIGHT,
                corrupt: tuple[int, ...] = ()) -> Path:
    """Write ``n`` samples into shards of ``max_count``; samples in ``corrupt`` get a video
    member whose bitstream is garbage after a valid header (DALI fails on it)."""
    from megavid.shards.synthetic import encode_clip
    from megavid.shards.writer import ShardSample, write_shards

    ext = "webm" if codec == "vp9" else "mp4"
    samples = []
    for i in range(n):
        video = encode_clip(render(i, frames, width, height), FPS, codec)
        if i in corrupt:
            # keep the container header, replace the payload: decoders choke, tar stays valid
            video = video[:64] + bytes((b * 7 + 13) % 256 for b in range(len(video) - 64))
        key = f"clip_{i:04d}"
        meta = {
            "key": key,
            "captions": [f"clip number {i} first caption", f"clip {i} second caption",
                         f"third caption of {i}"],
            "duration": frames / FPS, "fps": float(FPS), "num_frames": frames,
            "width": width, "height": height, "codec": codec, "source": f"test/{key}.{ext}",
            "start": 0.2 if i % 3 == 1 else None, "end": 1.6 if i % 3 == 1 else None,
        }
        samples.append(ShardSample(key=key, video=video, ext=ext, meta=meta, source=key))
    write_shards(samples, out_dir, max_count=max_count)
    return out_dir


def data_cfg(shards: Path, **kw):
    """A DataConfig reading ``shards`` for every split (4 frames of 32x32 by default)."""
    from megavid.config import DataConfig

    values = dict(root=str(shards.parent), train=str(shards), val=str(shards), test=str(shards),
                  num_frames=4, img_size=32, batch_size=3, eval_batch_size=4, num_workers=0,
                  max_text_len=16, dali_device="cpu")  # the GPU tests ask for device="mixed"
    values.update(kw)
    return DataConfig(**values)


def render_image(index: int, height: int = 40, width: int = 56) -> np.ndarray:
    """uint8 [H, W, 3]: smooth gradients with a per-image offset and a bright block, so a wrong
    sample, crop or flip shows while resamplers agree to a level or two."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 200, yy / height * 200,
                    np.full_like(xx, (index * 41) % 200)], -1) + 5.0 * index
    img[4:16, 6 + 3 * index:18 + 3 * index] = (240, 40, 200)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_shards(out_dir: Path, n: int, *, corrupt: tuple[int, ...] = ()) -> Path:
    """``n`` image samples (even: JPEG, odd: PNG) in shards of 4; samples in ``corrupt`` are
    PNGs whose image data is garbage after a valid header (PIL reads the size, DALI's decoder
    fails; a garbled JPEG would not do: libjpeg-turbo decodes it to noise with a warning)."""
    import io

    from PIL import Image

    from megavid.shards.writer import ShardSample, write_shards

    samples = []
    for i in range(n):
        buf = io.BytesIO()
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 and i not in corrupt else ("PNG", "png")
        Image.fromarray(render_image(i)).save(buf, format=fmt, **({"quality": 95} if
                                                                   fmt == "JPEG" else {}))
        data = buf.getvalue()
        if i in corrupt:
            cut = data.index(b"IDAT") + 12
            data = data[:cut] + bytes((b * 11 + 5) % 256 for b in range(len(data) - cut))
        key = f"img_{i:04d}"
        meta = {"key": key, "captions": [f"a photo number {i}", f"picture {i}"],
                "width": 56, "height": 40, "source": f"test/{key}.{ext}"}
        samples.append(ShardSample(key=key, video=data, ext=ext, meta=meta, source=key))
    write_shards(samples, out_dir, max_count=4)
    return out_dir
