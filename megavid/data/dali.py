"""NVIDIA DALI video backend: decode clips out of webdataset shards on the CPU or the GPU.

The pipeline, per batch::

    external source (encoded video bytes, frame indices, crop box, flip)   <- megavid, in Python
      -> fn.decoders.video(frames=...)      CPU: VP8/VP9/MJPEG; "mixed" (NVDEC): + H.264/HEVC/AV1
      -> fn.resize(roi_start, roi_end)      crop box and resize to img_size^2 in one resampling
      -> fn.flip(horizontal=...)            caption-aware flip, decided per sample
      -> fn.transpose(FHWC -> FCHW)         uint8 [B, T, C, H, W]

Why an external source and not ``fn.readers.webdataset``: the reader walks each rank's
contiguous slice of the samples in file order (or a buffer shuffle of its own), cannot start
at a cursor and cannot follow megavid's per-epoch permutation from (seed, epoch). The loader
contract needs both (a resumed run neither repeats nor skips a sample, whatever the world
size) and needs the frames, crop and flip that the PyAV backend draws from the same per-sample
generators (:mod:`megavid.data.sampling`, :mod:`megavid.data.transforms`). So megavid plans each
batch in Python (cheap: a seek and a read per sample, the shard's ``index.jsonl`` gives the
member offsets; the ``NNNNN.idx`` files describe the same offsets) and DALI does the expensive
part: decoding, resampling, flipping. ``fn.decoders.video``'s ``frames`` argument takes per-sample
frame indices, so no frame is decoded into the batch that the clip does not use.

DALI has no per-sample error handling: one corrupt video fails the whole batch, and the
pipeline is unusable afterwards. :class:`DaliLoader` then decodes the failed batch's samples one
by one in a 1-sample pipeline of the same kind, names each culprit (shard, key, DALI's message),
adds it to a :class:`Quarantine` (a JSON file when ``data.quarantine`` or a path is given),
rebuilds the pipeline and prepares the batch again; a quarantined sample is replaced by the
rule of the PyAV loader (:func:`megavid.data.loader.fill_rank_batch`: never a sample already in
the global step or the batch, chosen deterministically from (seed, epoch, position)), so both
backends give the same batches. Bad samples are counted and logged by the PyAV loader's rules
(each distinct one once per epoch in ``failures``, logged once) when a batch that met them is
handed out, not when DALI prefetches it; the quarantine (kept across epochs, and across runs
when it is a file) spares decoding them again.

The same loader reads frames shards (:class:`FramesDaliLoader`: T JPEGs per clip) and image
shards (:class:`ImageDaliLoader`: one JPEG/PNG per sample, a 1-frame clip repeated to T) with
``fn.decoders.image``, and runs ``data.resampled`` (infinite, with replacement) mode: the
order, cursor and state are :class:`megavid.data.loader.VideoTextLoader`'s, which hands each
pass (an epoch from the cursor, or a resampled chunk) to ``_iter_plan``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from megavid.data.frames import sample_clip_frames
from megavid.shards.format import FRAMES_CODEC, is_frames_shard_dir
from megavid.data.loader import (
    VideoTextLoader,
    _EpochPlan,
    _SampleFailed,
    build_sample_table,
    choose_caption,
    fill_rank_batch,
)
from megavid.data.sampling import get_sample_rng, sample_timestamps, timestamps_to_indices
from megavid.data.text import build_tokenizer, tokenize
from megavid.data.transforms import get_random_resized_crop_box, is_flip_safe, sample_texts
from megavid.errors import ConfigError, DataError

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
"""Codecs ``fn.decoders.video`` decodes on the CPU (libavcodec inside DALI)."""
MIXED_CODECS = CPU_CODECS | {"h264", "hevc", "h265", "av1", "mpeg4"}
"""Codecs the "mixed" backend decodes (NVDEC)."""

PYAV_CLIPS_PER_CORE = 4.2
"""PyAV decode rate per CPU core (DESIGN.md: 65-71 clips/s with 16 processes, H.264 456x256)."""
DALI_MIXED_CLIPS_PER_GPU = 12.0
"""DALI mixed ``fn.decoders.video`` rate per GPU from webdataset tars (DESIGN.md, H100)."""

logger = logging.getLogger("megavid.data")


# --------------------------------------------------------------------------------------------
# Availability and backend choice
# --------------------------------------------------------------------------------------------
def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def get_dali_version() -> str | None:
    """The installed DALI version, or None."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return str(nvidia.dali.__version__)


def get_shard_codec(shard_dir: str | Path) -> str:
    """The video codec of a shard folder's samples (from ``index.jsonl``, else the first JSON).

    Args:
        shard_dir: a folder written by :func:`megavid.shards.writer.write_shards`.

    Returns:
        The lower-case codec name; for a folder mixing codecs, one that DALI's CPU decoder
        cannot read, if any (the one that constrains the backend).

    Raises:
        DataError: no sample of the folder records its codec.
    """
    from megavid.shards.format import list_shards, read_index, scan_tar

    shard_dir = Path(shard_dir)
    codecs: set[str] = set()
    if (shard_dir / "index.jsonl").is_file():
        codecs = {str(e["codec"]).lower() for e in read_index(shard_dir) if e.get("codec")}
    if not codecs:
        tar = list_shards(str(shard_dir))[0]
        with open(tar, "rb") as f:
            for _, bundle in scan_tar(tar):
                for ext, off, size, _name in bundle:
                    if ext == "json":
                        f.seek(off)
                        codec = json.loads(f.read(size)).get("codec")
                        if codec:
                            codecs.add(str(codec).lower())
                break
    if not codecs:
        raise DataError(f"no sample in {shard_dir} records its codec; re-create the shards")
    if len(codecs) > 1 and not codecs <= CPU_CODECS:
        # mixing e.g. vp9 and h264 is fine for PyAV and mixed DALI, so report the hardest one
        return sorted(codecs - CPU_CODECS)[0]
    return sorted(codecs)[0]


