"""decord CPU decoding of the frames a clip needs (``data.backend=decord``), where installed.

The decord backend is the PyAV loader (:class:`megavid.data.loader.VideoTextLoader`) with
:func:`decode_clip` plugged in as its decode function: the same sample table, permutation,
cursor, sampling, transforms, batch contract and skip-and-count of failed samples. Only the
decode of the sampled frames differs: ``decord.VideoReader`` over the shard member's bytes
(a file-like ``io.BytesIO``: decord reads it through an AVIO context, no temporary file),
then ``get_batch`` of the frame indices that ``sampling.timestamps_to_indices`` gives for
the sampled timestamps, exactly the indices the PyAV backend decodes.

decord is an optional dependency (``pip install megavid[decord]``); measured here it is no
faster than the PyAV backend per core (bench/loader.py), so ``data.backend=auto`` never picks
it: it is there for users who trust its decoder or compare against it.

Import order matters: decord loads its bundled FFmpeg and libvpx with ``RTLD_GLOBAL``, and a
PyAV imported *after* it binds to that older libvpx, whose VP9 encoder then fails to open
("avcodec_open2(libvpx-vp9) returned 22"). This module imports PyAV (through
``pyav_backend``) before it imports decord, so going through it keeps both usable.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from megavid.data import pyav_backend  # noqa: F401 - PyAV before decord (see the docstring)
from megavid.data.loader import build_pyav_loader
from megavid.data.sampling import timestamps_to_indices
from megavid.errors import ConfigError, DataError


def decord_available() -> bool:
    """True when ``decord`` imports (PyAV is imported first, see the module docstring)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def get_decord_version() -> str | None:
    """The installed decord version, or None."""
    try:
        import decord
    except ImportError:
        return None
    return str(decord.__version__)


def _reader(data: bytes | str | os.PathLike, threads: int) -> Any:
    import decord

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    return decord.VideoReader(src, ctx=decord.cpu(0), num_threads=threads)


def decode_clip(
    data: bytes | str | os.PathLike,
    timestamps: np.ndarray,
    *,
    fps: float | None = None,
    num_video_frames: int | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Decode the frames on screen at ``timestamps`` with decord (``pyav_backend.decode_clip``'s
    signature and contract, so the loader takes either).

    Args:
        data: the encoded file's bytes (a shard member), or a path.
        timestamps: float array [T] from :func:`megavid.data.sampling.sample_timestamps`.
        fps: frame rate of the video (sample JSON ``fps``); None asks decord.
        num_video_frames: frames in the video (sample JSON ``num_frames``); None asks decord.
            Indices are also clamped to the frames decord finds, so a truncated tail repeats
            the last decodable frame, as in the PyAV backend.
        threads: decord decoder threads (1: the loader runs one decoder per worker process).

    Returns:
        uint8 array [T, H, W, 3] (RGB).

    Raises:
        DataError: decord is not installed, or the data is not a decodable video.
    """
    try:
        import decord  # noqa: F401
    except ImportError as e:
        raise DataError("data.backend=decord needs decord: pip install 'megavid[decord]', or "
                        "set data.backend=pyav") from e
    try:
        vr = _reader(data, threads)
        available = len(vr)
        if available < 1:
            raise DataError("no frame decodes (decord finds no frames)")
        rate = float(fps or vr.get_avg_fps() or 0)
        if rate <= 0:
            raise DataError("the video has no frame rate")
        n = min(int(num_video_frames or available), available)
        indices = timestamps_to_indices(np.asarray(timestamps, dtype=np.float64), rate, n)
        # decode each distinct frame once (a short video's clip may repeat frames)
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = vr.get_batch(unique.tolist()).asnumpy()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - decord raises RuntimeError/DECORDError from C++
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot decode video with decord: {first}") from e
    if frames.ndim != 4 or frames.shape[0] != len(unique):
        raise DataError(f"decord returned {frames.shape} for {len(unique)} frames")
    return np.ascontiguousarray(frames[inverse.reshape(-1)])


def build_decord_loader(data_cfg: Any, split: str, *, train: bool, rank: int = 0,
                        world_size: int = 1, seed: int = 0, epoch: int = 0,
                        table: Any = None) -> Any:
    """The decord loader of a split: ``build_loader``'s signature; the PyAV loader with
    :func:`decode_clip` as its decode function (image and frames samples decode as there).

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' or a shard spec.
        train: training order and augmentation, or evaluation.
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: the epoch to start in.
        table: the split's sample table, already built (None: read the split's index).

    Raises:
        ConfigError: decord is not installed.
    """
    if not decord_available():
        raise ConfigError("data.backend=decord but decord is not installed: pip install "
                          "'megavid[decord]' (or decord), or set data.backend=pyav")
    return build_pyav_loader(data_cfg, split, train=train, rank=rank, world_size=world_size,
                             seed=seed, epoch=epoch, decode_fn=decode_clip, table=table)
