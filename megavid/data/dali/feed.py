"""The feed stage of the DALI loaders: each batch read and planned in Python, ahead of the
pipeline and in order, by ``data.feed_workers`` processes (0: in the loader's own process).

Work items. A work item is ``(spec, step)``: step ``step`` of the pass ``spec`` = (resampled,
seed, epoch, start, steps), the fields :class:`megavid.data.order._EpochPlan` is rebuilt from
(``DaliLoader._plan_for``). Two items that read the same global positions are the same batch
(:func:`get_work_id`: a pass resumed at the cursor continues the items of the pass it resumes).
A worker runs ``loader._prepare(plan, step)`` on its forked copy of the loader, so the batch is
the one the loader's process would have made (the same draws, the same bad-sample rule);
what the main process learns later (samples DALI failed to decode) travels with the next
items (``quarantine`` records).

Transport. Each worker owns a ring of ``slots`` shared-memory slots (anonymous ``mmap``, made
before the fork): the bytes of its i-th item are read straight into slot ``i % slots`` with
``os.preadv`` (no copy in the worker), and only the small things (keys, sample JSONs, the plan
arrays, the chunks' places in the slot) are pickled through a pipe. The main process hands the
slot's bytes to DALI as numpy views (DALI copies its inputs when they are fed) and releases the
slot once the item's output is out; it never has more than ``slots`` unreleased items of one
worker, so a worker never overwrites bytes DALI has not taken yet. A batch larger than a slot
travels through the pipe instead. Items go to the workers round-robin and come back in
submission order, so the order never depends on timing.

Workers are forked (also after CUDA is initialised, as torch's DataLoader workers are: they
run numpy and file reads only, never CUDA, DALI or torch ops). They ignore SIGTERM and SIGINT
like the PyAV loader's (a preempted job writes its checkpoint first); they leave when the pool
is closed, when the loader is collected, at interpreter exit (an exit handler registered after
multiprocessing's runs first) or when their parent is gone.

CPU time: every item carries the CPU seconds its worker spent on it (``time.process_time``:
read, plan, pickling); the loader adds the main thread's hand-over (receive, unpickle, DALI
inputs) to it for ``stats()["feed_ms_per_batch"]`` and :mod:`megavid.data.dali.measure`.
"""

from __future__ import annotations

import atexit
import mmap
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours (atexit)
import os
import pickle
import signal
import struct
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megavid.errors import DataError

Spec = tuple[bool, int, int, int, int]
"""A pass: (resampled, seed, epoch (resampled: chunk), start (the cursor it starts from), steps)."""
Work = tuple[Spec, int]
"""A work item: (the pass, the step of it)."""

_POLL_S = 1.0  # how often a waiting worker checks that its parent lives
_HEADER = struct.Struct("<d")  # a result's CPU seconds, before its pickle


def get_work_id(work: Work, global_batch: int) -> tuple[bool, int, int, int]:
    """What a work item reads: (resampled, seed, epoch, first global position of its step)."""
    (resampled, seed, epoch, start, _), step = work
    return resampled, seed, epoch, start + step * global_batch


@dataclass(slots=True)
class Prepared:
    """One rank's batch read and planned, waiting for DALI (arrays over the batch's clips)."""

    work: Work
    indices: list[int]
    valid: list[bool]
    metas: list[dict]
    captions: list[str]
    frames: np.ndarray
    """int32 [B, F]: per clip, the frame indices DALI decodes (video: source frames; frames
    shards: stored frames; images: F = 1, unused)."""
    roi: np.ndarray
    """float32 [B, 4]: per clip, the crop box (y0, x0, y1, x1) in source pixels."""
    flip: np.ndarray
    """int32 [B]: per clip, 1 to flip horizontally."""
    chunks: list[Any]
    """uint8 arrays: the bytes read for the batch, one per read (a video or image member; a run
    of adjacent frames), in clip order (in transit from a worker: ``(offset, size)`` in its
    ring, or the bytes)."""
    items: np.ndarray
    """int64 [B, K, 3]: per clip, its K encoded inputs (video and images: 1, frames: T) as
    (index into ``chunks``, offset in that chunk, size)."""
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    """(index, reason, detail) of every bad sample met while filling the batch (counted and
    logged by ``VideoTextLoader._record_failures`` when the batch is handed out)."""
    reads: int = 0
    """Reads (``pread`` calls) the batch took, JSON members included."""
    cpu_s: float = 0.0
    """Feed CPU seconds spent on it (worker and main-thread hand-over)."""
    worker: int = -1
    """The worker that made it (-1: the loader's own process)."""


class FeedFailed(DataError):
    """The feed stage failed on a batch for another reason than its samples (a bug, a lost
    worker): the loader cannot go on. ``failed``: bad samples met before (counted anyway)."""

    def __init__(self, message: str, failed: list | None = None) -> None:
        super().__init__(message)
        self.failed = list(failed or [])


