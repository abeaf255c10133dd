"""Frames shards: clips stored as JPEG frames, for DALI's (hardware) JPEG decoder.

Why: DALI's ``fn.decoders.video`` costs ~85 ms per sample on an H100 (~12 clips/s), while the
same frames stored as JPEG and decoded by ``fn.decoders.image`` (device "mixed", hardware JPEG
engines) feed ~2,000 clips/s (DESIGN.md, "Measured on an H100"). The layout is documented in
``megavid/data/FRAMES.md``; in short, sample ``key`` of a tar holds::

    key.0000.jpg  key.0001.jpg  ...  key.NNNN.jpg   one JPEG per stored frame, in time order
    key.json                                        the sample JSON (below)

Webdataset splits member names at the first dot, so every frame is a component of the sample
``key`` with extension ``NNNN.jpg``: ``fn.readers.webdataset(ext=["0000.jpg", "0001.jpg", ...],
missing_component_behavior="empty")`` reads a sample without Python in the loop, and the
members sort (digits before letters) in time order, before the JSON.

The sample JSON keeps the *source video's* ``duration``, ``start`` and ``end``, so that
:func:`megavid.data.sampling.sample_timestamps` draws the same timestamps as it does for a
video shard of the same source and seed; then each timestamp takes the stored frame on screen
at that time (:func:`frames_at`: the last stored frame at or before it, as
:func:`megavid.data.sampling.timestamps_to_indices` takes the source frame). Frame facts: ``format`` "frames", ``codec`` "jpeg", ``num_frames``
(stored frames), ``fps`` (the stored rate), ``width``/``height`` (of the JPEGs),
``frame_times`` (seconds of each stored frame, i.e. source frame index / source fps), ``quality``,
and ``original`` (the source's width, height, fps, codec, num_frames).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from megavid.data.sampling import FRAME_TOLERANCE, get_sample_rng, sample_timestamps
from megavid.errors import DataError

FRAMES_FORMAT = "frames"
"""``format`` of a frames sample JSON (and index.jsonl entry)."""
FRAMES_CODEC = "jpeg"
"""``codec`` of a frames sample: what ``data.backend=auto`` keys on."""
FRAME_DIGITS = 4
MAX_STORED_FRAMES = 10 ** FRAME_DIGITS
"""Frames per sample the member names can number (20 min at 8 fps: cut longer videos into
windows with start/end columns)."""
DEFAULT_QUALITY = 90
_FRAME_EXT_RE = re.compile(r"^\d{%d}\.jpg$" % FRAME_DIGITS)


def get_frame_ext(i: int) -> str:
    """The member extension of stored frame ``i``: ``0000.jpg``, ``0001.jpg``, ..."""
    if not 0 <= i < MAX_STORED_FRAMES:
        raise DataError(f"frame {i} is past the {MAX_STORED_FRAMES} frames a frames sample "
                        "can hold; lower --fps or cut the video into windows (start/end)")
    return f"{i:0{FRAME_DIGITS}d}.jpg"


def get_frame_exts(n: int) -> list[str]:
    """The extensions of ``n`` stored frames (``fn.readers.webdataset``'s ``ext`` list)."""
    return [get_frame_ext(i) for i in range(n)]


def is_frame_ext(ext: str) -> bool:
    """True for a frame member extension (``NNNN.jpg``)."""
    return bool(_FRAME_EXT_RE.match(ext))


def is_frames_meta(meta: dict[str, Any]) -> bool:
    """True when a sample JSON / index entry describes a frames sample."""
    return meta.get("format") == FRAMES_FORMAT or str(meta.get("codec", "")).lower() == FRAMES_CODEC


# --------------------------------------------------------------------------------------------
# Writing (make-shards --shard-format frames)
# --------------------------------------------------------------------------------------------
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


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a JPEG (PIL; the reference and the verifier's decoder)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


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
        # frame i is on screen during [i, i + 1) / src_fps (sampling.timestamps_to_indices)
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
                from megavid.data.make_shards import _out_size

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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def get_frame_times(meta: dict[str, Any]) -> np.ndarray:
    """float64 [n] times (seconds) of the stored frames of a frames sample JSON.

    Raises:
        DataError: the JSON has no ``frame_times`` list matching ``num_frames``.
    """
    times = meta.get("frame_times")
    if not isinstance(times, list) or not times:
        raise DataError(f"frames sample {meta.get('key')!r} has no 'frame_times'; re-create the "
                        "shards with `megavid make-shards --shard-format frames`")
    out = np.asarray(times, dtype=np.float64)
    if "num_frames" in meta and int(meta["num_frames"]) != len(out):
        raise DataError(f"frames sample {meta.get('key')!r}: num_frames={meta['num_frames']} but "
                        f"{len(out)} frame_times; re-create the shards")
    return out


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

    The draws are the video path's (``megavid.data.dali.plan_clip`` and the PyAV loader): the
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


def is_frames_shard_dir(shard_dir: Any) -> bool:
    """True when a shard folder holds frames shards (its first ``index.jsonl`` entry says so)."""
    import json
    from pathlib import Path

    path = Path(shard_dir) / "index.jsonl"
    if not path.is_file():
        return False
    with open(path) as f:
        line = f.readline()
    if not line.strip():
        return False
    entry = json.loads(line)
    return is_frames_meta(entry) or any(is_frame_ext(e) for e in entry.get("members", {}))


def verify_frames_sample(where: str, meta: dict[str, Any], sample: dict[str, bytes],
                         problems: list[str], decode: bool) -> None:
    """``verify-shards`` checks of one frames sample (appends to ``problems``).

    Frame members numbered 0..n-1 without gaps, n equal to the JSON's ``num_frames`` and to its
    ``frame_times`` (increasing), every JPEG decoding (with ``decode``) to width x height.
    """
    exts = sorted(e for e in sample if is_frame_ext(e))
    if exts != get_frame_exts(len(exts)):
        problems.append(f"{where}: frame members are not numbered 0000.. without gaps")
    others = [e for e in sample if e != "json" and not is_frame_ext(e) and e != "txt"]
    if others:
        problems.append(f"{where}: unexpected members in a frames sample: {others}")
    try:
        times = get_frame_times(meta)
    except DataError as e:
        problems.append(f"{where}.json: {e}")
        return
    if len(times) != len(exts):
        problems.append(f"{where}: json lists {len(times)} frame_times, the tar holds "
                        f"{len(exts)} frames")
    if np.any(np.diff(times) <= 0):
        problems.append(f"{where}.json: frame_times are not increasing")
    if not decode:
        return
    want = (int(meta.get("height", -1)), int(meta.get("width", -1)))
    for e in exts:
        try:
            img = decode_jpeg(sample[e])
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad data
            problems.append(f"{where}.{e}: JPEG does not decode ({type(err).__name__}: {err})")
            continue
        if img.shape[:2] != want:
            problems.append(f"{where}.{e}: JPEG is {img.shape[1]}x{img.shape[0]}, json says "
                            f"{want[1]}x{want[0]}")


def get_bytes_per_clip_second(shard_dir: Any) -> float:
    """Payload bytes (video or JPEG members, not JSON) per second of clip window of a shard
    folder, from its ``index.jsonl``: the storage cost of a format."""
    from pathlib import Path

    from megavid.data.shards import read_index

    total = secs = 0.0
    for e in read_index(Path(shard_dir)):
        total += sum(size for ext, (_, size) in e["members"].items() if ext not in ("json", "txt"))
        end = e["end"] if e.get("end") is not None else e["duration"]
        secs += end - (e.get("start") or 0.0)
    if secs <= 0:
        raise DataError(f"{shard_dir}: the samples have no duration; re-create the shards")
    return total / secs
