"""The worker-process half of the PyAV (and decord) loader: a map-style dataset whose item i is
a rank's i-th batch of a pass, decoded in torch DataLoader workers with the backend's decode
function (:class:`megavid.data.loader.VideoTextLoader` runs it)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from megavid.config import DataConfig
from megavid.data import pyav_backend
from megavid.data.frames import decode_jpeg, frames_at
from megavid.data.order import (
    _EpochPlan,
    _SampleFailed,
    _TooManyFailures,
    choose_caption,
    fill_rank_batch,
)
from megavid.data.sampling import get_sample_rng, sample_timestamps
from megavid.data.table import SampleTable
from megavid.data.text import tokenize
from megavid.data.transforms import is_flip_safe, sample_texts, transform_clip
from megavid.shards.format import IMAGE_EXTS, get_frame_times


FRAMES_MAX_SPAN = 1 << 22
"""Frames shards: a clip's chosen frames are read with one ``pread`` (first to last) when that
span is at most this many bytes (4 MiB: every clip of 8 fps, 256-pixel JPEGs up to ~16 s),
else frame by frame (no reading of a long clip's every frame for 8 of them)."""


class _BatchDataset(Dataset):
    """Map-style dataset whose item i is this rank's i-th batch of the pass."""

    def __init__(self, table: SampleTable, cfg: DataConfig, plan: _EpochPlan, *, train: bool,
                 seed: int, decode_fn: Callable, tokenizer: Any) -> None:
        self.table = table
        self.cfg = cfg
        self.plan = plan
        self.train = train
        self.seed = seed
        self.decode_fn = decode_fn
        self._files: dict[int, int] = {}  # tar_id -> fd, opened lazily in each worker
        self._bad: dict[int, tuple[str, str]] = {}  # index -> (reason, detail), this pass
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.plan.steps

    # -- reading ----------------------------------------------------------------------------
    def _read(self, index: int, which: np.ndarray) -> bytes:
        return self._pread(index, which[index])

    def _pread(self, index: int, span: np.ndarray) -> bytes:
        """The bytes at ``span`` = (offset, size) of sample ``index``'s tar."""
        tid = int(self.table.tar_id[index])
        fd = self._files.get(tid)
        if fd is None:
            fd = self._files[tid] = os.open(self.table.tars[tid], os.O_RDONLY)
        offset, size = (int(v) for v in span)
        data = os.pread(fd, size, offset)  # pread: no shared file position between readers
        if len(data) != size:
            raise _SampleFailed("truncated_shard", f"member ends after {len(data)} of {size} bytes")
        return data

    def _read_frames(self, index: int, chosen: list[int]) -> list[memoryview]:
        """The JPEG bytes of stored frames ``chosen`` of a frames sample, with one ``pread``
        from the first chosen frame to the end of the last when they lie within
        ``FRAMES_MAX_SPAN`` bytes (the frames of a clip are adjacent members of one tar),
        else one per frame."""
        spans = self.table.frames[index]
        offs = [spans[j].tolist() for j in chosen]
        lo = min(o for o, _ in offs)
        hi = max(o + n for o, n in offs)
        if hi - lo > FRAMES_MAX_SPAN:
            return [memoryview(self._pread(index, (o, n))) for o, n in offs]
        view = memoryview(self._pread(index, (lo, hi - lo)))
        return [view[o - lo:o - lo + n] for o, n in offs]

    def load_sample(self, index: int, epoch: int) -> tuple[torch.Tensor, str, dict]:
        """Decode and transform one sample: (uint8 [T, C, H, W], caption, sample JSON)."""
        cfg = self.cfg
        try:
            meta = json.loads(self._read(index, self.table.meta))
        except (ValueError, UnicodeDecodeError) as e:
            raise _SampleFailed("bad_json", str(e)) from e
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        caption = choose_caption(meta, train=self.train, seed=self.seed, epoch=epoch, index=index)
        stored = self.table.frames
        try:
            video = self._read(index, self.table.video) if stored is None else b""
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        # Image samples carry meta["is_image"] = True; video metas stay the sample JSON as
        # stored (every backend returns the same), so readers use meta.get("is_image", False).
        is_image = stored is None and self.table.video_ext[index] in IMAGE_EXTS
        try:
            if is_image:  # a 1-frame clip, repeated to T frames (see pyav_backend.decode_image)
                meta["is_image"] = True
                clip = torch.from_numpy(pyav_backend.decode_image(video, cfg.num_frames))
                clip = transform_clip(
                    clip.permute(0, 3, 1, 2), cfg.img_size, train=self.train,
                    rng=get_sample_rng(self.seed, epoch, index, "augment") if self.train else None,
                    allow_flip=cfg.random_flip and is_flip_safe(sample_texts(meta)),
                    scale=cfg.crop_scale)
                return clip, caption, meta
            duration = float(meta["duration"])
            ts = sample_timestamps(
                cfg.num_frames, duration, start=meta.get("start"), end=meta.get("end"),
                train=self.train,
                rng=get_sample_rng(self.seed, epoch, index, "frames") if self.train else None)
            if stored is None:
                frames = self.decode_fn(video, ts, fps=meta.get("fps") or None,
                                        num_video_frames=meta.get("num_frames") or None)
            else:  # frames shards: the stored JPEGs on screen at ts, decoded with PIL
                chosen = frames_at(get_frame_times(meta), ts)
                frames = np.stack([decode_jpeg(jpeg)
                                   for jpeg in self._read_frames(index, chosen.tolist())])
            clip = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, H, W, C] -> [T, C, H, W]
            clip = transform_clip(
                clip, cfg.img_size, train=self.train,
                rng=get_sample_rng(self.seed, epoch, index, "augment") if self.train else None,
                allow_flip=cfg.random_flip and is_flip_safe(sample_texts(meta)),
                    scale=cfg.crop_scale)
        except Exception as e:  # noqa: BLE001
            # Anything a broken file or JSON makes FFmpeg/PyAV/numpy raise is that sample's
            # fault: count and replace it rather than kill the worker (and the run).
            raise _SampleFailed("decode_error", f"{type(e).__name__}: {e}") from e
        return clip, caption, meta

    # -- batches ----------------------------------------------------------------------------
    def _where(self, index: int) -> tuple[str, str]:
        return os.path.basename(self.table.tars[self.table.tar_id[index]]), self.table.keys[index]

    def __getitem__(self, step: int) -> dict[str, Any]:
        t0 = time.process_time()
        out = self._get_batch(step)
        out["_feed_cpu_s"] = time.process_time() - t0  # the loader's stats()
        return out

    def _get_batch(self, step: int) -> dict[str, Any]:
        plan = self.plan
        failed: list[tuple[int, str, str]] = []
        try:
            slots = fill_rank_batch(
                plan, step, num_samples=len(self.table), train=self.train, seed=self.seed,
                load=lambda index: self.load_sample(index, plan.epoch),
                known_bad=self._bad.get, mark_bad=self._mark_bad, failed=failed,
                max_failures=self.cfg.max_consecutive_failures, where=self._where)
        except _TooManyFailures as e:
            return {"_abort": str(e), "_failed": failed}
        videos = [clip for _, _, (clip, _, _) in slots]
        captions = [cap for _, _, (_, cap, _) in slots]
        input_ids, attention_mask = tokenize(self.tokenizer, captions, self.cfg.max_text_len)
        if videos:
            video = torch.stack(videos)
        else:
            video = torch.zeros((0, self.cfg.num_frames, 3, self.cfg.img_size, self.cfg.img_size),
                                dtype=torch.uint8)
        return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask,
                "captions": captions, "keys": [self.table.keys[i] for i, _, _ in slots],
                "meta": [meta for _, _, (_, _, meta) in slots],
                "valid": torch.tensor([v for _, v, _ in slots], dtype=torch.bool),
                "indices": torch.tensor([i for i, _, _ in slots], dtype=torch.int64),
                "_failed": failed}

    def _mark_bad(self, index: int, reason: str, detail: str) -> None:
        # this worker's memory of the pass's bad samples (not decoded again; a cache only)
        self._bad[index] = (reason, detail)

    def __del__(self) -> None:
        for fd in self._files.values():
            try:
                os.close(fd)
            except OSError:
                pass


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # items are whole batches already (no default_convert of the meta dicts)


def _worker_init(_: int) -> None:
    # One decode thread per worker: the workers already use the cores.
    torch.set_num_threads(1)
    # SLURM preemption and `kill` signal every process of the job, workers included. A worker
    # that dies of SIGTERM makes the main process raise before it can write its preemption
    # checkpoint; so workers ignore SIGTERM/SIGINT and leave shutdown to the main process
    # (which stops them, and torch's watchdog ends them if the main process dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