def select_backend(
    codec: str,
    *,
    has_dali: bool | None = None,
    has_cuda: bool | None = None,
    cpu_cores: int | None = None,
    num_gpus: int | None = None,
    has_decord: bool | None = None,
) -> tuple[str, str, str]:
    """What ``data.backend=auto`` picks for videos of ``codec``, and why.

    Rule, from the decode measurements in DESIGN.md (H100 machine, 16 cores, H.264 456x256,
    8-frame 224^2 clips): PyAV reaches 65-71 clips/s with 16 processes (~4.2 per core) while
    DALI's mixed ``fn.decoders.video`` reaches ~12 clips/s per GPU (~85 ms per sample). So a
    GPU machine uses DALI mixed only when its CPU cores per GPU cannot beat that (fewer than
    ~3 cores per GPU); without a GPU, DALI's CPU decoder reads only VP8/VP9/MJPEG and measured
    no faster than PyAV per core (bench/loader_dali.py), so PyAV is the default there too.
    ``data.backend=dali`` forces DALI. decord, where installed, is never picked: it decodes
    with the same FFmpeg as PyAV and measured no faster per core (bench/loader.py); the reason
    says so, and ``data.backend=decord`` selects it.

    Frames shards (codec "jpeg", ``make-shards --shard-format frames``) always take DALI's
    ``fn.decoders.image``: "mixed" (hardware JPEG engines, ~2,000 clips/s measured on an H100)
    with a GPU, "cpu" without; PyAV cannot read them.

    Args:
        codec: the shards' codec ('vp9', 'h264', ...).
        has_dali: override DALI detection (None: try importing it).
        has_cuda: override CUDA detection (None: ``torch.cuda.is_available()``).
        cpu_cores: CPU cores this process may use (None: its affinity mask).
        num_gpus: GPUs on this machine sharing those cores (None: ``torch.cuda.device_count()``).
        has_decord: override decord detection (None: try importing it); only changes the
            reason of a 'pyav' choice.

    Returns:
        (backend, dali_device, reason): backend 'dali' or 'pyav'; dali_device 'mixed', 'cpu'
        or '' for pyav; reason a sentence for ``megavid info`` and logs.
    """
    backend, device, reason = _select_backend(codec, has_dali=has_dali, has_cuda=has_cuda,
                                              cpu_cores=cpu_cores, num_gpus=num_gpus)
    if backend == "pyav":
        if has_decord is None:
            from megavid.data.decord_backend import decord_available

            has_decord = decord_available()
        if has_decord:
            reason += (f"; decord is installed but PyAV is preferred ({DECORD_VS_PYAV}; "
                       "data.backend=decord selects it)")
    return backend, device, reason


DECORD_VS_PYAV = ("the same FFmpeg decode; measured 0.95-0.97x PyAV's clips per CPU-second on "
                  "the same H.264 shards, bench/results/loader_cpu-2core.md")
"""Why ``auto`` prefers PyAV over decord (``bench/loader.py``, 2-core CPU, 2026-11-23)."""


def _select_backend(codec: str, *, has_dali: bool | None, has_cuda: bool | None,
                    cpu_cores: int | None, num_gpus: int | None) -> tuple[str, str, str]:
    """``select_backend`` without the decord note."""
    codec = codec.lower()
    has_dali = dali_available() if has_dali is None else has_dali
    has_cuda = torch.cuda.is_available() if has_cuda is None else has_cuda
    if codec == FRAMES_CODEC:
        # frames shards: only DALI's image decoder reads them; the hardware JPEG path is the
        # fastest one measured (DESIGN.md: ~2,000 clips/s vs ~12 for fn.decoders.video)
        if not has_dali:
            return ("pyav", "", "frames (JPEG) shards without nvidia-dali: PIL decodes the "
                    "JPEGs in the loader's worker processes (pip install megavid[dali] for "
                    "DALI's JPEG decoder)")
        if has_cuda:
            return ("dali", "mixed", "frames (JPEG) shards: DALI fn.decoders.image on the GPU "
                    "(hardware JPEG decoder, ~2,000 clips/s measured on an H100 vs ~12 for "
                    "video-stream decoding)")
        return ("dali", "cpu", "frames (JPEG) shards, no CUDA GPU: DALI fn.decoders.image on "
                "the CPU (the only backend that reads frames shards)")
    if not has_dali:
        return "pyav", "", "nvidia-dali is not installed (pip install megavid[dali])"
    if has_cuda and codec in MIXED_CODECS:
        cores = cpu_cores if cpu_cores is not None else len(os.sched_getaffinity(0))
        gpus = max(1, num_gpus if num_gpus is not None else torch.cuda.device_count())
        pyav_rate = cores / gpus * PYAV_CLIPS_PER_CORE
        numbers = (f"{cores / gpus:.1f} CPU cores per GPU give PyAV ~{pyav_rate:.0f} clips/s "
                   f"per GPU vs ~{DALI_MIXED_CLIPS_PER_GPU:.0f} for DALI mixed decoding "
                   "(DESIGN.md, H.264 456x256)")
        if pyav_rate < DALI_MIXED_CLIPS_PER_GPU:
            return "dali", "mixed", f"{numbers}: NVDEC ({codec}) is faster here"
        return "pyav", "", f"{numbers}: PyAV is faster here (set data.backend=dali to force it)"
    if has_cuda:
        return "pyav", "", f"DALI cannot decode {codec} on the GPU; PyAV can"
    if codec in CPU_CODECS:
        return ("pyav", "", f"no CUDA GPU: DALI CPU could decode {codec} but is no faster than "
                "PyAV per core (set data.backend=dali to force it)")
    return "pyav", "", f"no CUDA GPU and DALI's CPU decoder cannot decode {codec}"


def get_dali_device(codec: str, requested: str = "auto") -> str:
    """The DALI decoder backend ('cpu' or 'mixed') for ``codec``; raise when it cannot work.

    Args:
        codec: the shards' codec.
        requested: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.

    Raises:
        DataError: DALI is missing, or the codec cannot be decoded on the requested device.
    """
    device = _resolve_device(
        requested,
        missing="data.backend=dali needs nvidia-dali: pip install 'megavid[dali]', or set "
                "data.backend=pyav",
        no_gpu="DALI mixed (GPU) decoding needs a CUDA GPU; none is visible (check "
               "CUDA_VISIBLE_DEVICES) or set data.dali_device=cpu or data.backend=pyav")
    codec = codec.lower()
    if device == "cpu" and codec not in CPU_CODECS:
        raise DataError(
            f"DALI's CPU video decoder cannot decode {codec} "
            f"(only {', '.join(sorted(CPU_CODECS))}); "
            "set data.backend=pyav, run on a GPU, or re-encode the shards as VP9"
        )
    if device == "mixed" and codec not in MIXED_CODECS:
        raise DataError(f"DALI cannot decode {codec}; set data.backend=pyav")
    return device


