"""A DALI loader's pipeline for its whole life: one pipeline and one external source through
which every pass flows (epochs, evaluation passes, resampled chunks), rebuilt only after a
quarantine event (a batch DALI failed on as a whole).

The external source never ends: each DALI iteration asks for the next work item of one
continuous sequence, planned ahead: the rest of the current pass, then the pass that follows
it (train: the next epoch from its start; eval: the same pass again; resampled: the next
chunk), as ``VideoTextLoader.__iter__`` would go on. DALI runs ``prefetch`` iterations ahead
and the feed (:mod:`megavid.data.dali.feed`) prepares more ahead of DALI, so when a pass ends
the first batches of the next one may already be decoded: they are the next pass's batches,
handed out when it starts. A pass boundary stays exact because every batch carries its work
item and the consumer checks it against the step it expects (:meth:`PipelineStream.begin`,
:meth:`PipelineStream.next_batch`). When a pass starts that the sequence did not plan for
(``load_state_dict`` or ``set_epoch`` to another place), the batches in flight are decoded
and dropped (``stats()["dropped_batches"]``) and the sequence restarts there: the pipeline is
kept.

A batch DALI fails on leaves its pipeline unusable: the culprits are found sample by sample
and quarantined (``DaliLoader._quarantine_culprits``), the items in flight are prepared again
(now without the culprits: the replacement rule fills their slots), and a new pipeline is
built (``stats()["pipeline_builds"]`` counts the loader's pipelines).
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from typing import Any, Iterator

from megavid.data.dali.feed import FeedPool, InlineFeed, Prepared, Spec, Work, get_work_id
from megavid.errors import DataError


class _Source:
    """The external-source callback: a weak reference, so the pipeline does not keep the
    stream (and its feed workers) alive."""

    def __init__(self, stream: "PipelineStream") -> None:
        self.stream = weakref.ref(stream)

    def __call__(self, info) -> tuple:
        stream = self.stream()
        if stream is None:  # pragma: no cover - the pipeline outlived its loader
            raise StopIteration
        return stream._next_inputs()


class PipelineStream:
    """One loader's DALI pipeline, its feed and the work items in flight (module docstring).

    Args:
        loader: the DALI loader (``_build_pipeline``, ``_next_spec``, ``_dali_inputs``,
            ``_to_clip``, ``_quarantine_culprits``, ``_record_failures``, its quarantine).
        feed_workers: feed processes (0: prepare in this process).
        prefetch: DALI's prefetch queue depth.
    """

    def __init__(self, loader: Any, *, feed_workers: int, prefetch: int) -> None:
        self.loader = weakref.proxy(loader)
        self.feed_workers = feed_workers
        self.prefetch = prefetch
        # items the feed prepares beyond what DALI asked for: enough to keep every worker busy
        self.ahead = 2 * max(1, feed_workers)
        self.global_batch = loader.global_batch
        self.pipe = None
        self.feed: InlineFeed | FeedPool | None = None
        self.upcoming: Iterator[Work] = iter(())
        self.submitted: deque[Work] = deque()  # sent to the feed, not given to DALI yet
        self.inflight: deque[Prepared] = deque()  # given to DALI, output not taken yet
        self.consecutive = 0
        self.owner: object | None = None  # the pass being handed out (one at a time)
        self.counts = {"pipeline_builds": 0, "batches": 0, "prepared": 0, "dropped": 0,
                       "clips": 0, "reads": 0}
        self.times = {"feed_cpu_s": 0.0, "feed_wait_s": 0.0, "decode_wait_s": 0.0}

    # -- the sequence ---------------------------------------------------------------------
    def _sequence(self, spec: Spec, step: int = 0) -> Iterator[Work]:
        """The work items from step ``step`` of ``spec`` on, pass after pass."""
        while True:
            for s in range(step, spec[4]):
                yield spec, s
            spec, step = self.loader._next_spec(spec), 0

    def _head(self) -> Work | None:
        if self.inflight:
            return self.inflight[0].work
        if self.submitted:
            return self.submitted[0]
        return None

    def begin(self, spec: Spec, owner: object) -> None:
        """A pass (``owner``: its token) starts at step 0 of ``spec``: keep what is in flight if
        the sequence planned it, else drop it and restart the sequence here."""
        self.owner = owner
        want = get_work_id((spec, 0), self.global_batch)
        head = self._head()
        if head is not None and get_work_id(head, self.global_batch) == want:
            return
        if head is None:
            nxt = next(self.upcoming, None)
            if nxt is not None and get_work_id(nxt, self.global_batch) == want:
                self.upcoming = itertools.chain([nxt], self.upcoming)
                return
        self._restart(spec)

    def _restart(self, spec: Spec) -> None:
        self.upcoming = self._sequence(spec)
        if self.feed is not None:
            self.counts["dropped"] += self.feed.pending
            self.feed.cancel()
        self.submitted.clear()
        stale = len(self.inflight)
        if self.pipe is None or not stale:
            self._drop_inflight()
            return
        # Decode and drop what DALI holds of the old sequence; each run asks the source for
        # an item of the new one, so DALI ends up holding the new pass's first items.
        try:
            for _ in range(stale):
                self.pipe.run()
                self._release(self.inflight.popleft())
                self.counts["dropped"] += 1
        except RuntimeError:  # a dropped batch DALI fails on: a new pipeline, no culprit hunt
            self._invalidate()
            self.upcoming = self._sequence(spec)

    # -- the feed side (inside DALI's run) -------------------------------------------------
    def _top_up(self) -> None:
        while len(self.submitted) < self.ahead and self.feed.can_submit():
            work = next(self.upcoming)
            self.feed.submit(work)
            self.submitted.append(work)

    def _next_inputs(self) -> tuple:
        """The external source: the next work item's DALI inputs."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if not self.submitted:
            self._top_up()
        try:
            p = self.feed.receive()
        except DataError as e:
            self._record(getattr(e, "failed", []))
            raise
        work = self.submitted.popleft()
        assert p.work == work, (p.work, work)
        if p.worker >= 0 and p.failed:
            self.loader._note_failed(p)
        waited = time.perf_counter() - t0
        self.inflight.append(p)
        self._top_up()
        inputs = self.loader._dali_inputs(p)
        # a worker's CPU plus this thread's (receive, hand-over; inline: all of it)
        p.cpu_s = (p.cpu_s if p.worker >= 0 else 0.0) + time.thread_time() - c0
        self.counts["prepared"] += 1
        self.counts["clips"] += len(p.indices)
        self.counts["reads"] += p.reads
        self.times["feed_cpu_s"] += p.cpu_s
        self.times["feed_wait_s"] += waited
        return inputs

    def _record(self, failed: list) -> None:
        try:
            self.loader._record_failures(failed)
        except ReferenceError:  # pragma: no cover - the loader is gone
            pass

    # -- the consumer side ----------------------------------------------------------------
    def next_batch(self, work: Work, owner: object) -> tuple[Prepared, Any]:
        """The decoded batch of ``work`` (the next one in the sequence) for the pass ``owner``:
        (prepared, clip).

        Raises:
            RuntimeError: another pass over the loader started since ``owner`` did.
        """
        if owner is not self.owner:
            raise RuntimeError("a DALI loader hands out one pass at a time: another iteration "
                               "over it started after this one; finish or close the first")
        want = get_work_id(work, self.global_batch)
        while True:
            if self.pipe is None:
                self._build()
            t0 = time.perf_counter()
            try:
                (out,) = self.pipe.run()
            except RuntimeError as e:  # DALI's operator errors (feed errors are DataErrors)
                self.times["decode_wait_s"] += time.perf_counter() - t0
                self._on_decode_failure(e)
                continue
            except BaseException:
                self._invalidate()  # a feed error or an interrupt: start clean next time
                raise
            self.times["decode_wait_s"] += time.perf_counter() - t0
            p = self.inflight.popleft()
            if get_work_id(p.work, self.global_batch) != want:  # pragma: no cover - invariant
                self._invalidate()
                raise RuntimeError(f"DALI stream out of step: expected {want}, got "
                                   f"{get_work_id(p.work, self.global_batch)}")
            clip = self.loader._to_clip(out, p)
            self._release(p)
            self.consecutive = 0
            self.counts["batches"] += 1
            return p, clip

    def _on_decode_failure(self, error: RuntimeError) -> None:
        try:  # raises when no sample fails alone
            self.consecutive += self.loader._quarantine_culprits(list(self.inflight), error)
        finally:
            # the items in flight go round again, prepared without the culprits (the
            # replacement rule fills their slots), through a new pipeline
            self._invalidate()
        if self.consecutive >= self.loader.cfg.max_consecutive_failures:
            raise DataError(
                f"{self.consecutive} samples in a row failed to decode with DALI (quarantine: "
                f"{self.loader.quarantine.path or 'in memory'}); check the shards with "
                "`megavid verify-shards`") from error

    # -- lifetime -----------------------------------------------------------------------------
    def _build(self) -> None:
        if self.feed is None:  # fork the feed workers before DALI starts its threads
            self.feed = self.loader._make_feed(self.feed_workers, self.prefetch + self.ahead)
        self.pipe = self.loader._build_pipeline(
            _Source(self), batch_size=self.loader.batch_size,
            num_threads=self.loader.num_threads, prefetch=self.prefetch)
        self.counts["pipeline_builds"] += 1

    def _release(self, p: Prepared) -> None:
        if self.feed is not None:
            self.feed.release(p)

    def _drop_inflight(self) -> None:
        while self.inflight:
            self._release(self.inflight.popleft())

    def _invalidate(self) -> None:
        """Drop the pipeline and everything in flight (the sequence goes on where it was)."""
        replay = [p.work for p in self.inflight] + list(self.submitted)
        if self.feed is not None:
            self.feed.cancel()
        self.submitted.clear()
        self._drop_inflight()
        self.upcoming = itertools.chain(replay, self.upcoming)
        self.pipe = None

    def close(self) -> None:
        """Drop the pipeline and stop the feed workers (a later pass starts afresh)."""
        self.pipe = None
        self.inflight.clear()
        self.submitted.clear()
        self.upcoming = iter(())
        if self.feed is not None:
            self.feed.close()
            self.feed = None

    def stats(self) -> dict[str, float]:
        c, t = self.counts, self.times
        return {
            "pipeline_builds": float(c["pipeline_builds"]),
            "batches": float(c["batches"]),
            "feed_ms_per_batch": 1e3 * t["feed_cpu_s"] / max(1, c["prepared"]),
            "decode_wait_ms_per_batch": 1e3 * t["decode_wait_s"] / max(1, c["batches"]),
            "feed_wait_ms_per_batch": 1e3 * t["feed_wait_s"] / max(1, c["prepared"]),
            "feed_workers": float(self.feed_workers),
            "dropped_batches": float(c["dropped"]),
            "reads_per_clip": c["reads"] / max(1, c["clips"]),
        }
