"""Frame sampling, defined in timestamps (seconds) inside an optional [start, end] window.

Every decode backend (PyAV here, DALI in ``megavid.data.dali``) turns a sample into the same
frames by calling these functions with the same random generator, so the data a model sees does
not depend on the backend:

* train: the window is cut into ``num_frames`` equal segments and one timestamp is drawn
  uniformly inside each segment (TSN-style "uniform segments with a random offset");
* eval: the centre of each segment (deterministic).

Timestamps become frame indices with :func:`timestamps_to_indices` (the frame on screen at
that time, clamped).
Per-sample randomness comes from :func:`get_sample_rng`, seeded by (seed, epoch, sample index)
and a named stream, so that a sample decodes to the same frames in any worker, rank, world size
or backend.
"""

from __future__ import annotations

import numpy as np

from megavid.errors import DataError
from megavid.shards.format import FRAME_TOLERANCE

MAX_NUM_FRAMES = 96

# Independent random streams per sample: drawing a caption must not shift the frame offsets.
RNG_STREAMS: dict[str, int] = {"frames": 0, "caption": 1, "augment": 2}


def get_sample_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """The random generator of one sample in one epoch, for one purpose.

    Args:
        seed: the run seed (``run.seed``).
        epoch: the epoch number.
        index: the sample's global index (its line in the split's ``index.jsonl`` order).
        stream: one of ``RNG_STREAMS`` ("frames", "caption", "augment").
    """
    if stream not in RNG_STREAMS:
        raise KeyError(f"unknown rng stream {stream!r}; valid: {', '.join(RNG_STREAMS)}")
    return np.random.default_rng([int(seed), int(epoch), int(index), RNG_STREAMS[stream]])


def sample_timestamps(
    num_frames: int,
    duration: float,
    *,
    start: float | None = None,
    end: float | None = None,
    train: bool,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Timestamps (seconds, float64, increasing) of ``num_frames`` frames of a clip.

    Args:
        num_frames: frames per clip, 1..96.
        duration: length of the whole video in seconds.
        start: start of the window inside the video (None: 0). Clamped to [0, duration].
        end: end of the window (None: duration). Clamped to [start, duration].
        train: random offset inside each segment (True) or segment centres (False).
        rng: the generator for the offsets; required when ``train`` is True.

    Returns:
        float64 array of shape [num_frames] with values in [start, end).
    """
    if not 1 <= num_frames <= MAX_NUM_FRAMES:
        raise DataError(f"num_frames={num_frames} must be in 1..{MAX_NUM_FRAMES}")
    if not np.isfinite(duration) or duration <= 0:
        raise DataError(f"video duration {duration!r} is not a positive number of seconds")
    lo = 0.0 if start is None else min(max(float(start), 0.0), duration)
    hi = duration if end is None else min(max(float(end), lo), duration)
    seg = (hi - lo) / num_frames  # 0 for an empty window: every timestamp is `lo`
    if train:
        if rng is None:
            raise ValueError("sample_timestamps(train=True) needs an rng")
        offsets = rng.random(num_frames)  # uniform in [0, 1)
    else:
        offsets = np.full(num_frames, 0.5)
    return lo + (np.arange(num_frames) + offsets) * seg


def timestamps_to_indices(ts: np.ndarray, fps: float, num_video_frames: int) -> np.ndarray:
    """Index of the frame on screen at each timestamp, clamped: frame i is shown during
    ``[i / fps, (i + 1) / fps)``, so ``floor(t * fps)``.

    This is what the segments of :func:`sample_timestamps` mean: a video of n frames lasts
    n / fps seconds, segment k of n equal segments is exactly frame k (train draws and eval
    centres alike), as TSN / MMAction2 sample frame indices. (Rounding to the nearest frame
    instant instead shifts every pick by half a frame: with as many segments as frames, eval
    then skips frame 0 and repeats the last, and train draws repeat and skip frames at random.)
    A tolerance of 1e-6 frame absorbs float error at exact frame boundaries.

    Args:
        ts: timestamps in seconds, relative to the first frame.
        fps: frames per second of the (constant frame rate) video.
        num_video_frames: number of frames in the video; indices are clamped to [0, n - 1].

    Returns:
        int64 array, same shape as ``ts``.
    """
    if fps <= 0:
        raise DataError(f"fps={fps!r} must be positive")
    if num_video_frames < 1:
        raise DataError(f"a video with {num_video_frames} frames has nothing to sample")
    idx = np.floor(np.asarray(ts, dtype=np.float64) * fps + FRAME_TOLERANCE).astype(np.int64)
    return np.clip(idx, 0, num_video_frames - 1)