# --------------------------------------------------------------------------------------------
# Quarantine
# --------------------------------------------------------------------------------------------
class Quarantine:
    """Samples that failed to decode: excluded from every later batch.

    Stored as JSON ``{"samples": [{"shard", "key", "reason", "detail"}, ...]}`` when ``path``
    is given, read at start (a resumed run skips what the last one found) and rewritten
    atomically on every addition.

    Args:
        path: the JSON file (e.g. ``<run_dir>/quarantine.json``); None keeps it in memory.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.samples: list[dict[str, str]] = []
        if self.path is not None and self.path.is_file():
            try:
                self.samples = list(json.loads(self.path.read_text())["samples"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"quarantine file {self.path} is not valid ({e}); delete it "
                                "to start with an empty quarantine") from e
        self._keys = {(s["shard"], s["key"]): s for s in self.samples}

    def __contains__(self, shard_key: tuple[str, str]) -> bool:
        return shard_key in self._keys

    def get(self, shard: str, key: str) -> dict[str, str] | None:
        """The record {"shard", "key", "reason", "detail"} of a quarantined sample, or None."""
        return self._keys.get((shard, key))

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        """Record one bad sample (no-op if already there) and save."""
        if (shard, key) in self._keys:
            return
        record = {"shard": shard, "key": key, "reason": reason, "detail": detail}
        self._keys[(shard, key)] = record
        self.samples.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"samples": self.samples}, indent=1))
            os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------
# Per-sample plan (the same draws as the PyAV backend)
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ClipPlan:
    """Everything DALI needs for one sample, decided in Python from the sample's generators."""

    index: int
    """Global sample index (line of the split's index)."""
    shard: str
    key: str
    frames: np.ndarray
    """int32 [T] frame indices (``timestamps_to_indices`` of ``sample_timestamps``)."""
    roi_start: np.ndarray
    """float32 [2] (y, x) of the crop box's top-left corner, in source pixels."""
    roi_end: np.ndarray
    """float32 [2] (y, x) of the crop box's bottom-right corner."""
    flip: bool


def plan_clip(
    meta: dict[str, Any],
    index: int,
    *,
    num_frames: int,
    img_size: int,
    train: bool,
    seed: int,
    epoch: int,
    random_flip: bool = False,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    shard: str = "",
) -> ClipPlan:
    """Frame indices, crop box and flip of one sample: the draws PyAV's path makes.

    Frames: ``sample_timestamps`` with the sample's "frames" generator, then
    ``timestamps_to_indices`` (the frame on screen, clamped). Box and flip: eval is the short-side
    resize + centre crop of :func:`megavid.data.transforms.transform_clip` expressed as a box
    in source pixels (the same sampling grid, resampled once); train draws
    ``get_random_resized_crop_box`` and then the flip coin from the "augment" generator, in
    that order, exactly as ``transform_clip`` does.

    Args:
        meta: the sample JSON (duration, fps, num_frames, width, height, start, end, captions).
        index: the sample's global index (seeds its generators).
        num_frames: frames per clip.
        img_size: output side.
        train: random draws (True) or deterministic eval choices.
        seed: run seed.
        epoch: epoch (seeds train draws).
        random_flip: ``data.random_flip`` (a flip still needs caption-aware safety).
        crop_scale: ``data.crop_scale``.
        shard: the shard file name, recorded in the plan for error messages.
    """
    try:
        duration, fps = float(meta["duration"]), float(meta["fps"])
        n_video, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"sample {meta.get('key')!r}: JSON lacks duration/fps/num_frames/"
                        f"width/height ({e}); re-create the shards with megavid") from e
    rng = get_sample_rng(seed, epoch, index, "frames") if train else None
    ts = sample_timestamps(num_frames, duration, start=meta.get("start"), end=meta.get("end"),
                           train=train, rng=rng)
    frames = timestamps_to_indices(ts, fps, n_video).astype(np.int32)
    roi_start, roi_end, flip = plan_box(meta, index, height=height, width=width,
                                        img_size=img_size, train=train, seed=seed, epoch=epoch,
                                        random_flip=random_flip, crop_scale=crop_scale)
    return ClipPlan(index=index, shard=shard, key=str(meta.get("key", "")), frames=frames,
                    roi_start=roi_start, roi_end=roi_end, flip=flip)


def plan_box(meta: dict[str, Any], index: int, *, height: int, width: int, img_size: int,
             train: bool, seed: int, epoch: int, random_flip: bool = False,
             crop_scale: tuple[float, float] = (0.5, 1.0)) -> tuple[np.ndarray, np.ndarray, bool]:
    """Crop box (float32 (y, x) start and end, in source pixels) and flip of one sample: the
    draws ``transform_clip`` makes on a [T, C, height, width] clip (video or image).

    Args:
        meta: the sample JSON (its captions decide whether a flip is caption-safe).
        index: the sample's global index (seeds its "augment" generator).
        height: source height.
        width: source width.
        img_size: output side.
        train: random resized crop + coin (True) or short-side resize + centre crop.
        seed: run seed.
        epoch: epoch.
        random_flip: ``data.random_flip``.
        crop_scale: ``data.crop_scale`` (area range of the random resized crop).
    """
    flip = False
    if train:
        arng = get_sample_rng(seed, epoch, index, "augment")
        top, left, h, w = get_random_resized_crop_box(height, width, arng, crop_scale)
        box = (float(top), float(left), float(top + h), float(left + w))
        # same order of draws as transform_clip: box first, then the coin (always drawn)
        coin = arng.random() < 0.5
        flip = bool(coin and random_flip and is_flip_safe(sample_texts(meta)))
    else:
        # resize_short_side(size) then center_crop(size), as a box in source pixels
        if height <= width:
            new_h, new_w = img_size, max(img_size, int(round(width * img_size / height)))
        else:
            new_h, new_w = max(img_size, int(round(height * img_size / width))), img_size
        top, left = (new_h - img_size) // 2, (new_w - img_size) // 2
        sy, sx = height / new_h, width / new_w
        box = (top * sy, left * sx, (top + img_size) * sy, (left + img_size) * sx)
    return (np.array(box[:2], dtype=np.float32), np.array(box[2:], dtype=np.float32), flip)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------
