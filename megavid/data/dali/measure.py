"""The DALI loaders' stages measured apart (``megavid bench-loader``, bench/loader.py).

- :func:`feed_rate`: the feed stage alone (read, plan and hand over the loader's batches, no
  decode), in clips per CPU-second of every process it runs in (the feed workers' CPU and the
  hand-over in this thread); :func:`measure_feed` also gives the wall clock rate.
- :func:`decode_only_rate`: the decode stage alone: batches prepared once by the feed, cycled
  through a pipeline of the loader's kind and settings, in clips/s (wall).

Both read the loader's samples in the order it would read them next (from its cursor, pass
after pass) without moving its cursor or touching its pipeline; the pipelines and feed workers
they start are their own (not counted in ``loader.stats()``) and gone when they return.
"""

from __future__ import annotations

import itertools
import resource
import time
from typing import Any

from megavid.data.dali.feed import HeapArena, Work


def _sequence(loader: Any) -> "itertools.cycle | Any":
    """The loader's next work items, from its cursor on (a pass, then the ones after it)."""
    if loader._resampled:
        plan = loader._resampled_plan()
    else:
        plan = loader._plan()
        if plan.steps == 0:  # at the end of an epoch: the next one
            spec = loader._next_spec(loader._spec(plan))
            return loader._stream._sequence(spec)
    return loader._stream._sequence(loader._spec(plan))


def measure_feed(loader: Any, seconds: float, workers: int | None = None) -> dict[str, float]:
    """Run the loader's feed stage alone for about ``seconds`` (after one untimed batch).

    Args:
        loader: a DALI loader (:class:`megavid.data.dali.loader.DaliLoader` or a subclass).
        seconds: how long to measure.
        workers: feed processes (None: the loader's ``feed_workers``; 0: this process).

    Returns:
        {"clips", "seconds" (wall), "cpu_s" (feed CPU, all processes), "workers_cpu_s" and
        "main_cpu_s" (its two parts), "clips_per_s" (wall), "clips_per_cpu_s"}.
    """
    workers = loader.feed_workers if workers is None else workers
    saved = (loader.epoch, loader.cursor)
    items = _sequence(loader)
    loader.epoch, loader.cursor = saved  # _resampled_plan sets the epoch
    feed = loader._make_feed(workers, 2 + 2 * max(1, workers))
    try:
        submitted = 0

        def top_up() -> None:
            nonlocal submitted
            while feed.pending < 2 * max(1, workers) and feed.can_submit():
                feed.submit(next(items))
                submitted += 1

        def one() -> tuple[int, float, float]:
            c0 = time.thread_time()
            top_up()
            p = feed.receive()
            loader._dali_inputs(p)  # the hand-over
            feed.release(p)
            # a worker's CPU, and this thread's (submit, receive, hand-over; inline: all)
            return len(p.indices), p.cpu_s if p.worker >= 0 else 0.0, time.thread_time() - c0

        one()  # warm-up: worker start, first reads
        clips, workers_cpu, main_cpu, t0 = 0, 0.0, 0.0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n, w, m = one()
            clips += n
            workers_cpu += w
            main_cpu += m
        wall = time.perf_counter() - t0
    finally:
        feed.close()
    cpu = workers_cpu + main_cpu
    return {"clips": float(clips), "seconds": wall, "cpu_s": cpu, "workers_cpu_s": workers_cpu,
            "main_cpu_s": main_cpu, "clips_per_s": clips / wall if wall > 0 else 0.0,
            "clips_per_cpu_s": clips / cpu if cpu > 0 else 0.0}


def feed_rate(loader: Any, seconds: float) -> float:
    """Clips per CPU-second of the loader's feed stage alone (read + plan + hand-over of its
    next batches, no decode), all feed workers' CPU included (:func:`measure_feed`).

    Args:
        loader: a DALI loader.
        seconds: how long to measure (wall).
    """
    return measure_feed(loader, seconds)["clips_per_cpu_s"]


def measure_decode_only(loader: Any, seconds: float, batches: int = 8) -> dict[str, float]:
    """Run the loader's decode stage alone for about ``seconds`` (after one untimed batch):
    ``batches`` of its next batches prepared once, then cycled through a pipeline of its kind
    (device, threads, prefetch), each output taken as the loader takes it.

    Args:
        loader: a DALI loader.
        seconds: how long to measure (wall).
        batches: distinct prepared batches to cycle through.

    Returns:
        {"clips", "seconds" (wall), "cpu_s" (this process, DALI's threads included),
        "clips_per_s", "clips_per_cpu_s"}.
    """
    saved = (loader.epoch, loader.cursor)
    items: list[Work] = list(itertools.islice(_sequence(loader), batches))
    loader.epoch, loader.cursor = saved
    prepared = [loader._prepare_work(w, HeapArena()) for w in items]
    inputs = [loader._dali_inputs(p) for p in prepared]

    def source(info) -> tuple:
        return inputs[info.iteration % len(inputs)]

    pipe = loader._build_pipeline(source, batch_size=loader.batch_size,
                                  num_threads=loader.num_threads, prefetch=loader.prefetch)
    try:
        k = 0

        def one() -> int:
            nonlocal k
            (out,) = pipe.run()
            p = prepared[k % len(prepared)]
            k += 1
            loader._to_clip(out, p)
            return len(p.indices)

        one()
        clips, t0, c0 = 0, time.perf_counter(), _process_cpu_s()
        while time.perf_counter() - t0 < seconds:
            clips += one()
        wall, cpu = time.perf_counter() - t0, _process_cpu_s() - c0
    finally:
        del pipe
    return {"clips": float(clips), "seconds": wall, "cpu_s": cpu,
            "clips_per_s": clips / wall if wall > 0 else 0.0,
            "clips_per_cpu_s": clips / cpu if cpu > 0 else 0.0}


def decode_only_rate(loader: Any, seconds: float, batches: int = 8) -> float:
    """Clips/s of the loader's decode stage alone: the same prepared inputs cycled through a
    pipeline of its kind, no feed (:func:`measure_decode_only`).

    Args:
        loader: a DALI loader.
        seconds: how long to measure (wall).
        batches: distinct prepared batches to cycle through.
    """
    return measure_decode_only(loader, seconds, batches)["clips_per_s"]


def _process_cpu_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime
