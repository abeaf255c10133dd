"""The order of a pass and the bad-sample rule, shared by every backend (PyAV, decord, DALI).

Each epoch's permutation is drawn from (seed, epoch) (:func:`get_permutation`); resampled mode
draws each global step's samples with replacement from (seed, step)
(:func:`get_resampled_indices`). :class:`_EpochPlan` fixes what one pass reads, and
:func:`fill_rank_batch` builds a rank's part of a global step from it, replacing bad samples.
The loader state and cursor around them: :mod:`megavid.data.loader`.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from megavid.data.sampling import RNG_STREAMS, get_sample_rng
from megavid.errors import DataError

_UINT32 = 1 << 32


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


def get_fast_sample_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """:func:`megavid.data.sampling.get_sample_rng`'s generator (the same draws), built about
    twice as fast: numpy's ``SeedSequence`` turns a list of Python ints into uint32 words one
    int at a time, and a ready uint32 array skips that (each value below 2**32 is one word
    either way). Values outside uint32 take ``get_sample_rng`` itself. The loaders build three
    generators per sample and epoch, so this is a large part of the feed stage's time.

    Args:
        seed: the run seed.
        epoch: the epoch.
        index: the sample's global index.
        stream: one of ``sampling.RNG_STREAMS``.
    """
    words = (seed, epoch, index, RNG_STREAMS[stream])
    if not all(0 <= w < _UINT32 for w in words):
        return get_sample_rng(seed, epoch, index, stream)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        np.array(words, dtype=np.uint32))))


class _SampleFailed(Exception):
    """A sample that cannot be used; ``reason`` keys ``loader.failures`` (PyAV and DALI)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def sample_captions(meta: dict) -> list[str]:
    """A sample JSON's non-empty captions in order: ``captions`` (a list, or one string), else
    ``caption``; [] when it has none. What training draws from and evaluation queries with."""
    captions = meta.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    captions = [c for c in (captions or []) if isinstance(c, str) and c.strip()]
    if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        captions = [meta["caption"]]
    return captions


def choose_caption(meta: dict, *, train: bool, seed: int, epoch: int, index: int) -> str:
    """The caption a sample is trained/evaluated with (shared by every backend).

    Train: one of its non-empty captions, drawn from the sample's (seed, epoch, index) "caption"
    RNG; eval: the first. Raises _SampleFailed("no_caption") when it has none.
    """
    captions = sample_captions(meta)
    if not captions:
        raise _SampleFailed("no_caption", "the sample JSON has no non-empty caption")
    if train and len(captions) > 1:  # (one caption: the draw could only be 0)
        rng = get_fast_sample_rng(seed, epoch, index, "caption")
        return captions[int(rng.integers(len(captions)))]
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
