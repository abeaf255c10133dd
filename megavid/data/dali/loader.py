"""The DALI loader of video shards (:class:`DaliLoader`): megavid's order, cursor, sampling and
bad-sample rule (the PyAV loader's), with each batch read and planned by the feed stage
(:mod:`megavid.data.dali.feed`) and decoded by one DALI pipeline that lives as long as the
loader (:mod:`megavid.data.dali.stream`); a batch DALI fails on is taken apart sample by sample
and its culprits quarantined (package docstring: :mod:`megavid.data.dali`)."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from megavid.data.dali.devices import get_dali_device, get_shard_codec
from megavid.data.dali.feed import FeedFailed, FeedPool, HeapArena, InlineFeed, Prepared, Spec, \
    Work
from megavid.data.dali.pipelines import (
    _first_error_line,
    build_video_pipeline,
    dali_to_torch,
    one_batch_source,
)
from megavid.data.dali.plan import plan_box, plan_times
from megavid.data.dali.quarantine import Quarantine
from megavid.data.dali.stream import PipelineStream
from megavid.data.loader import VideoTextLoader
from megavid.data.order import (
    _EpochPlan,
    _SampleFailed,
    choose_caption,
    fill_rank_batch,
    get_permutation,
    get_resampled_indices,
)
from megavid.data.pyav_backend import trim_to_gops
from megavid.data.sampling import timestamps_to_indices
from megavid.data.table import SampleTable, build_sample_table
from megavid.data.text import build_tokenizer, tokenize
from megavid.errors import ConfigError, DataError

_Sample = tuple[dict, str, np.ndarray, np.ndarray, bool, list, list]
"""One sample read and planned: (JSON, caption, frame indices int32 [F], crop box float32 [4],
flip, its chunks (uint8 arrays, one per read), its encoded inputs [(chunk, offset, size)])."""

_SLOT_MIN, _SLOT_MAX = 1 << 18, 1 << 26  # feed ring slot size bounds (bytes)


class DaliLoader(VideoTextLoader):
    """Batches of clips decoded by DALI, with megavid's order, cursor, sampling and quarantine.

    A :class:`megavid.data.loader.VideoTextLoader` (the PyAV loader) whose batches are decoded
    by DALI: it inherits the sample table, permutation, per-rank positions, drop_last / wrap /
    eval-padding rules, resampled mode, ``__iter__``, ``__len__``, ``set_epoch``,
    ``state_dict`` and ``load_state_dict``, so a run can switch backends on resume; only
    ``_iter_plan`` (decode a pass with DALI) is its own. The batch contract is the same ("video",
    "input_ids", "attention_mask", "captions", "keys", "meta", "valid", "indices"); "video" is
    on the GPU for ``device='mixed'`` (no round trip through host memory; ``normalize_clip``
    accepts either). On the CPU, "video" shares DALI's output buffer (no copy; DALI allocates
    a new one for every batch).

    One DALI pipeline serves every pass of the loader (:mod:`megavid.data.dali.stream`); it is
    built at the first batch and again only after a quarantine event. The feed stage (read the
    JSON and the frames, choose the caption, plan frames and crop) runs in
    ``data.feed_workers`` processes ahead of the pipeline. :meth:`stats` reports the counters
    (module docstring of :mod:`megavid.data.loader`, "Counters"); :meth:`close` stops the feed
    workers and drops the pipeline (also done when the loader is collected).

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
        feed_workers: feed processes (None: ``data_cfg.feed_workers``; 0: in this process;
            -1: auto, see ``DataConfig.feed_workers``).
        table: the split's sample table, already built (None: read the split's index).
        codec: the shards' codec, already known (None: read it from the index).
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
        feed_workers: int | None = None,
        table: SampleTable | None = None,
        codec: str | None = None,
    ) -> None:
        if table is None:
            spec = getattr(data_cfg, split) if split in ("train", "val", "test") else split
            table = build_sample_table(spec, data_cfg.root)
        # checks rank/world size and that one global batch fits (same messages as PyAV's)
        super().__init__(table, data_cfg, split=split, train=train, rank=rank,
                         world_size=world_size, seed=seed, epoch=epoch)
        self.codec = self._get_codec() if codec is None else codec
        self.device = self._get_device(device)
        self.device_id = torch.cuda.current_device() if self.device == "mixed" else None
        self.num_threads = max(1, num_threads or data_cfg.num_workers)
        self.prefetch = 2
        feed_workers = data_cfg.feed_workers if feed_workers is None else feed_workers
        if feed_workers < -1:
            raise ConfigError(f"data.feed_workers={feed_workers} must be >= -1 (-1: auto, 0: "
                              "prepare batches in the loader's process)")
        self.feed_workers = self._auto_feed_workers() if feed_workers == -1 else feed_workers
        if quarantine is None:
            quarantine = getattr(data_cfg, "quarantine", "") or None
        self.quarantine = (quarantine if isinstance(quarantine, Quarantine)
                           else Quarantine(quarantine))
        self.tokenizer = build_tokenizer(data_cfg.tokenizer)
        self._tar_names = [os.path.basename(t) for t in table.tars]
        self._fds: dict[int, int] = {}
        self._perms: dict[tuple, np.ndarray] = {}
        self._arena: HeapArena | None = None  # where the batch being prepared reads to
        self._reads = 0
        self._stream = PipelineStream(self, feed_workers=self.feed_workers,
                                      prefetch=self.prefetch)
        weakref.finalize(self, _close, self._stream, self._fds)

    def _auto_feed_workers(self) -> int:
        """``data.feed_workers=-1``: a feed process per core that DALI's threads and this
        process leave over, at most 2 (mixed decoder) or 1 (CPU decoder); none when no core is
        left, where a feed process only competes with DALI's CPU decoder."""
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        spare = cores - self.num_threads - 1
        return max(0, min(spare, 2 if self.device == "mixed" else 1))

    def _get_codec(self) -> str:
        """The codec of this loader's shards (decides the DALI device)."""
        return get_shard_codec(Path(self.table.tars[0]).parent)

    def _get_device(self, requested: str) -> str:
        """'cpu' or 'mixed' for this loader's shards (raises when they cannot be decoded)."""
        return get_dali_device(self.codec, requested)

    # -- counters and lifetime ------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """The loader's counters (module docstring of :mod:`megavid.data.loader`, "Counters");
        also "feed_wait_ms_per_batch" (wall time DALI's source waited for the feed),
        "feed_workers", "dropped_batches" (prepared or decoded for a pass that did not come)
        and "reads_per_clip"."""
        return self._stream.stats()

    def close(self) -> None:
        """Stop the feed workers and drop the pipeline (the next pass builds a new one)."""
        self._stream.close()

    def _as_feed_worker(self) -> None:
        """In a forked feed worker: never write the quarantine file, never touch the parent's
        pipeline or feed (the worker only runs :meth:`_prepare_work`)."""
        self.quarantine.path = None
        self._stream = None

    # -- the pass sequence (feed.py, "Work items") ----------------------------------------
    def _spec(self, plan: _EpochPlan) -> Spec:
        return self._resampled, self.seed, plan.epoch, plan.start, plan.steps

    def _next_spec(self, spec: Spec) -> Spec:
        """The pass ``__iter__`` runs after ``spec`` when nothing intervenes: train, the next
        epoch from its start; eval, the same pass again; resampled, the next chunk."""
        resampled, seed, epoch, _, _ = spec
        if resampled:
            return resampled, seed, epoch + 1, 0, len(self)
        return resampled, seed, epoch + 1 if self.train else epoch, 0, self._steps_from(0)

    def _plan_for(self, spec: Spec) -> _EpochPlan:
        """The :class:`_EpochPlan` of a pass (what ``_plan`` / ``_resampled_plan`` made)."""
        resampled, seed, epoch, start, steps = spec
        key = (resampled, seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if resampled:
                per_chunk = len(self)
                perm = get_resampled_indices(self.num_samples, seed, epoch * per_chunk,
                                             per_chunk, self.global_batch)
            else:
                perm = get_permutation(self.num_samples, seed, epoch,
                                       self.train and self.cfg.shuffle, self.cfg.shuffle_block)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return _EpochPlan(epoch=epoch, start=start, perm=perm, steps=steps,
                          global_batch=self.global_batch, batch_size=self.batch_size,
                          rank=self.rank, wrap=resampled or self._wrap)

    def _make_feed(self, workers: int, depth: int) -> InlineFeed | FeedPool:
        """The feed of the pipeline: ``depth`` items at most between the feed and the output."""
        if workers == 0:
            return InlineFeed(self)
        return FeedPool(self, workers, slots=depth // workers + 2, slot_bytes=self._slot_bytes())

    def _slot_bytes(self) -> int:
        """A feed slot's size: a batch of the largest reads among up to 1024 samples (a rare
        larger batch goes through the worker's pipe instead)."""
        rows = np.linspace(0, self.num_samples - 1, min(self.num_samples, 1024)).astype(int)
        per_sample = int(self._read_bytes(rows).max()) if len(rows) else 0
        return int(min(_SLOT_MAX, max(_SLOT_MIN, 1.25 * per_sample * self.batch_size)))

    def _read_bytes(self, rows: np.ndarray) -> np.ndarray:
        """Bytes the feed reads into the ring for samples ``rows`` (at most)."""
        return self.table.video[rows, 1]

    # -- reading and planning --------------------------------------------------------------
    def _where(self, index: int) -> tuple[str, str]:
        return self._tar_names[int(self.table.tar_id[index])], self.table.keys[index]

    def _fd(self, index: int) -> int:
        tid = int(self.table.tar_id[index])
        fd = self._fds.get(tid)
        if fd is None:
            try:
                fd = self._fds[tid] = os.open(self.table.tars[tid], os.O_RDONLY)
            except OSError as e:
                raise _SampleFailed("read_error", str(e)) from e
        return fd

    def _pread(self, index: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of sample ``index``'s tar (the JSON member)."""
        try:
            data = os.pread(self._fd(index), size, offset)
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        self._reads += 1
        if len(data) != size:
            raise _SampleFailed("truncated_shard", f"member ends after {len(data)} of {size} bytes")
        return data

    def _read_chunk(self, index: int, offset: int, size: int) -> np.ndarray:
        """``size`` bytes at ``offset`` of sample ``index``'s tar, read into the batch's arena
        (a feed worker's shared slot: no copy on the way to DALI)."""
        try:
            out = self._arena.read(self._fd(index), offset, size)
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        self._reads += 1
        if out is None:
            raise _SampleFailed("truncated_shard", f"member ends before {size} bytes at "
                                f"offset {offset}")
        return out

    def _load_meta(self, index: int, epoch: int) -> tuple[dict, str]:
        """Read one sample's JSON and choose its caption (the PyAV loader's choice)."""
        offset, size = self.table.meta[index].tolist()
        try:
            meta = json.loads(self._pread(index, offset, size))
        except (ValueError, UnicodeDecodeError) as e:
            raise _SampleFailed("bad_json", str(e)) from e
        return meta, choose_caption(meta, train=self.train, seed=self.seed, epoch=epoch,
                                    index=index)

    def _plan_box(self, meta: dict, index: int, epoch: int, height: int,
                  width: int) -> tuple[np.ndarray, bool]:
        """Crop box float32 [4] (y0, x0, y1, x1) and flip: ``plan_box``'s draws."""
        start, end, flip = plan_box(meta, index, height=height, width=width,
                                    img_size=self.cfg.img_size, train=self.train, seed=self.seed,
                                    epoch=epoch, random_flip=self.cfg.random_flip,
                                    crop_scale=self.cfg.crop_scale)
        return np.concatenate([start, end]), flip

    def _load(self, index: int, epoch: int) -> _Sample:
        """Read and plan one video sample (``plan_clip``'s draws; the video member read whole)."""
        meta, caption = self._load_meta(index, epoch)
        try:
            fps, n_video = float(meta["fps"]), int(meta["num_frames"])
            height, width = int(meta["height"]), int(meta["width"])
            ts = plan_times(meta, index, num_frames=self.cfg.num_frames, train=self.train,
                            seed=self.seed, epoch=epoch)
            frames = timestamps_to_indices(ts, fps, n_video).astype(np.int32)
            roi, flip = self._plan_box(meta, index, epoch, height, width)
        except (KeyError, TypeError, ValueError) as e:
            raise _SampleFailed("decode_error", f"sample {meta.get('key')!r}: JSON lacks "
                                f"duration/fps/num_frames/width/height ({e}); re-create the "
                                "shards with megavid") from e
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        offset, size = self.table.video[index].tolist()
        chunk = self._read_chunk(index, offset, size)
        if self.cfg.dali_trim_gops:
            # only the GOPs of the sampled frames: DALI does not seek in memory (docs/performance.md)
            data, frames = trim_to_gops(chunk.tobytes(), frames)
            chunk = self._arena.put(data)
        return meta, caption, frames, roi, flip, [chunk], [(0, 0, int(chunk.size))]

    def _known_bad(self, index: int) -> tuple[str, str] | None:
        """(reason, detail) of a quarantined sample (this run's or a previous one's), else None."""
        record = self.quarantine.get(*self._where(index))
        return None if record is None else (record["reason"], record["detail"])

    def _mark_bad(self, index: int, reason: str, detail: str) -> None:
        """Quarantine a bad sample: never read or decoded again (counted and logged when a
        batch that met it is handed out)."""
        shard, key = self._where(index)
        self.quarantine.add(shard, key, reason, detail)

    def _prepare(self, epoch_plan: _EpochPlan, step: int) -> Prepared:
        """This rank's part of step ``step`` of the pass ``epoch_plan`` (the feed stage, in a
        feed worker or in this process): the positions of ``VideoTextLoader``, bad samples
        (quarantined, or failing in Python now) replaced by the rule of
        :func:`megavid.data.order.fill_rank_batch`, as in the PyAV loader. A sample DALI cannot
        decode is found when the batch fails, quarantined, and the batch prepared again: the
        same rule then replaces it, so the batch is the one PyAV's would be.

        Raises:
            DataError: ``data.max_consecutive_failures`` bad samples for one slot (the bad
                samples met are attached as ``failed``, for the loader to count).
        """
        failed: list[tuple[int, str, str]] = []
        self._reads = 0
        try:
            slots = fill_rank_batch(
                epoch_plan, step, num_samples=self.num_samples, train=self.train,
                seed=self.seed, load=lambda index: self._load(index, epoch_plan.epoch),
                known_bad=self._known_bad, mark_bad=self._mark_bad, failed=failed,
                max_failures=self.cfg.max_consecutive_failures, where=self._where)
        except DataError as e:
            e.failed = failed  # the abort's culprits are counted and logged by the loader
            raise
        b = len(slots)
        per_clip = len(slots[0][2][6]) if slots else 1
        frames = np.zeros((b, len(slots[0][2][2]) if slots else 1), np.int32)
        roi = np.empty((b, 4), np.float32)
        flip = np.zeros(b, np.int32)
        items = np.empty((b, per_clip, 3), np.int64)
        chunks: list[np.ndarray] = []
        for j, (_, _, (_, _, fr, box, fl, cks, its)) in enumerate(slots):
            frames[j] = fr
            roi[j] = box
            flip[j] = fl
            items[j] = its
            items[j, :, 0] += len(chunks)
            chunks += cks
        return Prepared(
            work=(self._spec(epoch_plan), step), indices=[i for i, _, _ in slots],
            valid=[v for _, v, _ in slots], metas=[s[0] for _, _, s in slots],
            captions=[s[1] for _, _, s in slots], frames=frames, roi=roi, flip=flip,
            chunks=chunks, items=items, failed=failed, reads=self._reads)

    def _prepare_work(self, work: Work, arena: HeapArena) -> Prepared:
        """Prepare a work item of the sequence into ``arena`` (the feed's entry point).

        Raises:
            DataError: too many bad samples for a slot; :class:`FeedFailed`: anything else.
        """
        spec, step = work
        seed, self.seed = self.seed, spec[1]  # a worker's copy may predate load_state_dict
        self._arena = arena
        try:
            p = self._prepare(self._plan_for(spec), step)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - not a sample's fault: the loader stops
            raise FeedFailed(self._describe_feed_error(work, e)) from e
        finally:
            self._arena = None
            self.seed = seed
        p.work = work
        return p

    def _describe_feed_error(self, work: Work, error: BaseException) -> str:
        (_, _, epoch, start, _), step = work
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        return (f"the DALI feed stage failed preparing global step "
                f"{start // self.global_batch + step + 1} of epoch {epoch} "
                f"({type(error).__name__}: {lines[0][:300] if lines else ''}); set "
                "data.backend=pyav to read the shards without DALI")

    def _note_failed(self, p: Prepared) -> None:
        """Quarantine the bad samples a feed worker found in Python (its own quarantine is a
        copy): later batches skip them, and a quarantine file keeps them for the next run."""
        for index, reason, detail in p.failed:
            self._mark_bad(index, reason, detail)

    def _assemble(self, video: torch.Tensor, p: Prepared) -> dict[str, Any]:
        input_ids, attention_mask = tokenize(self.tokenizer, p.captions, self.cfg.max_text_len)
        return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask,
                "captions": list(p.captions), "keys": [self.table.keys[i] for i in p.indices],
                "meta": p.metas, "valid": torch.tensor(p.valid, dtype=torch.bool),
                "indices": torch.tensor(p.indices, dtype=torch.int64)}

    # -- the DALI part (overridden by the image-decoder loaders) ---------------------------
    def _build_pipeline(self, source: Callable, *, batch_size: int, num_threads: int,
                        prefetch: int):
        """The built pipeline decoding ``batch_size`` clips per iteration from ``source``."""
        return build_video_pipeline(source, batch_size=batch_size, img_size=self.cfg.img_size,
                                    device=self.device, device_id=self.device_id,
                                    num_threads=num_threads, prefetch=prefetch, seed=self.seed)

    def _dali_inputs(self, p: Prepared, clips: list[int] | None = None) -> tuple:
        """The external source's batch for ``p`` (or its ``clips``): encoded videos, frame
        indices, crop box start and end, flips."""
        sel = slice(None) if clips is None else clips
        items = p.items[sel, 0]
        encoded = [p.chunks[c][o:o + s] for c, o, s in items.tolist()]
        roi = p.roi[sel]
        return (encoded, np.ascontiguousarray(p.frames[sel]), np.ascontiguousarray(roi[:, :2]),
                np.ascontiguousarray(roi[:, 2:]), np.ascontiguousarray(p.flip[sel]))

    def _to_clip(self, out, p: Prepared) -> torch.Tensor:
        """The pipeline's output for prepared batch ``p`` -> uint8 [B, T, C, H, W]."""
        return dali_to_torch(out)

    # -- faults ---------------------------------------------------------------------------
    def _decode_alone(self, p: Prepared, j: int) -> str | None:
        """Decode clip ``j`` of a prepared batch in a 1-clip pipeline of the same kind;
        None if it decodes, else DALI's message."""
        try:
            pipe = self._build_pipeline(one_batch_source(self._dali_inputs(p, [j])),
                                        batch_size=1, num_threads=1, prefetch=1)
            pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI reports decode failures as RuntimeError
            return _first_error_line(e)
        return None

    def _quarantine_culprits(self, batches: list[Prepared], error: Exception) -> int:
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
        """The batches of one pass (an epoch from the cursor, or a resampled chunk), out of the
        loader's one pipeline; ``VideoTextLoader.__iter__`` moves the cursor and ends the epoch,
        so order, resume and resampled mode are the PyAV loader's."""
        spec, owner = self._spec(plan), object()
        self._stream.begin(spec, owner)
        for step in range(plan.steps):
            p, clip = self._stream.next_batch((spec, step), owner)
            self._record_failures(p.failed)
            yield self._assemble(clip, p)


def _close(stream: PipelineStream, fds: dict[int, int]) -> None:
    """The loader is gone: stop its feed workers, drop its pipeline, close its files."""
    stream.close()
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
