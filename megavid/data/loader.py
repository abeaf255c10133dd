"""The resumable, world-size independent video-text loader (``build_loader``).

Design (why resume is exact):

* The split's samples are the lines of its shards' ``index.jsonl`` (N samples, in shard order;
  a sample's *index* is its line number). Samples are read by seeking into the tar with the
  member offsets of the index: no sequential tar streaming, so any sample order is possible.
* Each epoch has a permutation of 0..N-1 drawn from (seed, epoch) (identity for eval or when
  ``data.shuffle`` is off). The loader state is a GLOBAL cursor: how many permutation positions
  this epoch has consumed, summed over all ranks.
* Global step i (counted from the cursor c at which iteration started) takes positions
  [c + i*G, c + (i+1)*G) with G = B x world_size; rank r takes the contiguous slice
  [c + i*G + r*B, +B). Worker w of a rank builds that rank's batches w, w+nw, ... and torch's
  DataLoader yields workers round-robin, so the order never depends on timing.
* ``state_dict()`` = {"epoch", "cursor", "seed", "num_samples"}. A loader built later, with any
  world size or worker count, that loads it continues with exactly the positions >= cursor.
  The cursor only advances when a batch is handed out (prefetched batches do not count).
* Train drops the tail (``N - cursor < G`` positions) so every rank runs the same number of
  steps and no collective hangs at the epoch end; with ``data.drop_last=false`` the tail is
  filled by wrapping around to the start of the permutation instead. Eval visits every sample
  exactly once: the last step may be short; for world_size > 1 every rank's part of that step is
  padded to the same size with repeated samples marked ``batch["valid"] = False``, so
  all-gathers have equal shapes and metrics count each sample once.

Images, mixing, resampling:

* Image samples (``{key}.jpg|.jpeg|.png`` + ``{key}.json``) are clips of one frame, decoded with
  PIL (PyAV/decord loaders) or DALI's ``fn.decoders.image`` (``dali.ImageDaliLoader``) and
  repeated to ``num_frames`` so batches stay rectangular [B, T, C, H, W]; their meta carries
  ``is_image: True``. ``auto`` picks DALI on a GPU, else PIL.
* ``data.image_ratio`` > 0 with ``data.image_train`` builds a ``MixedLoader``: every rank's
  train batch is ``batch_size x (1 - ratio)`` clips then ``batch_size x ratio`` images, from two
  loaders with their own cursors; the state holds both (``megavid.data.mixing``).
* ``data.resampled``: global step s draws G samples with replacement from an RNG seeded by
  (seed, s) (:func:`get_resampled_indices`); iteration never ends, ``len()`` is a nominal epoch
  (N // G steps) and the state's cursor is the step count. Every backend (PyAV, decord, DALI)
  runs it: they share ``VideoTextLoader.__iter__`` and differ only in ``_iter_plan``.

Per-sample randomness (frame offsets, caption choice, crop/flip) comes from
``sampling.get_sample_rng(seed, epoch, index, stream)``: a sample looks the same in every
worker, rank, world size and decode backend.

Faults: a sample whose members cannot be read, whose JSON is malformed, that has no caption, or
whose video does not decode is *bad*: it is skipped and its slot is filled by a replacement
(:func:`fill_rank_batch`, shared by every backend). The rule, for the sample at position p of
the global step [s, s+G) (slot q = p - s):

* Candidates come first from the positions s + q + k*G (mod the permutation length L) with
  k = 1 + (k0 + t) mod (L//G - 1), t = 0, 1, ..., and k0 drawn from
  ``np.random.default_rng([seed, 2, epoch, p])`` (:func:`replacement_order`): never a
  position of the current global step, and two slots of one step (of any rank) never share a
  position, so a replacement is not in the step on any rank (when L >= 2G). Then every sample
  index, from one drawn from the same generator on, still skipping the step; only a split too
  small for that (fewer good samples outside the step than bad ones in it) falls back to
  another rank's sample of the step, and last to a repeat within the rank's batch.
* A candidate that is bad, or already in the rank's batch, is skipped. Whether a sample is bad
  depends on (seed, epoch, index) only (its frames are drawn from them; a transient read error
  is the exception), so the batch depends neither on the workers, their timing, nor on which
  worker already knew a sample was bad: workers remember the bad samples they met this pass
  and do not decode them again, which only saves time. A replacement is decoded with its own
  (seed, epoch, index) draws (it then appears twice in the epoch, in different steps); in
  eval it is marked invalid.
* ``data.max_consecutive_failures`` bad samples in a row for one slot (the sample and its
  replacement candidates) abort with a :class:`DataError` naming the shard.

Counting: workers report every bad sample they meet with its reason; the main process keeps the
set of distinct bad sample indices of the current epoch (of the pass, for eval) and counts each
once in ``loader.failures`` (Counter reason -> n). ``failures`` is cumulative over the loader's
life: a bad sample counts once in every epoch that meets it (at its position, or as a
replacement candidate), so after one full train epoch it equals the epoch's distinct bad
samples by reason. A loader built on resume starts again from zero (it is not in the
state_dict). Each bad sample is logged once per loader ("skipped sample KEY in shard S
(reason: detail); N distinct bad samples so far this epoch: {...}"; the first _LOG_SAMPLES,
then a count every _LOG_EVERY), and every pass that met bad samples ends with a summary line.
Resampled mode keeps its draws as they are (with replacement, so a batch may hold a sample
twice by design); only replacements follow the rule.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megavid.config import DataConfig
from megavid.data import pyav_backend
from megavid.data.frames import decode_jpeg, frames_at
from megavid.data.sampling import get_sample_rng, sample_timestamps
from megavid.data.text import build_tokenizer, get_tokenizer_path, tokenize
from megavid.data.transforms import is_flip_safe, sample_texts, transform_clip
from megavid.errors import ConfigError, DataError
from megavid.shards.format import IMAGE_EXTS, get_frame_times

logger = logging.getLogger("megavid.data")

SPLITS = ("train", "val", "test")
_LOG_SAMPLES = 1000  # distinct bad samples logged one by one, then one line every _LOG_EVERY
_LOG_EVERY = 1000


# --------------------------------------------------------------------------------------------
# The sample table
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class SampleTable:
    """Where every sample of a split lives, in compact arrays (shared by forked workers).

    Row i is the sample with global index i (index.jsonl order over the split's shards).
    """

    tars: list[str]
    """Absolute tar paths; ``tar_id`` indexes this list."""
    keys: list[str]
    tar_id: np.ndarray  # int32 [N]
    video: np.ndarray  # int64 [N, 2]: offset of the data, size
    meta: np.ndarray  # int64 [N, 2]: offset and size of the sample JSON
    video_ext: list[str]
    frames: list[np.ndarray] | None = None
    """Frames shards (``megavid.data.frames``): per sample, int64 [n, 2] offset and size of
    each stored JPEG frame in time order (``video`` then spans frame 0); None for video shards."""

    def __len__(self) -> int:
        return len(self.keys)


def build_sample_table(spec: str, root: str | Path | None = None) -> SampleTable:
    """Read the ``index.jsonl`` of every shard folder that ``spec`` names.

    Args:
        spec: a split name, shard folder, tar file or glob (see ``shards.list_shards``).
        root: the dataset root (``data.root``) for split names.
    """
    from megavid.shards.format import is_frame_ext, list_shards, read_index

    tars = list_shards(spec, root)
    by_dir: dict[Path, set[str]] = {}
    for t in tars:
        by_dir.setdefault(t.parent.resolve(), set()).add(t.name)
    tar_paths: list[str] = []
    tar_ids: dict[str, int] = {}
    keys, tar_id, video, meta, exts = [], [], [], [], []
    frame_spans: list[np.ndarray] = []
    for d, names in sorted(by_dir.items()):
        for e in read_index(d):
            if e["shard"] not in names:
                continue  # a glob naming a subset of the folder's shards
            path = str(d / e["shard"])
            if path not in tar_ids:
                tar_ids[path] = len(tar_paths)
                tar_paths.append(path)
            members = e["members"]
            vext = next((x for x in members if x not in ("json", "txt")), None)
            if vext is None or "json" not in members:
                raise DataError(f"index entry {e.get('key')!r} of {d}/index.jsonl has no video "
                                "or json member; re-create the shards")
            keys.append(e["key"])
            tar_id.append(tar_ids[path])
            video.append(members[vext])
            meta.append(members["json"])
            exts.append(vext)
            fexts = sorted(x for x in members if is_frame_ext(x))
            frame_spans.append(np.asarray([members[x] for x in fexts], dtype=np.int64)
                               .reshape(-1, 2))
    if not keys:
        raise DataError(f"the shards of '{spec}' hold no samples (their index.jsonl is empty); "
                        "re-create them with `megavid make-shards`")
    return SampleTable(
        tars=tar_paths, keys=keys, tar_id=np.asarray(tar_id, dtype=np.int32),
        video=np.asarray(video, dtype=np.int64).reshape(-1, 2),
        meta=np.asarray(meta, dtype=np.int64).reshape(-1, 2), video_ext=exts,
        frames=frame_spans if all(len(f) for f in frame_spans) else None,
    )


def get_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool,
                    block: int = 1) -> np.ndarray:
    """The epoch's sample order: a permutation drawn from (seed, epoch), or the identity.

    Args:
        num_samples: N.
        seed: the run seed.
        epoch: the epoch.
        shuffle: False gives 0..N-1.
        block: shuffle the runs [0, block), [block, 2*block), ... as units, each run kept
            together and in index order (``data.shuffle_block``); 1 shuffles single samples.
    """
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    if block <= 1:
        return rng.permutation(num_samples)
    starts = rng.permutation(-(-num_samples // block)) * block
    order = (starts[:, None] + np.arange(block)[None, :]).ravel()
    return order[order < num_samples].astype(np.int64)


def get_resampled_indices(num_samples: int, seed: int, first_step: int, steps: int,
                          global_batch: int) -> np.ndarray:
    """Resampled mode's samples for global steps ``first_step .. first_step+steps-1``: each
    step's ``global_batch`` indices drawn with replacement from an RNG seeded by (seed, step),
    concatenated (int64 [steps * global_batch]; rank r takes slice [r*B, (r+1)*B) of a step).

    Args:
        num_samples: N.
        seed: the run seed.
        first_step: the first global step.
        steps: how many steps.
        global_batch: G = batch_size x world_size.
    """
    # The constant 1 keeps these seeds apart from get_permutation's [seed, epoch].
    draws = [np.random.default_rng([int(seed), 1, int(s)]).integers(num_samples, size=global_batch)
             for s in range(first_step, first_step + steps)]
    return np.concatenate(draws).astype(np.int64) if draws else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Batch building (runs in the DataLoader workers)
# --------------------------------------------------------------------------------------------
class _SampleFailed(Exception):
    """A sample that cannot be used; ``reason`` keys ``loader.failures`` (PyAV and DALI)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def choose_caption(meta: dict, *, train: bool, seed: int, epoch: int, index: int) -> str:
    """The caption a sample is trained/evaluated with (shared by every backend).

    Train: one of its non-empty captions, drawn from the sample's (seed, epoch, index) "caption"
    RNG; eval: the first. Raises _SampleFailed("no_caption") when it has none.
    """
    captions = meta.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    captions = [c for c in (captions or []) if isinstance(c, str) and c.strip()]
    if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        captions = [meta["caption"]]
    if not captions:
        raise _SampleFailed("no_caption", "the sample JSON has no non-empty caption")
    if train:
        return captions[int(get_sample_rng(seed, epoch, index, "caption").integers(len(captions)))]
    return captions[0]


@dataclass(slots=True)
class _EpochPlan:
    """What one pass over the loader reads: fixed when iteration starts."""

    epoch: int
    start: int  # the global cursor when iteration started
    perm: np.ndarray
    steps: int
    global_batch: int
    batch_size: int
    rank: int
    wrap: bool  # positions >= N wrap around (train without drop_last)


class _TooManyFailures(DataError):
    """``data.max_consecutive_failures`` bad samples in a row for one slot (or none good)."""


def replacement_order(plan: _EpochPlan, step_start: int, slot: int, seed: int,
                      num_samples: int) -> Iterator[int]:
    """The candidate indices that may replace the bad sample at global slot ``slot`` of the
    global step whose first position is ``step_start`` (module docstring, "Faults"), in order.

    First the positions ``step_start + slot + k*G`` (mod L = len(plan.perm)) for k = 1..L//G-1,
    walked from a k drawn from (seed, epoch, failed position): outside the current step, and
    disjoint between the slots of a step. Then every sample index, from one drawn from the same
    generator on. The caller skips candidates that are bad or already taken; an index may come
    twice (once from each part).
    """
    perm, g = plan.perm, plan.global_batch
    length = len(perm)
    rng = np.random.default_rng([int(seed), 2, int(plan.epoch), int(step_start + slot)])
    m = length // g - 1
    if m > 0:
        k0 = int(rng.integers(m))
        for t in range(m):
            yield int(perm[(step_start + slot + (1 + (k0 + t) % m) * g) % length])
    i0 = int(rng.integers(num_samples))
    for t in range(num_samples):
        yield (i0 + t) % num_samples


def fill_rank_batch(plan: _EpochPlan, step: int, *, num_samples: int, train: bool, seed: int,
                    load: Callable[[int], Any],
                    known_bad: Callable[[int], tuple[str, str] | None],
                    mark_bad: Callable[[int, str, str], None],
                    failed: list[tuple[int, str, str]], max_failures: int,
                    where: Callable[[int], tuple[str, str]]) -> list[tuple[int, bool, Any]]:
    """This rank's part of global step ``step`` of ``plan``, bad samples replaced (module
    docstring, "Faults"; every backend builds its batches with it).

    Args:
        plan: the pass.
        step: the step of the pass.
        num_samples: N (the split's samples).
        train: train (replacements valid) or eval (replacements marked invalid, and a short
            last step).
        seed: the run seed (replacement draws).
        load: index -> the loaded sample; raises ``_SampleFailed`` for a bad one.
        known_bad: index -> (reason, detail) when the sample is already known to be bad (then
            it is not loaded again), else None. Only saves work: the result does not depend on it.
        mark_bad: called with (index, reason, detail) when ``load`` fails.
        failed: gets (index, reason, detail) of every bad sample met (repeats included: the
            main process dedupes).
        max_failures: ``data.max_consecutive_failures``.
        where: index -> (shard file name, key), for messages.

    Returns:
        [(index, valid, loaded)] for the rank's slots, in order.

    Raises:
        _TooManyFailures: ``max_failures`` bad samples in a row for one slot, or no good one.
    """
    n, g, b = num_samples, plan.global_batch, plan.batch_size
    length = len(plan.perm)
    step_start = plan.start + step * g
    first = step_start + plan.rank * b
    size = b if train else max(0, min(b, n - step_start))
    out: list[tuple[int, bool, Any]] = []
    taken: set[int] = set()  # indices in this rank's batch so far
    in_step: set[int] | None = None

    for j in range(size):
        pos = first + j
        in_range = pos < n or plan.wrap
        tried: set[int] = set()  # bad candidates of this slot (not counted twice)

        def attempt(index: int) -> tuple[bool, Any]:
            bad = known_bad(index)
            if bad is None:
                try:
                    return True, load(index)
                except _SampleFailed as e:
                    bad = (e.reason, str(e)[:300])
                    mark_bad(index, *bad)
            failed.append((index, *bad))
            tried.add(index)
            if len(tried) >= max_failures:
                shard, key = where(index)
                raise _TooManyFailures(
                    f"{len(tried)} samples in a row failed to load for one batch slot (the "
                    f"sample and its replacements; last: shard {shard}, key {key}: {bad[0]}: "
                    f"{bad[1][:200]}); check the shards with `megavid verify-shards` and "
                    "re-create them, or raise data.max_consecutive_failures")
            return False, None

        index = int(plan.perm[pos % length])
        ok, loaded = attempt(index)
        valid = in_range
        if not ok:
            valid = in_range and train  # an eval stand-in would count another sample twice
            if in_step is None:
                in_step = {int(plan.perm[p % length]) for p in range(step_start, step_start + g)}
            # strictest first: outside the step (every rank) and the batch; outside the
            # batch; anything good (a split with fewer good samples than the batch needs)
            for strict in (2, 1, 0):
                for cand in replacement_order(plan, step_start, pos - step_start, seed, n):
                    if cand in tried or (strict >= 1 and cand in taken) or (
                            strict == 2 and cand in in_step):
                        continue
                    ok, loaded = attempt(cand)
                    if ok:
                        index = cand
                        break
                if ok:
                    break
            if not ok:
                shard, key = where(index)
                raise _TooManyFailures(f"no sample of the split loads (last: shard {shard}, "
                                       f"key {key}); check the shards with `megavid "
                                       "verify-shards` and re-create them")
        taken.add(index)
        out.append((index, valid, loaded))
    return out


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
                frames = np.stack([decode_jpeg(self._pread(index, stored[index][j]))
                                   for j in chosen.tolist()])
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


@functools.lru_cache(maxsize=4)
def _get_tokenizer(name: str) -> Any:
    """One tokenizer per name for all loaders of the process (train, val, test, re-builds):
    loaders only encode with it, and loading costs ~0.3 s each time."""
    return build_tokenizer(name)


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


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
class VideoTextLoader:
    """Batches of decoded clips and tokenized captions for one rank (see the module docstring).

    Iterating yields dicts: "video" uint8 [B, T, C, H, W], "input_ids" / "attention_mask" int64
    [B, L], "captions", "keys", "meta" (lists), "valid" bool [B] (False marks eval padding),
    "indices" int64 [B] (global sample indices).
    """

    def __init__(self, table: SampleTable, data_cfg: DataConfig, *, split: str, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 decode_fn: Callable = pyav_backend.decode_clip) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not in 0..world_size-1 (world_size={world_size})")
        self.table = table
        self.cfg = data_cfg
        self.split = split
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.cursor = 0
        self.decode_fn = decode_fn
        # Built in the main process: forked workers inherit it (no per-worker load).
        self.tokenizer = _get_tokenizer(data_cfg.tokenizer)
        self.batch_size = data_cfg.batch_size if train else data_cfg.eval_batch_size
        self.failures: Counter = Counter()
        """Bad samples skipped, by reason: each distinct bad sample once per epoch that met it,
        cumulative over this loader's life (module docstring, "Counting")."""
        self._epoch_bad: dict[int, str] = {}  # index -> reason: distinct bad samples this epoch
        self._epoch_failures: Counter = Counter()  # the same, by reason
        self._bad_epoch: int | None = None  # the epoch _epoch_bad belongs to
        self._logged: set[int] = set()  # bad samples logged (once per loader)
        n, g = len(table), self.global_batch
        if train and data_cfg.drop_last and not data_cfg.resampled and n < g:
            raise DataError(
                f"split '{split}' has {n} samples, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world_size} ranks = {g}); lower "
                "data.batch_size or add data")

    @property
    def num_samples(self) -> int:
        return len(self.table)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def _wrap(self) -> bool:
        return self.train and not self.cfg.drop_last

    @property
    def _resampled(self) -> bool:
        return self.train and self.cfg.resampled

    def _steps_from(self, cursor: int) -> int:
        if self._resampled:  # a nominal epoch: N // G steps (at least one)
            return max(1, self.num_samples // self.global_batch)
        left = max(0, self.num_samples - cursor)
        if self.train and self.cfg.drop_last:
            return left // self.global_batch
        return -(-left // self.global_batch)

    def __len__(self) -> int:
        """Batches per full epoch per rank (a resumed pass yields only the remaining ones)."""
        return self._steps_from(0)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless it is already the current epoch
        (then the cursor, e.g. restored by ``load_state_dict``, is kept). A no-op in resampled
        mode, which has no epoch boundary (its position is the step count alone)."""
        if epoch != self.epoch and not self._resampled:
            self.epoch = epoch
            self.cursor = 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "cursor", "seed", "num_samples"}: the position after the batches handed
        out so far (independent of world size and workers)."""
        sd = {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
              "num_samples": self.num_samples}
        if self._resampled:
            sd["resampled"] = True  # cursor = global steps taken (not permutation positions)
        return sd

    def load_state_dict(self, sd: dict[str, int]) -> None:
        """Continue from a saved position (any world size and worker count).

        Raises:
            DataError: the state was saved over a different number of samples.
        """
        if int(sd["num_samples"]) != self.num_samples:
            raise DataError(
                f"loader state was saved over {sd['num_samples']} samples but split "
                f"'{self.split}' now has {self.num_samples}; resume with the same shards or "
                "start a new run")
        if int(sd["seed"]) != self.seed:
            logger.warning("loader state seed %s differs from seed %s: keeping the saved one so "
                           "the epoch's order continues", sd["seed"], self.seed)
        if bool(sd.get("resampled", False)) != self._resampled:
            raise DataError(
                f"loader state was saved with data.resampled={bool(sd.get('resampled', False))} "
                f"but this run has data.resampled={self._resampled}; resume with the same "
                "data.resampled or start a new run")
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.cursor = int(sd["cursor"])

    def _plan(self) -> _EpochPlan:
        return _EpochPlan(
            epoch=self.epoch, start=self.cursor,
            perm=get_permutation(self.num_samples, self.seed, self.epoch,
                                 self.train and self.cfg.shuffle, self.cfg.shuffle_block),
            steps=self._steps_from(self.cursor), global_batch=self.global_batch,
            batch_size=self.batch_size, rank=self.rank, wrap=self._wrap)

    @property
    def epoch_failures(self) -> Counter:
        """The current epoch's (eval: pass's) distinct bad samples, by reason."""
        return Counter(self._epoch_failures)

    def _begin_pass(self, plan: _EpochPlan) -> None:
        """A pass from the start of an epoch (or another epoch, or a resampled chunk) starts a
        new set of the epoch's bad samples; a pass that continues an epoch keeps it."""
        if plan.start == 0 or plan.epoch != self._bad_epoch:
            self._bad_epoch = plan.epoch
            self._epoch_bad = {}
            self._epoch_failures = Counter()

    def _record_failures(self, failed: list[tuple[int, str, str]]) -> None:
        """Count and log the bad samples a batch met: each distinct one once per epoch (the
        workers report every meeting, and several workers may meet the same sample)."""
        for index, reason, detail in failed:
            index = int(index)
            if index in self._epoch_bad:
                continue
            self._epoch_bad[index] = reason
            self._epoch_failures[reason] += 1
            self.failures[reason] += 1
            if index in self._logged:
                continue  # logged in an earlier epoch (the pass's summary counts it)
            self._logged.add(index)
            shard = os.path.basename(self.table.tars[int(self.table.tar_id[index])])
            nth = len(self._logged)
            if nth <= _LOG_SAMPLES:
                logger.warning("skipped sample %s in shard %s (%s: %s); %d distinct bad samples "
                               "so far this epoch: %s", self.table.keys[index], shard, reason,
                               detail[:200], len(self._epoch_bad), dict(self._epoch_failures))
            elif nth % _LOG_EVERY == 0:
                logger.warning("%d distinct bad samples so far this epoch: %s (lines per sample "
                               "stop after %d; `megavid verify-shards` lists them all)",
                               len(self._epoch_bad), dict(self._epoch_failures), _LOG_SAMPLES)

    def _log_pass_summary(self, plan: _EpochPlan) -> None:
        if self._epoch_bad:
            logger.warning("%s pass over epoch %d of split '%s' done: %d distinct bad samples "
                           "skipped and replaced this epoch: %s; total over this loader's "
                           "epochs: %s", "train" if self.train else "eval", plan.epoch,
                           self.split, len(self._epoch_bad), dict(self._epoch_failures),
                           dict(self.failures))

    def _resampled_plan(self) -> _EpochPlan:
        """Resampled (infinite) mode's plan from the cursor (= global steps taken): global step
        s draws its G samples with replacement from ``get_resampled_indices`` (seeded by
        (seed, s)), so the order depends on the step count alone. Steps are read in chunks of
        one nominal epoch L = len(self), aligned to multiples of L (chunk c = steps
        [c*L, (c+1)*L) uses c as the per-sample augmentation epoch), so a resumed run cuts the
        same chunks and sees bit-identical batches."""
        steps_per_chunk, g = len(self), self.global_batch
        chunk, offset = divmod(self.cursor, steps_per_chunk)
        self.epoch = chunk
        return _EpochPlan(
            epoch=chunk, start=offset * g,
            perm=get_resampled_indices(self.num_samples, self.seed, chunk * steps_per_chunk,
                                       steps_per_chunk, g),
            steps=steps_per_chunk - offset, global_batch=g, batch_size=self.batch_size,
            rank=self.rank, wrap=True)

    def _iter_plan(self, plan: _EpochPlan) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``plan``, decoded (the decode backend's part: DataLoader
        workers here, a DALI pipeline in ``megavid.data.dali``). Moves no cursor."""
        dataset = _BatchDataset(self.table, self.cfg, plan, train=self.train, seed=self.seed,
                                decode_fn=self.decode_fn, tokenizer=self.tokenizer)
        nw = self.cfg.num_workers
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=nw, collate_fn=_identity,
            worker_init_fn=_worker_init if nw > 0 else None, persistent_workers=False)
        # The DataLoader hands item i to worker i % nw and yields items in index order (its
        # default in-order delivery), so the batch sequence never depends on worker timing.
        for batch in loader:
            self._record_failures(batch.pop("_failed"))
            if "_abort" in batch:
                raise DataError(batch["_abort"])
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._resampled:  # never ends: one nominal epoch (chunk) after another
            while True:
                plan = self._resampled_plan()
                self._begin_pass(plan)
                for batch in self._iter_plan(plan):
                    self.cursor += 1
                    yield batch
                self._log_pass_summary(plan)
        plan = self._plan()
        if plan.steps == 0:
            self._end_of_pass()
            return
        self._begin_pass(plan)
        n = self.num_samples
        for step, batch in enumerate(self._iter_plan(plan)):
            self.cursor = plan.start + (step + 1) * plan.global_batch
            if not plan.wrap:
                self.cursor = min(self.cursor, n)
            yield batch
        self._log_pass_summary(plan)
        self._end_of_pass()

    def _end_of_pass(self) -> None:
        # A finished train pass moves to the next epoch (a trainer that calls set_epoch(e + 1)
        # afterwards finds it there); an eval pass rewinds so the split can be evaluated again.
        if self.train:
            self.epoch += 1
        self.cursor = 0


# --------------------------------------------------------------------------------------------
# Builders and backends
# --------------------------------------------------------------------------------------------
def get_split_spec(data_cfg: DataConfig, split: str) -> str:
    """The shard spec of a split name (train/val/test: data.<split>), or the spec itself."""
    if split in SPLITS:
        return getattr(data_cfg, split)
    return split  # a folder / glob given directly


def read_split_meta(data_cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """Every sample JSON of a split, in index order, read by seeking into the tars (no decode).

    A member that is not valid JSON gives ``{}``: the loader skips and counts such a sample.

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' or a shard spec.
    """
    table = build_sample_table(get_split_spec(data_cfg, split), data_cfg.root)
    out: list[dict[str, Any]] = []
    fds: dict[int, int] = {}
    try:
        for i in range(len(table)):
            tid = int(table.tar_id[i])
            if tid not in fds:
                fds[tid] = os.open(table.tars[tid], os.O_RDONLY)
            offset, size = (int(v) for v in table.meta[i])
            try:
                out.append(json.loads(os.pread(fds[tid], size, offset)))
            except ValueError:
                out.append({})
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def build_pyav_loader(data_cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                      world_size: int = 1, seed: int = 0, epoch: int = 0,
                      decode_fn: Callable = pyav_backend.decode_clip) -> VideoTextLoader:
    """The PyAV (CPU) loader over the shards of ``split``; see :func:`build_loader`.

    On frames shards (``megavid.data.frames``) it is the no-DALI fallback: the worker processes
    read the stored JPEGs on screen at the sampled timestamps and decode them with PIL, then apply
    the same transforms (same per-sample draws) as for video.

    Args:
        decode_fn: the video decode function, with ``pyav_backend.decode_clip``'s signature
            (``decord_backend.decode_clip`` for ``data.backend=decord``); the rest as
            :func:`build_loader`."""
    get_tokenizer_path(data_cfg.tokenizer)  # a config error before the index is read
    # frames shards: the same loader decodes the stored JPEGs with PIL (SampleTable.frames)
    table = build_sample_table(get_split_spec(data_cfg, split), data_cfg.root)
    return VideoTextLoader(table, data_cfg, split=split, train=train, rank=rank,
                           world_size=world_size, seed=seed, epoch=epoch, decode_fn=decode_fn)


def _build_dali(data_cfg: DataConfig, split: str, **kw: Any) -> Any:
    try:
        from megavid.data.dali import build_dali_loader
    except ImportError as e:
        raise ConfigError(
            f"data.backend=dali but the DALI backend cannot be imported ({e}); install "
            "megavid[dali] or set data.backend=pyav") from e
    return build_dali_loader(data_cfg, split, **kw)


def _build_decord(data_cfg: DataConfig, split: str, **kw: Any) -> VideoTextLoader:
    from megavid.data.decord_backend import build_decord_loader

    return build_decord_loader(data_cfg, split, **kw)


LOADER_BACKENDS: dict[str, Callable[..., Any]] = {"pyav": build_pyav_loader, "dali": _build_dali,
                                                  "decord": _build_decord}
"""data.backend -> builder with ``build_loader``'s signature. ``megavid.data.dali`` provides
``build_dali_loader(data_cfg, split, *, train, rank, world_size, seed, epoch)`` returning a loader
with the same contract (batches, set_epoch, state_dict, failures); ``decord`` is the PyAV loader
with ``megavid.data.decord_backend.decode_clip`` as its decode function."""


def get_backend(name: str, data_cfg: DataConfig | None = None, split: str = "train"
                ) -> Callable[..., Any]:
    """The loader builder of a decode backend.

    'auto' asks ``megavid.data.dali.select_backend`` with the split's codec: frames shards
    (codec "jpeg", ``make-shards --shard-format frames``) always take DALI's image decoder
    (hardware JPEG on a GPU, DALI CPU otherwise); video shards take DALI "mixed" on a CUDA
    machine for codecs NVDEC reads when that beats PyAV on the machine's cores, else PyAV.
    Falls back to PyAV when the DALI module or its loader is missing.

    Args:
        name: 'auto', 'pyav', 'dali' or 'decord'.
        data_cfg: needed for 'auto' (to find the split's codec).
        split: the split whose codec decides 'auto'.
    """
    if name == "auto":
        name = _resolve_auto(data_cfg, split) if data_cfg is not None else "pyav"
    if name not in LOADER_BACKENDS:
        raise ConfigError(f"data.backend={name!r} is unknown; valid: auto, "
                          f"{', '.join(LOADER_BACKENDS)}")
    return LOADER_BACKENDS[name]


def is_image_split(data_cfg: DataConfig, split: str) -> bool:
    """True when the first sample of the split's first shard folder is an image sample
    (``{key}.jpg|.jpeg|.png``, not a frames sample): 1-frame clips, decoded with PIL (PyAV and
    decord loaders) or DALI's image decoder (``dali.ImageDaliLoader``).

    Args:
        data_cfg: the data config (root).
        split: a split name or shard spec.
    """
    from megavid.shards.format import list_shards

    index = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0].parent / "index.jsonl"
    try:
        with open(index) as f:
            members = json.loads(f.readline() or "{}").get("members", {})
    except (OSError, ValueError):
        return False  # build_sample_table reports a missing or broken index
    return any(ext in IMAGE_EXTS for ext in members)


def _resolve_auto(data_cfg: DataConfig, split: str) -> str:
    try:
        from megavid.data import dali
    except ImportError:
        return "pyav"
    if not all(hasattr(dali, f) for f in ("build_dali_loader", "select_backend",
                                          "get_shard_codec")):
        return "pyav"
    from megavid.shards.format import list_shards

    if is_image_split(data_cfg, split):
        # a GPU decodes JPEGs in its hardware engines (DESIGN.md); without one, PIL in the
        # PyAV loader's worker processes
        backend = "dali" if dali.dali_available() and torch.cuda.is_available() else "pyav"
        logger.info("data.backend=auto -> %s (image shards: %s)", backend,
                    "DALI fn.decoders.image on the GPU" if backend == "dali" else "PIL decode")
        return backend
    shard_dir = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0].parent
    backend, _, reason = dali.select_backend(dali.get_shard_codec(shard_dir))
    logger.info("data.backend=auto -> %s (%s)", backend, reason)
    return backend if backend in LOADER_BACKENDS else "pyav"


def build_loader(data_cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0) -> Any:
    """The loader of one split for one rank, from config.

    Args:
        data_cfg: the ``data`` config section (backend, shards, sizes, workers, ...).
        split: 'train', 'val' or 'test' (resolved through ``data_cfg.<split>``), or a shard spec.
        train: training order and augmentation (shuffle, random frames/captions/crops,
            drop_last) or evaluation (identity order, centre frames, first caption, every
            sample once with ``batch["valid"]``).
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed (permutation and per-sample randomness).
        epoch: the epoch to start in.

    Returns:
        A loader: iterable of batches, ``__len__``, ``set_epoch``, ``state_dict``,
        ``load_state_dict``, ``failures``.
    """
    if data_cfg.name == "synthetic":
        return SyntheticLoader(data_cfg, train=train, rank=rank, world_size=world_size,
                               seed=seed, epoch=epoch)
    if data_cfg.name != "shards":
        raise ConfigError(f"data.name={data_cfg.name!r} is unknown; valid: shards, synthetic")
    builder = get_backend(data_cfg.backend, data_cfg, split)
    if train and split == "train" and data_cfg.image_ratio > 0:
        from megavid.data.mixing import build_mixed_loader  # (mixing imports this module)

        return build_mixed_loader(data_cfg, builder, rank=rank, world_size=world_size,
                                  seed=seed, epoch=epoch)
    return builder(data_cfg, split, train=train, rank=rank, world_size=world_size, seed=seed,
                   epoch=epoch)


class SyntheticLoader:
    """Random clips and fixed captions, no files (``data.name=synthetic``): for engine tests
    and throughput runs without decoding. Same batch contract and state API; 64 batches/epoch."""

    steps_per_epoch = 64

    def __init__(self, data_cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0) -> None:
        self.cfg = data_cfg
        self.train = train
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.batch_size = data_cfg.batch_size if train else data_cfg.eval_batch_size
        self.cursor = 0
        self.failures: Counter = Counter()
        self._tokenizer = _get_tokenizer(data_cfg.tokenizer)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_samples": self.steps_per_epoch * self.batch_size * self.world_size}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.epoch, self.cursor, self.seed = int(sd["epoch"]), int(sd["cursor"]), int(sd["seed"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        b, g, c = self.batch_size, self.batch_size * self.world_size, self.cfg
        while self.cursor < self.steps_per_epoch * g:
            first = self.cursor + self.rank * b
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, first)) % 2**62)
            video = torch.randint(0, 256, (b, c.num_frames, 3, c.img_size, c.img_size),
                                  dtype=torch.uint8, generator=gen)
            captions = [f"synthetic clip {first + j}" for j in range(b)]
            ids, mask = tokenize(self._tokenizer, captions, c.max_text_len)
            self.cursor += g
            yield {"video": video, "input_ids": ids, "attention_mask": mask,
                   "captions": captions, "keys": [f"syn{first + j}" for j in range(b)],
                   "meta": [{} for _ in range(b)], "valid": torch.ones(b, dtype=torch.bool),
                   "indices": torch.arange(first, first + b)}
        if self.train:
            self.epoch += 1
        self.cursor = 0
