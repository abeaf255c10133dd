"""The resumable, world-size independent video-text loader: the PyAV (and decord) loader and
the base of the DALI loaders (built by :func:`megavid.data.build.build_loader`).

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
  PIL (PyAV/decord loaders) or DALI's ``fn.decoders.image`` (``ImageDaliLoader``) and
  repeated to ``num_frames`` so batches stay rectangular [B, T, C, H, W]; their meta carries
  ``is_image: True``. ``auto`` picks DALI on a GPU, else PIL.
* ``data.image_ratio`` > 0 with ``data.image_train`` builds a ``MixedLoader``: every rank's
  train batch is ``batch_size x (1 - ratio)`` clips then ``batch_size x ratio`` images, from two
  loaders with their own cursors; the state holds both (``megavid.data.mixing``).
* ``data.resampled``: global step s draws G samples with replacement from an RNG seeded by
  (seed, s) (:func:`megavid.data.order.get_resampled_indices`); iteration never ends,
  ``len()`` is a nominal epoch (N // G steps) and the state's cursor is the step count. Every
  backend (PyAV, decord, DALI) runs it: they share ``VideoTextLoader.__iter__`` and differ only
  in ``_iter_plan``.

Per-sample randomness (frame offsets, caption choice, crop/flip) comes from
``sampling.get_sample_rng(seed, epoch, index, stream)``: a sample looks the same in every
worker, rank, world size and decode backend.

Faults: a sample whose members cannot be read, whose JSON is malformed, that has no caption, or
whose video does not decode is *bad*: it is skipped, and its slot is filled by a replacement
that is never already in the global step or the batch (the rule: :mod:`megavid.data.order`,
"Faults", shared by every backend).

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

Counters: every loader (this one, the DALI loaders, ``MixedLoader``, ``SyntheticLoader``) has
``stats() -> dict[str, float]``, cumulative over the loader's life, with at least:

* ``pipeline_builds``: DALI pipelines the loader built (0 for non-DALI loaders). A DALI loader
  builds one at its first batch and another only after a quarantine event (the 1-sample
  pipelines that find the culprit are not counted);
* ``batches``: batches handed out;
* ``feed_ms_per_batch``: mean CPU milliseconds the feed stage spent per batch it prepared
  (CPU time, summed over every process it runs in). DALI: read the JSON and the encoded
  bytes, choose the caption, plan frames and crop, hand the inputs to DALI (the feed workers'
  CPU plus the main thread's hand-over). PyAV/decord: the DataLoader workers' whole batch
  (read, decode and transform are one call there: no separate feed);
* ``decode_wait_ms_per_batch``: mean wall milliseconds the consumer waited for a decoded
  batch (inside ``next()``: a DALI ``pipeline.run()``, a DataLoader fetch). Against the step
  time it is the data wait.

The DALI loaders add ``feed_wait_ms_per_batch``, ``feed_workers``, ``dropped_batches`` and
``reads_per_clip`` (:meth:`megavid.data.dali.loader.DaliLoader.stats`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

from megavid.config import DataConfig
from megavid.data import pyav_backend
from megavid.data.order import _EpochPlan, get_permutation, get_resampled_indices
from megavid.data.table import SampleTable, build_sample_table, get_split_spec
from megavid.data.text import get_cached_tokenizer, get_tokenizer_path
from megavid.data.workers import _BatchDataset, _identity, _worker_init
from megavid.errors import ConfigError, DataError

logger = logging.getLogger("megavid.data")

_LOG_SAMPLES = 1000  # distinct bad samples logged one by one, then one line every _LOG_EVERY
_LOG_EVERY = 1000


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
        self.tokenizer = get_cached_tokenizer(data_cfg.tokenizer)
        self.batch_size = data_cfg.batch_size if train else data_cfg.eval_batch_size
        self.failures: Counter = Counter()
        """Bad samples skipped, by reason: each distinct bad sample once per epoch that met it,
        cumulative over this loader's life (module docstring, "Counting")."""
        self._epoch_bad: dict[int, str] = {}  # index -> reason: distinct bad samples this epoch
        self._epoch_failures: Counter = Counter()  # the same, by reason
        self._bad_epoch: int | None = None  # the epoch _epoch_bad belongs to
        self._logged: set[int] = set()  # bad samples logged (once per loader)
        self._counts = {"batches": 0, "prepared": 0, "feed_cpu_s": 0.0, "wait_s": 0.0}
        n, g = len(table), self.global_batch
        if train and data_cfg.drop_last and not data_cfg.resampled and n < g:
            raise DataError(
                f"split '{split}' has {n} samples, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world_size} ranks = {g}); lower "
                "data.batch_size or add data")

    def stats(self) -> dict[str, float]:
        """The loader's counters (module docstring, "Counters"); no DALI pipeline here."""
        c = self._counts
        return {"pipeline_builds": 0.0, "batches": float(c["batches"]),
                "feed_ms_per_batch": 1e3 * c["feed_cpu_s"] / max(1, c["prepared"]),
                "decode_wait_ms_per_batch": 1e3 * c["wait_s"] / max(1, c["batches"])}

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
        workers here, a DALI pipeline in ``megavid.data.dali.loader``). Moves no cursor."""
        dataset = _BatchDataset(self.table, self.cfg, plan, train=self.train, seed=self.seed,
                                decode_fn=self.decode_fn, tokenizer=self.tokenizer)
        nw = self.cfg.num_workers
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=nw, collate_fn=_identity,
            worker_init_fn=_worker_init if nw > 0 else None, persistent_workers=False)
        # The DataLoader hands item i to worker i % nw and yields items in index order (its
        # default in-order delivery), so the batch sequence never depends on worker timing.
        it = iter(loader)
        counts = self._counts
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            counts["wait_s"] += time.perf_counter() - t0
            if batch is None:
                return
            counts["prepared"] += 1
            counts["feed_cpu_s"] += batch.pop("_feed_cpu_s", 0.0)
            self._record_failures(batch.pop("_failed"))
            if "_abort" in batch:
                raise DataError(batch["_abort"])
            counts["batches"] += 1
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


def build_pyav_loader(data_cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                      world_size: int = 1, seed: int = 0, epoch: int = 0,
                      decode_fn: Callable = pyav_backend.decode_clip,
                      table: SampleTable | None = None) -> VideoTextLoader:
    """The PyAV (CPU) loader over the shards of ``split``; see
    :func:`megavid.data.build.build_loader`.

    On frames shards (:mod:`megavid.data.frames`) it is the no-DALI fallback: the worker processes
    read the stored JPEGs on screen at the sampled timestamps and decode them with PIL, then apply
    the same transforms (same per-sample draws) as for video.

    Args:
        decode_fn: the video decode function, with ``pyav_backend.decode_clip``'s signature
            (``decord_backend.decode_clip`` for ``data.backend=decord``);
        table: the split's sample table, already built from the scan that chose the backend
            (None: read the split's index);
        the rest as :func:`megavid.data.build.build_loader`."""
    get_tokenizer_path(data_cfg.tokenizer)  # a config error before the index is read
    # frames shards: the same loader decodes the stored JPEGs with PIL (SampleTable.frames)
    if table is None:
        table = build_sample_table(get_split_spec(data_cfg, split), data_cfg.root)
    return VideoTextLoader(table, data_cfg, split=split, train=train, rank=rank,
                           world_size=world_size, seed=seed, epoch=epoch, decode_fn=decode_fn)
