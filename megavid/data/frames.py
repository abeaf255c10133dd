"""Reading frames shards (JPEG frames per clip; the layout is :mod:`megavid.shards.format`'s):
which stored frame each sampled timestamp takes, and the PIL JPEG decode of the PyAV loader's
workers (the DALI loaders decode with ``fn.decoders.image``).

A frames sample JSON keeps the *source video's* ``duration``, ``start`` and ``end``, so
:func:`megavid.data.sampling.sample_timestamps` draws the same timestamps as it does for a
video shard of the same source and seed; then each timestamp takes the stored frame on screen
at that time (:func:`frames_at`: the last stored frame at or before it, as
:func:`megavid.data.sampling.timestamps_to_indices` takes the source frame).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from megavid.data.sampling import get_sample_rng, sample_timestamps
from megavid.errors import DataError
from megavid.shards.format import FRAME_TOLERANCE, get_frame_times


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a JPEG (PIL: the PyAV loader's decoder of frames shards)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def frames_at(frame_times: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Index of the stored frame on screen at each timestamp: the last one stored at or before
    it (the first for a timestamp before every stored frame), as
    :func:`megavid.data.sampling.timestamps_to_indices` picks source frames.

    Args:
        frame_times: increasing float [n] stored frame times.
        ts: float [T] timestamps.
    """
    ts = np.asarray(ts, dtype=np.float64)
    # the tolerance is in seconds here: frame_times are stored to 1e-6 s
    idx = np.searchsorted(frame_times, ts + FRAME_TOLERANCE, side="right") - 1
    return np.clip(idx, 0, len(frame_times) - 1).astype(np.int64)


def sample_clip_frames(meta: dict[str, Any], index: int, *, num_frames: int, train: bool,
                       seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The timestamps the video path samples for this sample, and the stored frames on screen
    at them.

    The draws are the video path's (``megavid.data.dali.plan.plan_clip`` and the PyAV loader): the
    sample's "frames" generator and :func:`sample_timestamps` over the source ``duration`` and
    window, so a frames shard and a video shard of the same source give the same timestamps.

    Args:
        meta: the frames sample JSON.
        index: the sample's global index.
        num_frames: frames per clip.
        train: random segment offsets (True) or centres.
        seed: run seed.
        epoch: epoch.

    Returns:
        (timestamps float64 [T], stored frame indices int64 [T]).
    """
    try:
        duration = float(meta["duration"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"sample {meta.get('key')!r}: JSON lacks duration ({e}); re-create the "
                        "shards with megavid") from e
    rng = get_sample_rng(seed, epoch, index, "frames") if train else None
    ts = sample_timestamps(num_frames, duration, start=meta.get("start"), end=meta.get("end"),
                           train=train, rng=rng)
    return ts, frames_at(get_frame_times(meta), ts)