def build_video_pipeline(
    source: Callable[[Any], tuple],
    *,
    batch_size: int,
    img_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
    seed: int = 0,
):
    """A built DALI pipeline: encoded videos + per-sample plans -> uint8 clips [T, C, S, S].

    Args:
        source: external-source callback taking ``nvidia.dali.types.BatchInfo`` and returning
            the batch's (encoded uint8 arrays, int32 frame indices [T], float32 roi_start [2],
            float32 roi_end [2], int32 flip scalars); raising StopIteration ends the epoch.
            Batches may be smaller than ``batch_size``.
        batch_size: the largest batch.
        img_size: output height and width.
        device: 'cpu' (no GPU needed) or 'mixed' (NVDEC decode; the output is on the GPU).
        device_id: the CUDA device of a mixed pipeline (None for CPU pipelines).
        num_threads: DALI CPU worker threads.
        prefetch: batches DALI prepares ahead.
        seed: DALI's own seed (no DALI op here draws random numbers; set for completeness).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI decode device {device!r} must be 'cpu' or 'mixed'")
    if device == "mixed" and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if device == "mixed" else None,
                  exec_dynamic=True, prefetch_queue_depth=prefetch, seed=seed)
    def _pipeline():
        encoded, frames, roi_start, roi_end, flip = fn.external_source(
            source=source, num_outputs=5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32],
        )
        video = fn.decoders.video(encoded, frames=frames, device=device)  # F, H, W, C
        # Crop box + resize in one resampling (antialiased, like the torch transforms).
        video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                          size=[img_size, img_size], antialias=True,
                          interp_type=types.INTERP_LINEAR)
        video = fn.flip(video, horizontal=flip)
        return fn.transpose(video, perm=[0, 3, 1, 2])  # F, C, H, W

    pipe = _pipeline()
    pipe.build()
    return pipe


def dali_to_torch(out) -> torch.Tensor:
    """A DALI TensorList of equal-shape samples -> a torch tensor on the same device (copy)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = out.as_tensor()
    shape = list(tensor.shape())
    if type(out).__name__.endswith("GPU"):  # TensorListGPU (mixed pipelines)
        dst = torch.empty(shape, dtype=torch.uint8,
                          device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream())
        return dst
    return torch.from_numpy(np.array(tensor))


def iter_dali_reader(
    spec: str | Path,
    root: str | Path | None = None,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
) -> Iterator[tuple[dict, bytes]]:
    """(sample JSON, video bytes) of every sample ``fn.readers.webdataset`` assigns to
    ``shard_id`` of ``num_shards``, read through the shards' ``NNNNN.idx`` files.

    The DALI reader splits the samples into contiguous ranges per shard (not megavid's
    permuted, resumable order, which is why the loader does not use it); this walks one range
    once, for checking that DALI reads a shard folder exactly as ``index.jsonl`` describes it
    (``megavid info --shards``, tests).

    Args:
        spec: a shard folder, tar, glob or split name (see ``shards.list_shards``).
        root: dataset root for split names.
        shard_id: which range (a rank).
        num_shards: number of ranges (world size).
        batch_size: reader batch size.

    Raises:
        DataError: a tar has no ``.idx`` next to it.
    """
    from nvidia.dali import fn, pipeline_def

    from megavid.shards.format import list_shards

    tars = list_shards(str(spec), root)
    index_paths = [t.with_suffix(".idx") for t in tars]
    missing = [p.name for p in index_paths if not p.is_file()]
    if missing:
        raise DataError(f"DALI needs an index per tar; missing {', '.join(missing[:3])}: write "
                        "them with `wds2idx <tar>` or re-create the shards with megavid")

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def _reader():
        video, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(p) for p in index_paths],
            ext=["webm;mp4", "json"], name="reader", shard_id=shard_id,
            num_shards=num_shards, pad_last_batch=True, missing_component_behavior="error")
        return video, meta

    pipe = _reader()
    pipe.build()
    total = int(pipe.reader_meta("reader")["epoch_size"])
    # DALI's split: shard i holds samples [floor(i N / S), floor((i + 1) N / S))
    count = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    done = 0
    while done < count:
        videos, metas = pipe.run()
        for k in range(min(len(videos), count - done)):
            raw = np.asarray(metas[k]).tobytes()
            try:
                meta = json.loads(raw)
            except ValueError as e:
                raise DataError(
                    f"DALI read a JSON member that does not parse ({e}) from "
                    f"{metas[k].source_info() or spec}: the .idx files do not match the tars; "
                    "regenerate them (wds2idx) or re-create the shards") from e
            yield meta, np.asarray(videos[k]).tobytes()
        done += len(videos)