# --------------------------------------------------------------------------------------------
# Arenas: where a batch's reads go
# --------------------------------------------------------------------------------------------
class HeapArena:
    """Reads into fresh buffers (the loader's own process)."""

    def read(self, fd: int, offset: int, size: int) -> np.ndarray | None:
        """The ``size`` bytes at ``offset`` (None: the file ends before them)."""
        data = os.pread(fd, size, offset)
        return np.frombuffer(data, np.uint8) if len(data) == size else None

    def put(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8)


class RingArena(HeapArena):
    """Reads into one slot of a worker's shared ring, falling back to fresh buffers when full.

    Args:
        ring: the worker's shared mapping.
        slot_bytes: bytes per slot.
    """

    def __init__(self, ring: mmap.mmap, slot_bytes: int) -> None:
        self.view = memoryview(ring)
        self.array = np.frombuffer(ring, np.uint8)
        self.base_ptr = self.array.__array_interface__["data"][0]
        self.slot_bytes = slot_bytes
        self.lo = self.pos = 0

    def reset(self, slot: int) -> None:
        self.lo = self.pos = slot * self.slot_bytes

    def read(self, fd: int, offset: int, size: int) -> np.ndarray | None:
        if self.pos + size > self.lo + self.slot_bytes:
            return super().read(fd, offset, size)
        got = os.preadv(fd, [self.view[self.pos:self.pos + size]], offset)
        if got != size:
            return None
        out = self.array[self.pos:self.pos + size]
        self.pos += size
        return out

    def put(self, data: bytes) -> np.ndarray:
        size = len(data)
        if self.pos + size > self.lo + self.slot_bytes:
            return super().put(data)
        self.view[self.pos:self.pos + size] = data
        out = self.array[self.pos:self.pos + size]
        self.pos += size
        return out

    def where(self, chunk: np.ndarray) -> tuple[int, int] | None:
        """(offset, size) of ``chunk`` in the ring, or None when it lives elsewhere."""
        off = chunk.__array_interface__["data"][0] - self.base_ptr
        if 0 <= off and off + chunk.size <= len(self.array):
            return off, int(chunk.size)
        return None


# --------------------------------------------------------------------------------------------
# The feeds
# --------------------------------------------------------------------------------------------
class InlineFeed:
    """``data.feed_workers=0``: items prepared in the loader's process when received.

    Args:
        loader: the DALI loader (``_prepare_work``).
    """

    workers = 0

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.queue: deque[Work] = deque()

    def can_submit(self) -> bool:
        return True

    def submit(self, work: Work) -> None:
        self.queue.append(work)

    def receive(self) -> Prepared:
        """The oldest submitted item, prepared now (``cpu_s``: this thread's CPU)."""
        work = self.queue.popleft()
        t0 = time.thread_time()
        p = self.loader._prepare_work(work, HeapArena())
        p.cpu_s = time.thread_time() - t0
        return p

    def release(self, p: Prepared) -> None:
        pass

    def cancel(self) -> None:
        self.queue.clear()

    @property
    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        self.queue.clear()


_POOLS: "weakref.WeakSet[FeedPool]" = weakref.WeakSet()


