"""``data.shuffle_block``: runs of consecutive samples shuffled as units, so neighbours in the
shards (the synthetic split's direction groups, clips of one long video) share a batch as hard
negatives; checked against the definition written out here, and through the real loader on
real VP9 shards with two ranks and a resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megavid.config import DataConfig
from megavid.data.build import build_loader
from megavid.data.order import get_permutation
from megavid.errors import ConfigError

from tests.helpers.loader_clips import NUM_SAMPLES, data_config


@pytest.mark.parametrize("n,block", [(24, 4), (26, 4), (7, 3), (5, 8)])
def test_block_permutation_keeps_runs_whole_and_in_order(n, block):
    perm = get_permutation(n, seed=3, epoch=1, shuffle=True, block=block)
    assert sorted(perm.tolist()) == list(range(n))
    # cut the order where a new run starts: every piece is one whole run, ascending
    runs = [list(g) for _, g in itertools.groupby(perm.tolist(), key=lambda i: i // block)]
    assert len(runs) == -(-n // block)
    for r in runs:
        first = r[0] // block * block
        assert r == list(range(first, min(first + block, n)))
    # the runs' order is the (seed, epoch) permutation of the run numbers
    expected = np.random.default_rng([3, 1]).permutation(-(-n // block)).tolist()
    assert [r[0] // block for r in runs] == expected


def test_block_one_is_the_plain_permutation_and_epochs_differ():
    assert np.array_equal(get_permutation(30, 5, 2, True, 1), get_permutation(30, 5, 2, True))
    assert not np.array_equal(get_permutation(32, 5, 0, True, 4), get_permutation(32, 5, 1, True, 4))
    assert get_permutation(8, 5, 0, False, 4).tolist() == list(range(8))


def test_loader_batches_hold_whole_groups_across_ranks_and_resume(shard_root):
    """Batch 4 per rank x 2 ranks: every rank's batch is one whole group of 4 neighbours, the
    epoch is covered once, and a resumed loader continues with the same groups."""
    cfg = data_config(shard_root, batch_size=4, shuffle_block=4)
    ranks = [list(build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=9))
             for r in range(2)]
    seen = []
    for batches in ranks:
        for b in batches:
            ids = [int(k[1:]) for k in b["keys"]]
            assert ids == list(range(ids[0] // 4 * 4, ids[0] // 4 * 4 + 4)), ids
            seen += ids
    assert sorted(seen) == list(range(NUM_SAMPLES))

    whole = [b["keys"] for b in build_loader(cfg, "train", train=True, seed=9)]
    first = build_loader(cfg, "train", train=True, seed=9)
    it = iter(first)
    head = [next(it)["keys"] for _ in range(2)]
    state = first.state_dict()
    again = build_loader(cfg, "train", train=True, seed=9)
    again.load_state_dict(state)
    assert head + [b["keys"] for b in again] == whole


def test_bad_block_is_a_config_error():
    with pytest.raises(ConfigError, match="data.shuffle_block=0"):
        DataConfig(shuffle_block=0)