def iter_dali_frames_reader(
    spec: str | Path,
    root: str | Path | None = None,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    batch_size: int = 4,
) -> Iterator[tuple[dict, list[bytes]]]:
    """(sample JSON, [JPEG bytes per stored frame]) of every frames sample that
    ``fn.readers.webdataset`` assigns to ``shard_id`` of ``num_shards``: the frames layout read
    by DALI alone (one ``ext`` entry per frame number, ``missing_component_behavior="empty"``
    for clips with fewer frames), as ``iter_dali_reader`` does for video shards.

    Args:
        spec: a frames shard folder, tar, glob or split name.
        root: dataset root for split names.
        shard_id: which range (a rank).
        num_shards: number of ranges.
        batch_size: reader batch size.
    """
    from nvidia.dali import fn, pipeline_def

    from megavid.shards.format import get_frame_exts, is_frame_ext, list_shards, read_index

    tars = list_shards(str(spec), root)
    index_paths = [t.with_suffix(".idx") for t in tars]
    missing = [p.name for p in index_paths if not p.is_file()]
    if missing:
        raise DataError(f"DALI needs an index per tar; missing {', '.join(missing[:3])}: "
                        "re-create the shards with megavid")
    names = {t.name for t in tars}
    most = max(sum(is_frame_ext(x) for x in e["members"])
               for d in {t.parent for t in tars} for e in read_index(d) if e["shard"] in names)
    exts = get_frame_exts(most)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def _reader():
        return tuple(fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(p) for p in index_paths],
            ext=["json", *exts], name="reader", shard_id=shard_id, num_shards=num_shards,
            pad_last_batch=True, missing_component_behavior="empty"))

    pipe = _reader()
    pipe.build()
    total = int(pipe.reader_meta("reader")["epoch_size"])
    count = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    done = 0
    while done < count:
        outs = pipe.run()
        for k in range(min(len(outs[0]), count - done)):
            meta = json.loads(np.asarray(outs[0][k]).tobytes())
            frames = [np.asarray(o[k]).tobytes() for o in outs[1:]]
            yield meta, [f for f in frames if f]  # missing components come back empty
        done += len(outs[0])


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Prepared:
    """One batch read and planned in Python, waiting for DALI's output."""

    indices: list[int]
    valid: list[bool]
    metas: list[dict]
    captions: list[str]
    plans: list[ClipPlan]
    encoded: list[np.ndarray]
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    """(index, reason, detail) of every bad sample met while filling the batch (counted and
    logged by ``VideoTextLoader._record_failures`` when the batch is handed out)."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        plans = self.plans[sel]
        return (self.encoded[sel], [p.frames for p in plans], [p.roi_start for p in plans],
                [p.roi_end for p in plans], [np.array(int(p.flip), dtype=np.int32) for p in plans])


class _PassSource:
    """External-source callback of one pipeline: iteration i reads step ``first_step + i`` of
    the pass ``plan`` (DALI calls it ahead of consumption, up to ``prefetch``)."""

    def __init__(self, loader: "DaliLoader", plan: _EpochPlan, first_step: int, prepared: dict,
                 lock: threading.Lock) -> None:
        self.loader, self.plan, self.first_step = loader, plan, first_step
        self.prepared, self.lock = prepared, lock

    def __call__(self, info) -> tuple:
        s = self.first_step + info.iteration
        if s >= self.plan.steps:
            raise StopIteration
        p = self.loader._prepare(self.plan, s)
        with self.lock:
            self.prepared[s] = p
        return p.dali_inputs()


class DaliLoader(VideoTextLoader):
    """Batches of clips decoded by DALI, with megavid's order, cursor, sampling and quarantine.

    A :class:`megavid.data.loader.VideoTextLoader` (the PyAV loader) whose batches are decoded
    by DALI: it inherits the sample table, permutation, per-rank positions, drop_last / wrap /
    eval-padding rules, resampled mode, ``__iter__``, ``__len__``, ``set_epoch``,
    ``state_dict`` and ``load_state_dict``, so a run can switch backends on resume; only
    ``_iter_plan`` (decode a pass with DALI) is its own. The batch contract is the same ("video",
    "input_ids", "attention_mask", "captions", "keys", "meta", "valid", "indices"); "video" is
    on the GPU for ``device='mixed'`` (no round trip through host memory; ``normalize_clip``
    accepts either).

    A sample that fails (unreadable member, bad JSON, no caption: found in Python; a video
    DALI cannot decode: found by re-decoding the failed batch one sample at a time) is
    quarantined and replaced by the PyAV loader's rule (``fill_rank_batch``), and counted in
    ``failures`` once per epoch; ``data.max_consecutive_failures`` failures in a row raise
    :class:`DataError`.

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' (through ``data_cfg.<split>``) or a shard spec.
        train: random frames/captions/crops/flips, per-epoch shuffling, drop_last.
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: first epoch.
        device: DALI decoder: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.
        quarantine: a :class:`Quarantine` or the path of its JSON file (None:
            ``data_cfg.quarantine``, in memory when that is empty).
        num_threads: DALI CPU threads (None: ``data_cfg.num_workers``, at least 1).
    """

    def __init__(
        self,
        data_cfg,
        split: str,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        device: str = "auto",
        quarantine: Quarantine | str | Path | None = None,
        num_threads: int | None = None,
    ) -> None:
        spec = getattr(data_cfg, split) if split in ("train", "val", "test") else split
        table = build_sample_table(spec, data_cfg.root)
        # checks rank/world size and that one global batch fits (same messages as PyAV's)
        super().__init__(table, data_cfg, split=split, train=train, rank=rank,
                         world_size=world_size, seed=seed, epoch=epoch)
        self.codec = self._get_codec()
        self.device = self._get_device(device)
        self.device_id = torch.cuda.current_device() if self.device == "mixed" else None
        self.num_threads = max(1, num_threads or data_cfg.num_workers)
        self.prefetch = 2
        if quarantine is None:
            quarantine = getattr(data_cfg, "quarantine", "") or None
        self.quarantine = (quarantine if isinstance(quarantine, Quarantine)
                           else Quarantine(quarantine))
        self.tokenizer = build_tokenizer(data_cfg.tokenizer)

    def _get_codec(self) -> str:
        """The codec of this loader's shards (decides the DALI device)."""
        return get_shard_codec(Path(self.table.tars[0]).parent)

    def _get_device(self, requested: str) -> str:
        """'cpu' or 'mixed' for this loader's shards (raises when they cannot be decoded)."""
        return get_dali_device(self.codec, requested)

    # -- reading and planning --------------------------------------------------------------
    def _where(self, index: int) -> tuple[str, str]:
        return Path(self.table.tars[int(self.table.tar_id[index])]).name, self.table.keys[index]

    def _read(self, index: int, span: np.ndarray) -> bytes:
        offset, size = (int(v) for v in span[index])
        try:
            with open(self.table.tars[int(self.table.tar_id[index])], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        if len(data) != size:
            raise _SampleFailed("truncated_shard", f"member ends after {len(data)} of {size} bytes")
        return data

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, np.ndarray]:
        """Read and plan one sample: (sample JSON, caption, plan, encoded bytes)."""
        meta, caption = self._load_meta(index, epoch)
        try:
            plan = plan_clip(meta, index, num_frames=self.cfg.num_frames,
                             img_size=self.cfg.img_size, train=self.train, seed=self.seed,
                             epoch=epoch, random_flip=self.cfg.random_flip,
                             crop_scale=self.cfg.crop_scale,
                             shard=self._where(index)[0])
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        encoded = self._read(index, self.table.video)
        if self.cfg.dali_trim_gops:
            from megavid.data.pyav_backend import trim_to_gops

            # only the GOPs of the sampled frames: DALI does not seek in memory (FRAMES.md)
            encoded, plan.frames = trim_to_gops(encoded, plan.frames)
        return meta, caption, plan, np.frombuffer(encoded, dtype=np.uint8)

    def _load_meta(self, index: int, epoch: int) -> tuple[dict, str]:
        """Read one sample's JSON and choose its caption (the PyAV loader's choice)."""
        try:
            meta = json.loads(self._read(index, self.table.meta))
        except (ValueError, UnicodeDecodeError) as e:
            raise _SampleFailed("bad_json", str(e)) from e
        return meta, choose_caption(meta, train=self.train, seed=self.seed, epoch=epoch, index=index)

    def _known_bad(self, index: int) -> tuple[str, str] | None:
        """(reason, detail) of a quarantined sample (this run's or a previous one's), else None."""
        record = self.quarantine.get(*self._where(index))
        return None if record is None else (record["reason"], record["detail"])

    def _mark_bad(self, index: int, reason: str, detail: str) -> None:
        """Quarantine a bad sample: never read or decoded again (counted and logged when a
        batch that met it is handed out)."""
        shard, key = self._where(index)
        self.quarantine.add(shard, key, reason, detail)

    def _prepare(self, epoch_plan: _EpochPlan, step: int) -> _Prepared:
        """This rank's part of step ``step`` of the pass ``epoch_plan``: the positions of
        ``VideoTextLoader``, bad samples (quarantined, or failing in Python now) replaced by
        the rule of :func:`megavid.data.loader.fill_rank_batch`, as in the PyAV loader. A sample
        DALI cannot decode is found when the batch fails, quarantined, and the batch prepared
        again: the same rule then replaces it, so the batch is the one PyAV's would be."""
        out = self._prepared_cls([], [], [], [], [], [])
        try:
            slots = fill_rank_batch(
                epoch_plan, step, num_samples=self.num_samples, train=self.train,
                seed=self.seed, load=lambda index: self._load(index, epoch_plan.epoch),
                known_bad=self._known_bad, mark_bad=self._mark_bad, failed=out.failed,
                max_failures=self.cfg.max_consecutive_failures, where=self._where)
        except DataError:
            self._record_failures(out.failed)  # the abort's culprits are counted and logged
            raise
        for index, valid, (meta, caption, plan, encoded) in slots:
            out.indices.append(index)
            out.valid.append(valid)
            out.metas.append(meta)
            out.captions.append(caption)
            out.plans.append(plan)
            out.encoded.append(encoded)
        return out

    def _assemble(self, video: torch.Tensor, p: _Prepared) -> dict[str, Any]:
        input_ids, attention_mask = tokenize(self.tokenizer, p.captions, self.cfg.max_text_len)
        return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask,
                "captions": list(p.captions), "keys": [self.table.keys[i] for i in p.indices],
                "meta": p.metas, "valid": torch.tensor(p.valid, dtype=torch.bool),
                "indices": torch.tensor(p.indices, dtype=torch.int64)}

    # -- the DALI part (overridden by FramesDaliLoader) ------------------------------------
    _prepared_cls = _Prepared

    def _build_pipeline(self, source: Callable, *, batch_size: int, num_threads: int,
                        prefetch: int):
        """The built pipeline decoding ``batch_size`` samples per iteration from ``source``."""
        return build_video_pipeline(source, batch_size=batch_size, img_size=self.cfg.img_size,
                                    device=self.device, device_id=self.device_id,
                                    num_threads=num_threads, prefetch=prefetch, seed=self.seed)

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        """The pipeline's output for prepared batch ``p`` -> uint8 [B, T, C, H, W]."""
        return dali_to_torch(out)

    # -- faults ---------------------------------------------------------------------------
    def _decode_alone(self, p: _Prepared, j: int) -> str | None:
        """Decode sample ``j`` of a prepared batch in a 1-sample pipeline of the same kind;
        None if it decodes, else DALI's message."""
        try:
            pipe = self._build_pipeline(one_batch_source(p.dali_inputs(slice(j, j + 1))),
                                        batch_size=1, num_threads=1, prefetch=1)
            pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI reports decode failures as RuntimeError
            return _first_error_line(e)
        return None

    def _quarantine_culprits(self, batches: list[_Prepared], error: Exception) -> int:
        """Quarantine the samples of the failed batch (or, failing that, of the batches DALI
        had prefetched after it) that fail alone. Returns how many."""
        found = 0
        for p in batches:
            for j, index in enumerate(p.indices):
                if self._where(index) in self.quarantine:
                    continue
                problem = self._decode_alone(p, j)
                if problem is not None:
                    self._mark_bad(index, "decode_error", problem)
                    found += 1
            if found:
                return found  # the earliest failing batch is the one DALI reported
        raise DataError(f"DALI failed on a batch but no sample fails alone "
                        f"({_first_error_line(error)}); set data.backend=pyav")

    # -- iteration ------------------------------------------------------------------------
    def _iter_plan(self, plan: _EpochPlan) -> Iterator[dict[str, Any]]:
        """The batches of one pass (an epoch from the cursor, or a resampled chunk) decoded by
        DALI; ``VideoTextLoader.__iter__`` moves the cursor and ends the epoch, so order,
        resume and resampled mode are the PyAV loader's."""
        steps = plan.steps
        step = 0
        consecutive = 0
        while step < steps:
            first_step = step
            prepared: dict[int, _Prepared] = {}
            lock = threading.Lock()
            source = _PassSource(self, plan, first_step, prepared, lock)
            pipe = self._build_pipeline(source, batch_size=self.batch_size,
                                        num_threads=self.num_threads, prefetch=self.prefetch)
            try:
                while step < steps:
                    try:
                        (video,) = pipe.run()
                    except StopIteration:  # pragma: no cover - the source and `steps` agree
                        raise RuntimeError("DALI pipeline ended before its last batch") from None
                    except RuntimeError as e:  # DALI's operator errors; others propagate
                        with lock:
                            pending = [prepared[s] for s in sorted(prepared) if s >= step]
                        consecutive += self._quarantine_culprits(pending, e)
                        if consecutive >= self.cfg.max_consecutive_failures:
                            raise DataError(
                                f"{consecutive} samples in a row failed to decode with DALI "
                                f"(quarantine: {self.quarantine.path or 'in memory'}); check "
                                "the shards with `megavid verify-shards`") from e
                        break  # rebuild the pipeline at `step`, without the culprits
                    with lock:
                        p = prepared.pop(step)
                    self._record_failures(p.failed)
                    consecutive = 0
                    clip = self._to_clip(video, p)
                    step += 1
                    yield self._assemble(clip, p)
            finally:
                del pipe