class FeedPool:
    """``data.feed_workers`` forked processes preparing work items in order (module docstring).

    Args:
        loader: the DALI loader; each worker works on its own forked copy.
        workers: processes (>= 1).
        slots: ring slots per worker: the most items of one worker submitted and not released.
        slot_bytes: bytes per slot (a batch that does not fit goes through the pipe).
    """

    def __init__(self, loader: Any, workers: int, *, slots: int, slot_bytes: int) -> None:
        if workers < 1:
            raise ValueError(f"FeedPool needs >= 1 worker, got {workers}")
        self.workers, self.slots, self.slot_bytes = workers, slots, slot_bytes
        self.quarantine = loader.quarantine
        ctx = multiprocessing.get_context("fork")
        self.rings: list[mmap.mmap] = []
        self.arrays: list[np.ndarray] = []
        self.tasks, self.results, self.procs = [], [], []
        self.sent_records = [len(self.quarantine.samples)] * workers
        self.submitted = [0] * workers  # items sent to each worker
        self.released = [0] * workers  # items of each worker whose slot is free again
        self.queue: deque[tuple[int, int, Work]] = deque()  # (worker, its item number, work)
        self.seq = 0
        self.closed = False
        for w in range(workers):
            ring = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS: shared on fork
            task_r, task_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"megavid-dali-feed-{w}", daemon=True,
                               args=(loader, task_r, res_w, ring, slots, slot_bytes, os.getpid()))
            proc.start()
            task_r.close()
            res_w.close()
            self.rings.append(ring)
            self.arrays.append(np.frombuffer(ring, np.uint8))
            self.tasks.append(task_w)
            self.results.append(res_r)
            self.procs.append(proc)
        _POOLS.add(self)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.tasks)

    @property
    def pending(self) -> int:
        """Items submitted and not received yet."""
        return len(self.queue)

    def can_submit(self) -> bool:
        """True when the next item's worker has a free slot."""
        w = self.seq % self.workers
        return self.submitted[w] - self.released[w] < self.slots

    def submit(self, work: Work) -> None:
        w = self.seq % self.workers
        if not self.can_submit():
            raise RuntimeError("FeedPool.submit: the worker's slots are all in use")
        records = self.quarantine.samples[self.sent_records[w]:]
        self.sent_records[w] += len(records)
        try:
            self.tasks[w].send((self.submitted[w], work, records))
        except OSError as e:
            raise FeedFailed(f"DALI feed worker {w} is gone ({e}); {self._exit_note(w)}") from e
        self.queue.append((w, self.submitted[w], work))
        self.submitted[w] += 1
        self.seq += 1

    def receive(self) -> Prepared:
        """The oldest submitted item (waits for it).

        Raises:
            DataError: the item hit ``data.max_consecutive_failures`` bad samples (``failed``
                attached), or :class:`FeedFailed`: the worker failed or died.
        """
        w, n, work = self.queue.popleft()
        conn = self.results[w]
        while not conn.poll(_POLL_S):
            if not self.procs[w].is_alive():
                raise FeedFailed(f"DALI feed worker {w} died while preparing a batch; "
                                 f"{self._exit_note(w)}")
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise FeedFailed(f"DALI feed worker {w} died while preparing a batch; "
                             f"{self._exit_note(w)}") from e
        (cpu_s,) = _HEADER.unpack_from(raw)
        kind, number, body = pickle.loads(raw[_HEADER.size:])
        assert number == n, (number, n)  # round-robin, in order
        if kind != "ok":
            self.released[w] += 1  # nothing of it is in the slot any more
            message, failed = body
            if kind == "data_error":
                err = DataError(message)
                err.failed = failed  # counted by the loader before it raises
                raise err
            raise FeedFailed(message, failed)
        p: Prepared = body
        lo = (n % self.slots) * self.slot_bytes
        ring = self.arrays[w]
        chunks = []
        for c in p.chunks:
            if isinstance(c, tuple):
                assert lo <= c[0] and c[0] + c[1] <= lo + self.slot_bytes, (c, lo)
                chunks.append(ring[c[0]:c[0] + c[1]])
            else:
                chunks.append(np.frombuffer(c, np.uint8))
        p.chunks = chunks
        p.cpu_s = cpu_s
        p.worker = w
        return p

    def release(self, p: Prepared) -> None:
        """``p``'s slot may take a new item (DALI has its inputs)."""
        if p.worker >= 0:
            self.released[p.worker] += 1

    def cancel(self) -> None:
        """Receive and drop every submitted item (their slots become free)."""
        while self.queue:
            try:
                p = self.receive()
            except DataError:
                continue  # a dropped item's failure does not matter
            self.release(p)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def _exit_note(self, w: int) -> str:
        code = self.procs[w].exitcode
        return (f"exit code {code}" if code is not None else "still running") + \
            " (check memory limits; set data.feed_workers=0 to prepare batches in process)"


def _stop(procs: list, tasks: list, timeout: float = 2.0) -> None:
    """Ask the workers to leave, wait a little, then kill those still there."""
    for conn in tasks:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for conn in tasks:
        try:
            conn.close()
        except OSError:
            pass


@atexit.register
def _close_all_pools() -> None:
    # Registered after multiprocessing's own exit handler (imported above), so it runs first:
    # that handler would SIGTERM the daemonic workers, which ignore it, and wait for them.
    for pool in list(_POOLS):
        pool.close()


def _worker_main(loader: Any, tasks, results, ring: mmap.mmap, slots: int, slot_bytes: int,
                 parent: int) -> None:
    """A feed worker: prepare the items sent on ``tasks`` in order, answer on ``results``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the main process stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loader._as_feed_worker()
    arena = RingArena(ring, slot_bytes)
    while True:
        try:
            while not tasks.poll(_POLL_S):
                if os.getppid() != parent:
                    return  # orphaned: the main process is gone
            msg = tasks.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        number, work, records = msg
        t0 = time.process_time()
        for r in records:  # samples the main process quarantined since the last item
            loader.quarantine.add(r["shard"], r["key"], r["reason"], r["detail"])
        arena.reset(number % slots)
        try:
            p = loader._prepare_work(work, arena)
            p.chunks = [arena.where(c) or c.tobytes() for c in p.chunks]
            out: tuple = ("ok", number, p)
        except DataError as e:
            out = ("data_error", number, (str(e), getattr(e, "failed", [])))
        except Exception as e:  # noqa: BLE001 - reported to the main process, which raises
            out = ("error", number, (loader._describe_feed_error(work, e), []))
        data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            results.send_bytes(_HEADER.pack(time.process_time() - t0) + data)
        except (BrokenPipeError, OSError):
            return
