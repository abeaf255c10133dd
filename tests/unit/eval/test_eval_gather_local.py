"""Gathering in a single process (no torch.distributed): the same calls as on many ranks.
The 2-process behaviour is tested in tests/distributed/test_eval_gather.py."""

from __future__ import annotations

import pytest
import torch

from megavid.errors import DataError
from megavid.eval.gather import gather_features, gather_objects, get_eval_shard


def test_eval_shard_pads_with_invalid_duplicates():
    idx0, valid0 = get_eval_shard(7, 0, 2)
    idx1, valid1 = get_eval_shard(7, 1, 2)
    assert idx0.tolist() == [0, 2, 4, 6] and valid0.all()
    assert idx1.tolist() == [1, 3, 5, 0] and valid1.tolist() == [True, True, True, False]
    # over any world size, the valid indices cover the set exactly once
    for world in (1, 2, 3, 4, 8):
        shards = [get_eval_shard(10, r, world) for r in range(world)]
        assert len({len(i) for i, _ in shards}) == 1  # same number of samples on every rank
        assert sorted(torch.cat([i[v] for i, v in shards]).tolist()) == list(range(10))
    with pytest.raises(DataError, match="empty"):
        get_eval_shard(0, 0, 1)


def test_single_process_gather_orders_by_index_and_drops_padding():
    feats = torch.arange(12.0).view(6, 2)
    indices = torch.tensor([3, 0, 2, 1, 0, 4])
    valid = torch.tensor([True, True, True, True, False, True])  # the second 0 is padding
    out = gather_features(feats, valid, indices=indices, num_samples=5)
    assert out.tolist() == [[2, 3], [6, 7], [4, 5], [0, 1], [10, 11]]
    keys = gather_objects(["d", "a", "c", "b", "a'", "e"], valid, indices=indices, num_samples=5)
    assert keys == ["a", "b", "c", "d", "e"]
    # without indices: the valid rows in their local order
    assert gather_features(feats, valid).shape == (5, 2)
    assert gather_features(feats).shape == (6, 2)
    assert gather_objects(["x", "y"]) == ["x", "y"]


def test_single_process_gather_reports_double_counting_and_gaps():
    feats = torch.zeros(3, 2)
    with pytest.raises(DataError, match="more than one rank"):
        gather_features(feats, torch.ones(3, dtype=torch.bool), indices=torch.tensor([0, 1, 0]))
    with pytest.raises(DataError, match="missing e.g. \\[2\\]"):
        gather_features(feats, torch.tensor([True, True, False]), indices=torch.tensor([0, 1, 2]),
                        num_samples=3)
    with pytest.raises(ValueError, match="BoolTensor"):
        gather_features(feats, torch.ones(3))