def _first_error_line(error: BaseException) -> str:
    """The informative part of a DALI error, which wraps the cause in the pipeline definition's
    traceback: the FFmpeg reason ("... due to: Invalid data found ...") when there is one, else
    the failed assertion, else the operator and what it "encountered" (image decoders:
    "fn.decoders.image: nvImageCodec failure: '#17'"), else the last line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln != "Current pipeline object is no longer valid."]
    for ln in lines:
        if "due to" in ln:
            return ln[ln.rfind("] ") + 2 if "] " in ln else 0:][:300]
    for ln in lines:
        if ln.startswith(("Assert", "Failed", "Error while")):
            return ln[:300]
    if "encountered:" in lines[:-1]:
        cause = lines[lines.index("encountered:") + 1]
        op = next((ln.split("`")[1] for ln in lines if ln.startswith("Error in") and
                   ln.count("`") >= 2), "")
        return (f"{op.removeprefix('nvidia.dali.')}: {cause}" if op else cause)[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def build_dali_loader(
    data_cfg,
    split: str,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    device: str | None = None,
    quarantine: Quarantine | str | Path | None = None,
) -> "DaliLoader":
    """The DALI loader of a split: ``build_loader``'s signature plus DALI options.

    Frames shards (``make-shards --shard-format frames``) get a :class:`FramesDaliLoader`
    (``fn.decoders.image``), image shards (``{key}.jpg|.png``) an :class:`ImageDaliLoader`
    (``fn.decoders.image``, 1-frame clips), video shards a :class:`DaliLoader`
    (``fn.decoders.video``).

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' or a shard spec.
        train: training mode (random sampling, shuffling, drop_last).
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: first epoch.
        device: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed' (None:
            ``data_cfg.dali_device``).
        quarantine: a :class:`Quarantine` or its JSON path (None: ``data_cfg.quarantine``).
    """
    from megavid.data.loader import get_split_spec, is_image_split
    from megavid.shards.format import list_shards

    device = device or data_cfg.dali_device

    first = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0]
    if is_image_split(data_cfg, split):
        cls = ImageDaliLoader
    else:
        cls = FramesDaliLoader if is_frames_shard_dir(first.parent) else DaliLoader
    return cls(data_cfg, split, train=train, rank=rank, world_size=world_size,
               seed=seed, epoch=epoch, device=device, quarantine=quarantine)


# --------------------------------------------------------------------------------------------
# Frames shards: fn.decoders.image
# --------------------------------------------------------------------------------------------
HW_DECODER_LOAD = 0.65
"""Share of the JPEGs sent to the hardware JPEG engines of a "mixed" image decoder (the rest go
to CUDA nvJPEG). DESIGN.md: 0.65 gave 1,900-2,100 clips/s on an H100, 0 (CUDA only) 820."""


def get_image_decoder_device(requested: str = "auto", what: str = "images") -> str:
    """The ``fn.decoders.image`` backend ('cpu' or 'mixed') of frames and image shards.

    Args:
        requested: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.
        what: what is decoded, for the messages.

    Raises:
        DataError: DALI is missing, or 'mixed' without a GPU.
    """
    return _resolve_device(
        requested,
        missing=f"{what} need nvidia-dali for data.backend=dali: pip install 'megavid[dali]'",
        no_gpu="DALI mixed (GPU) JPEG decoding needs a CUDA GPU; none is visible (check "
               "CUDA_VISIBLE_DEVICES) or set data.dali_device=cpu")


def one_batch_source(inputs: tuple) -> Callable[[Any], tuple]:
    """An external source for a pipeline that yields ``inputs`` (one batch) once, then stops
    (one-sample fault isolation, the decode checks of ``megavid info``)."""
    done: list[int] = []

    def source(info):
        if done:
            raise StopIteration
        done.append(1)
        return inputs

    return source


def _resolve_device(requested: str, *, missing: str, no_gpu: str) -> str:
    """'auto' -> 'mixed' with a CUDA GPU, else 'cpu'; ``missing`` / ``no_gpu`` are the
    messages (problem and fix) when DALI is not installed / 'mixed' has no GPU."""
    if not dali_available():
        raise DataError(missing)
    device = requested
    if device == "auto":
        device = "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI device {requested!r} must be 'auto', 'cpu' or 'mixed'")
    if device == "mixed" and not torch.cuda.is_available():
        raise DataError(no_gpu)
    return device


def build_frames_pipeline(
    source: Callable[[Any], tuple],
    *,
    batch_size: int,
    img_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
    seed: int = 0,
    hw_decoder_load: float = HW_DECODER_LOAD,
):
    """A built DALI pipeline: JPEG frames + per-frame crop boxes -> uint8 frames [C, S, S].

    One DALI sample is one frame: a batch of B clips of T frames is B*T samples, which the
    loader reshapes to [B, T, C, S, S] (no copy). Per frame, the crop box and flip of its clip.

    Args:
        source: external-source callback taking ``BatchInfo`` and returning (JPEG uint8 arrays,
            float32 roi_start [2], float32 roi_end [2], int32 flip scalars), one entry per
            frame; StopIteration ends the pass.
        batch_size: the most frames per iteration (clips x frames per clip).
        img_size: output side.
        device: 'cpu' (libjpeg-turbo in DALI's CPU threads) or 'mixed' (hardware JPEG engines
            + nvJPEG; output on the GPU).
        device_id: CUDA device of a mixed pipeline.
        num_threads: DALI CPU threads.
        prefetch: batches DALI prepares ahead.
        seed: DALI's seed (no random op here).
        hw_decoder_load: mixed only: share of the hardware JPEG decoder (see HW_DECODER_LOAD).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI decode device {device!r} must be 'cpu' or 'mixed'")
    if device == "mixed" and device_id is None:
        device_id = torch.cuda.current_device()
    extra = {"hw_decoder_load": hw_decoder_load} if device == "mixed" else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if device == "mixed" else None,
                  exec_dynamic=True, prefetch_queue_depth=prefetch, seed=seed)
    def _pipeline():
        jpegs, roi_start, roi_end, flip = fn.external_source(
            source=source, num_outputs=4, batch=True, batch_info=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, **extra)
        # the same crop-box resampling as the video pipeline (one antialiased resize)
        images = fn.resize(images, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                           size=[img_size, img_size], antialias=True,
                           interp_type=types.INTERP_LINEAR)
        images = fn.flip(images, horizontal=flip)
        return fn.transpose(images, perm=[2, 0, 1])  # C, H, W

    pipe = _pipeline()
    pipe.build()
    return pipe


@dataclass(slots=True)
class _FramesPrepared(_Prepared):
    """A prepared batch of a frames loader: ``encoded[i]`` is the list of the clip's T JPEGs."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        jpegs, starts, ends, flips = [], [], [], []
        for frames, p in zip(self.encoded[sel], self.plans[sel]):
            flip = np.array(int(p.flip), dtype=np.int32)
            for jpeg in frames:
                jpegs.append(jpeg)
                starts.append(p.roi_start)
                ends.append(p.roi_end)
                flips.append(flip)
        return jpegs, starts, ends, flips


class _ImageDecoderLoader(DaliLoader):
    """Base of the loaders that decode with ``fn.decoders.image`` (:func:`build_frames_pipeline`):
    one DALI sample per JPEG/PNG, ``_images_per_clip()`` of them per clip."""

    def _images_per_clip(self) -> int:
        return self.cfg.num_frames

    def _build_pipeline(self, source: Callable, *, batch_size: int, num_threads: int,
                        prefetch: int):
        return build_frames_pipeline(source, batch_size=batch_size * self._images_per_clip(),
                                     img_size=self.cfg.img_size, device=self.device,
                                     device_id=self.device_id, num_threads=num_threads,
                                     prefetch=prefetch, seed=self.seed)


class FramesDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over frames shards: the same order, cursor, state, quarantine and
    per-sample draws, with the clip's frames read as JPEG members and decoded by
    ``fn.decoders.image`` ("mixed": hardware JPEG engines; "cpu": DALI's CPU decoder).

    Frames: the video path's timestamps (:func:`megavid.data.frames.sample_clip_frames`), each
    taking the stored frame on screen; only those T JPEGs are read (``pread`` at the offsets of
    ``index.jsonl``). Crop box and flip: ``plan_clip``'s draws over the stored frame size.
    ``ClipPlan.frames`` holds the stored frame indices. Arguments: as :class:`DaliLoader`.
    """

    _prepared_cls = _FramesPrepared

    def __init__(self, data_cfg, split: str, **kw: Any) -> None:
        super().__init__(data_cfg, split, **kw)
        if self.table.frames is None:
            raise DataError(f"split '{split}' mixes frames and video shards, or a frames sample "
                            "has no frame members; re-create the frames shards")
        # per sample, the [offset, size] of each stored frame (from index.jsonl)
        self.frame_spans: list[np.ndarray] = self.table.frames

    def _get_device(self, requested: str) -> str:
        if self.codec != FRAMES_CODEC:
            raise DataError(f"the shards hold {self.codec} videos, not frames; use the video "
                            "DALI loader (build_dali_loader picks it)")
        return get_image_decoder_device(requested, "frames shards")

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, list[np.ndarray]]:
        meta, caption = self._load_meta(index, epoch)
        try:
            # crop box + flip over the stored frame size (frames replaced below)
            plan = plan_clip(meta, index, num_frames=self.cfg.num_frames,
                             img_size=self.cfg.img_size, train=self.train, seed=self.seed,
                             epoch=epoch, random_flip=self.cfg.random_flip,
                             crop_scale=self.cfg.crop_scale,
                             shard=self._where(index)[0])
            _, stored = sample_clip_frames(meta, index, num_frames=self.cfg.num_frames,
                                           train=self.train, seed=self.seed, epoch=epoch)
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        spans = self.frame_spans[index]
        if int(stored.max()) >= len(spans):
            raise _SampleFailed("bad_json", f"the JSON lists more frames than the tar holds "
                                f"({len(spans)})")
        plan.frames = stored.astype(np.int32)
        return meta, caption, plan, self._read_frames(index, spans[stored])

    def _read_frames(self, index: int, spans: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes at ``spans`` ([T, 2] offset, size) of sample ``index``'s tar."""
        out = []
        try:
            with open(self.table.tars[int(self.table.tar_id[index])], "rb") as f:
                for offset, size in spans.tolist():
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise _SampleFailed("truncated_shard",
                                            f"frame ends after {len(data)} of {size} bytes")
                    out.append(np.frombuffer(data, dtype=np.uint8))
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        return out

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        frames = dali_to_torch(out)  # [B*T, C, H, W]
        return frames.view(len(p.indices), self.cfg.num_frames, *frames.shape[1:])


# --------------------------------------------------------------------------------------------
# Image shards: fn.decoders.image, 1-frame clips
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _ImagePrepared(_Prepared):
    """A prepared batch of an image loader: ``encoded[i]`` is one JPEG/PNG, decoded once."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        plans = self.plans[sel]
        return (self.encoded[sel], [p.roi_start for p in plans], [p.roi_end for p in plans],
                [np.array(int(p.flip), dtype=np.int32) for p in plans])


class ImageDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over image shards (``{key}.jpg|.jpeg|.png`` + ``{key}.json``): every
    image is a 1-frame clip, decoded once by ``fn.decoders.image`` (the frames pipeline with
    one DALI sample per image) and repeated to ``num_frames`` frames, as the PyAV loader's
    ``pyav_backend.decode_image`` does, so images and videos share one batch shape.

    Crop box and flip: :func:`plan_box` over the image size read from the file header (PIL
    parses the header only; no decode in Python), the draws ``transform_clip`` makes on the
    PyAV path. Order, cursor, state, resampled mode, quarantine: :class:`DaliLoader`'s.
    Arguments: as :class:`DaliLoader`.
    """

    _prepared_cls = _ImagePrepared

    def _get_codec(self) -> str:
        return "image"  # image JSONs need not record a codec; fn.decoders.image reads both

    def _get_device(self, requested: str) -> str:
        return get_image_decoder_device(requested, "image shards")

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        meta, caption = self._load_meta(index, epoch)
        meta["is_image"] = True  # as the PyAV loader marks image samples
        data = self._read(index, self.table.video)
        try:
            with Image.open(io.BytesIO(data)) as im:  # header only: the size for the box
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise _SampleFailed("decode_error", f"cannot decode image: {e}") from e
        roi_start, roi_end, flip = plan_box(
            meta, index, height=height, width=width, img_size=self.cfg.img_size,
            train=self.train, seed=self.seed, epoch=epoch, random_flip=self.cfg.random_flip,
            crop_scale=self.cfg.crop_scale)
        shard, key = self._where(index)
        plan = ClipPlan(index=index, shard=shard, key=key, frames=np.zeros(1, dtype=np.int32),
                        roi_start=roi_start, roi_end=roi_end, flip=flip)
        return meta, caption, plan, np.frombuffer(data, dtype=np.uint8)

    def _images_per_clip(self) -> int:
        return 1  # decoded once, repeated to num_frames in _to_clip

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        images = dali_to_torch(out)  # [B, C, H, W]
        # T copies (not a stride-0 view): consumers may normalise the batch in place
        return images.unsqueeze(1).expand(-1, self.cfg.num_frames, -1, -1, -1).contiguous()
