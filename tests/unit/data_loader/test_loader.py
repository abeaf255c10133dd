"""The resumable loader over real VP9 shards: coverage across ranks and workers, determinism,
exact resume (also to another world size), eval padding, and skipped corrupt samples."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from megavid.data.build import build_loader, get_backend
from megavid.data.order import get_permutation
from megavid.errors import ConfigError, DataError
from megavid.shards.format import read_index

from tests.helpers.loader_clips import NUM_SAMPLES, data_config, frame_level, sample_colour

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_epoch(loader, max_batches: int | None = None) -> list[dict]:
    return list(itertools.islice(iter(loader), max_batches))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_contract_and_decoded_content(shard_root):
    cfg = data_config(shard_root, shuffle=False)
    loader = build_loader(cfg, "train", train=False)
    batches = run_epoch(loader)
    b = batches[0]
    assert b["video"].dtype == torch.uint8 and b["video"].shape == (5, 4, 3, 32, 32)
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (5, 16)
    assert b["attention_mask"].shape == (5, 16)
    assert b["valid"].tolist() == [True] * 5
    assert b["keys"] == [f"s{i:03d}" for i in range(5)]
    assert [m["key"] for m in b["meta"]] == b["keys"]
    assert b["captions"][2] == "clip number 2 variant a"  # eval: the first caption
    # the pixels are the right sample's (red level) and the eval frames are the segment
    # centres of 1 s at 8 fps: t = 0.125, 0.375, .. -> frames 1, 3, 5, 7 (green level)
    for i in range(NUM_SAMPLES):
        clip = batches[i // 5]["video"][i % 5].float()
        assert abs(clip[:, 0].mean() - sample_colour(i)) < 4
        greens = clip[:, 1].mean(dim=(1, 2))
        assert torch.allclose(greens, torch.tensor([frame_level(f) for f in (1, 3, 5, 7)],
                                                   dtype=torch.float32), atol=4)
    assert len(loader) == 5 and len(batches) == 5 and len(batches[-1]["keys"]) == 4


def test_two_ranks_two_workers_cover_the_epoch_once(shard_root):
    cfg = data_config(shard_root, num_workers=2, batch_size=3)
    per_rank = [run_epoch(build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=7))
                for r in range(2)]
    assert [len(p) for p in per_rank] == [4, 4]  # 24 samples / (3 x 2)
    seen = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert sorted(seen) == [f"s{i:03d}" for i in range(NUM_SAMPLES)]
    # the order is the (seed, epoch) permutation, ranks taking contiguous slices of each step
    perm = np.random.default_rng([7, 0]).permutation(NUM_SAMPLES)
    expect = [f"s{i:03d}" for i in perm]
    for step in range(4):
        assert per_rank[0][step]["keys"] == expect[step * 6: step * 6 + 3]
        assert per_rank[1][step]["keys"] == expect[step * 6 + 3: step * 6 + 6]


def test_drop_last_gives_every_rank_the_same_steps(shard_root):
    cfg = data_config(shard_root, batch_size=5)  # 24 // 10 = 2 steps, 4 samples dropped
    runs = [run_epoch(build_loader(cfg, "train", train=True, rank=r, world_size=2))
            for r in range(2)]
    assert [len(r) for r in runs] == [2, 2]
    assert len(set(keys_of(runs[0]) + keys_of(runs[1]))) == 20
    # drop_last off: the tail wraps to the start of the permutation, every sample is seen
    cfg = data_config(shard_root, batch_size=5, drop_last=False)
    runs = [run_epoch(build_loader(cfg, "train", train=True, rank=r, world_size=2))
            for r in range(2)]
    assert [len(r) for r in runs] == [3, 3]
    assert len(set(keys_of(runs[0]) + keys_of(runs[1]))) == NUM_SAMPLES


def test_order_is_reproducible_and_changes_with_epoch_and_seed(shard_root):
    cfg = data_config(shard_root, num_workers=0)
    a = build_loader(cfg, "train", train=True, seed=1)
    b = build_loader(cfg, "train", train=True, seed=1)
    ea, eb = run_epoch(a), run_epoch(b)
    assert keys_of(ea) == keys_of(eb)
    torch.testing.assert_close(ea[0]["video"], eb[0]["video"])
    assert ea[0]["captions"] == eb[0]["captions"]
    assert a.state_dict()["epoch"] == 1  # a finished pass moves to the next epoch
    e1 = run_epoch(a)
    assert keys_of(e1) != keys_of(ea) and sorted(keys_of(e1)) == sorted(keys_of(ea))
    # train captions are drawn per (seed, epoch, index): some differ between epochs
    cap0 = {k: c for b in ea for k, c in zip(b["keys"], b["captions"])}
    cap1 = {k: c for b in e1 for k, c in zip(b["keys"], b["captions"])}
    assert cap0 != cap1
    assert {c[-1] for c in cap0.values()} == {"a", "b", "c"}
    other = run_epoch(build_loader(cfg, "train", train=True, seed=2))
    assert keys_of(other) != keys_of(ea)


def test_workers_do_not_change_the_data(shard_root):
    one = run_epoch(build_loader(data_config(shard_root, num_workers=0), "train", train=True,
                                 seed=3))
    two = run_epoch(build_loader(data_config(shard_root, num_workers=2), "train", train=True,
                                 seed=3))
    assert keys_of(one) == keys_of(two)
    for x, y in zip(one, two):
        torch.testing.assert_close(x["video"], y["video"])  # same frames, same crops
        assert torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.parametrize("world_after,batch_after", [(2, 3), (1, 6)])
def test_resume_continues_with_exactly_the_unseen_samples(shard_root, world_after, batch_after):
    cfg = data_config(shard_root, num_workers=2, batch_size=3)
    # reference: the whole epoch as one global sequence of positions
    full_order = [f"s{i:03d}" for i in get_permutation(NUM_SAMPLES, 11, 0, True)]
    first = [build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=11)
             for r in range(2)]
    seen = []
    for ld in first:
        seen += keys_of(run_epoch(ld, max_batches=2))  # stop after 2 of 4 steps
    state = first[0].state_dict()
    assert state == first[1].state_dict() == {"epoch": 0, "cursor": 12, "seed": 11,
                                              "num_samples": NUM_SAMPLES}
    cfg2 = data_config(shard_root, num_workers=1, batch_size=batch_after)
    rest = []
    for r in range(world_after):
        ld = build_loader(cfg2, "train", train=True, rank=r, world_size=world_after, seed=0)
        ld.load_state_dict(json.loads(json.dumps(state)))
        ld.set_epoch(0)  # the trainer's set_epoch of the current epoch keeps the cursor
        batches = run_epoch(ld)
        assert len(batches) == 12 // (batch_after * world_after)
        rest += keys_of(batches)
    assert sorted(seen) == sorted(full_order[:12])
    assert sorted(rest) == sorted(full_order[12:])
    assert not set(seen) & set(rest)


def test_resumed_samples_decode_identically(shard_root):
    """Frames, crops and captions depend on (seed, epoch, index) only."""
    cfg = data_config(shard_root, batch_size=4)
    whole = run_epoch(build_loader(cfg, "train", train=True, seed=5))
    ld = build_loader(cfg, "train", train=True, seed=5)
    ld.load_state_dict({"epoch": 0, "cursor": 8, "seed": 5, "num_samples": NUM_SAMPLES})
    rest = run_epoch(ld)
    for a, b in zip(whole[2:], rest):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        torch.testing.assert_close(a["video"], b["video"])


def test_load_state_dict_rejects_other_data(shard_root):
    ld = build_loader(data_config(shard_root), "train", train=True)
    with pytest.raises(DataError, match="samples"):
        ld.load_state_dict({"epoch": 0, "cursor": 3, "seed": 0, "num_samples": 99})


def test_eval_every_sample_once_with_padded_ranks(shard_root):
    cfg = data_config(shard_root, eval_batch_size=5, num_workers=2)
    runs = [run_epoch(build_loader(cfg, "train", train=False, rank=r, world_size=2))
            for r in range(2)]
    # 24 samples, 10 per step: steps of 10, 10, 4; the last step gives rank 0 four samples and
    # rank 1 four padding samples, so both ranks gather tensors of the same shape
    assert [len(r) for r in runs] == [3, 3]
    assert [len(b["keys"]) for b in runs[0]] == [5, 5, 4]
    assert [len(b["keys"]) for b in runs[1]] == [5, 5, 4]
    valid = [k for run in runs for b in run for k, v in zip(b["keys"], b["valid"]) if v]
    assert sorted(valid) == [f"s{i:03d}" for i in range(NUM_SAMPLES)]
    assert runs[1][-1]["valid"].tolist() == [False] * 4
    # the eval order is the identity, never shuffled
    assert runs[0][0]["keys"] == [f"s{i:03d}" for i in range(5)]
    assert runs[1][0]["keys"] == [f"s{i:03d}" for i in range(5, 10)]


def test_corrupt_samples_are_skipped_counted_and_replaced(bad_shard_root, caplog):
    index = read_index(bad_shard_root / "shards" / "train")
    assert len(index) == NUM_SAMPLES  # the bad members really are in the shards
    cfg = data_config(bad_shard_root, num_workers=2, batch_size=4, shuffle=False)
    loader = build_loader(cfg, "train", train=True)
    with caplog.at_level("WARNING", logger="megavid.data"):
        batches = run_epoch(loader)
    assert any("s005" in r.message and "00000.tar" in r.message for r in caplog.records)
    assert any("s018" in r.message and "no_caption" in r.message for r in caplog.records)
    assert all(len(b["keys"]) == 4 for b in batches) and len(batches) == 6
    keys = keys_of(batches)
    assert not {"s005", "s013", "s018"} & set(keys)
    assert all(len(set(b["keys"])) == 4 for b in batches)  # no sample twice in a batch
    # each bad sample's slot takes the sample at the documented position (loader docstring,
    # "Faults"): p + k*G with k = 1 + a draw in [0, N//G - 1) seeded by (seed, 2, epoch, p),
    # outside the batch; it then appears twice in the epoch (identity order: position = index)
    for p in (5, 13, 18):
        k = 1 + int(np.random.default_rng([0, 2, 0, p]).integers(NUM_SAMPLES // 4 - 1))
        stand_in = f"s{(p + k * 4) % NUM_SAMPLES:03d}"
        assert batches[p // 4]["keys"][p % 4] == stand_in
        assert Counter(keys)[stand_in] == 2
    assert dict(loader.failures) == {"decode_error": 2, "no_caption": 1}


def test_consecutive_failures_abort_naming_the_shard(bad_shard_root):
    cfg = data_config(bad_shard_root, batch_size=4, shuffle=False, max_consecutive_failures=1)
    loader = build_loader(cfg, "train", train=True)
    with pytest.raises(DataError, match=r"00000\.tar.*s005.*decode_error"):
        run_epoch(loader)


def test_config_errors(shard_root):
    with pytest.raises(ConfigError, match="backend"):
        get_backend("nope")
    assert get_backend("auto", data_config(shard_root), "train").__name__ == "build_pyav_loader"
    with pytest.raises(DataError, match="does not exist"):
        build_loader(data_config(shard_root), "val", train=False)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loader(data_config(shard_root, batch_size=13), "train", train=True, world_size=2)


def test_eval_marks_stand_ins_for_failed_samples_invalid(bad_shard_root):
    cfg = data_config(bad_shard_root, eval_batch_size=5)
    loader = build_loader(cfg, "train", train=False)
    batches = run_epoch(loader)
    valid = [k for b in batches for k, v in zip(b["keys"], b["valid"]) if v]
    bad = {"s005", "s013", "s018"}
    assert sorted(valid) == sorted(f"s{i:03d}" for i in range(NUM_SAMPLES) if f"s{i:03d}" not in bad)
    assert sum(len(b["keys"]) for b in batches) == NUM_SAMPLES  # shapes stay full
    assert sum(loader.failures.values()) == 3


def test_truncated_shard_is_a_counted_failure(shard_root, tmp_path):
    import shutil

    src = shard_root / "shards" / "train"
    dst = tmp_path / "shards" / "train"
    shutil.copytree(src, dst)
    last = read_index(dst)[7]  # the last sample of shard 00000
    with open(dst / "00000.tar", "r+b") as f:  # cut the tar inside that sample's video
        f.truncate(last["members"]["webm"][0] + 100)
    loader = build_loader(data_config(tmp_path, batch_size=4, shuffle=False), "train", train=True)
    keys = keys_of(run_epoch(loader))
    assert last["key"] == "s007" and "s007" not in keys and len(keys) == NUM_SAMPLES
    assert dict(loader.failures) == {"truncated_shard": 1}


def test_synthetic_loader_contract_and_resume():
    from megavid.config import DataConfig

    cfg = DataConfig(name="synthetic", num_frames=2, img_size=16, batch_size=2, max_text_len=8)
    a = build_loader(cfg, "train", train=True, rank=1, world_size=2)
    batches = run_epoch(a, 3)
    b0 = batches[0]
    assert b0["video"].shape == (2, 2, 3, 16, 16) and b0["video"].dtype == torch.uint8
    assert b0["input_ids"].shape == (2, 8) and b0["keys"] == ["syn2", "syn3"]
    state = a.state_dict()
    assert state["cursor"] == 12
    b = build_loader(cfg, "train", train=True, rank=1, world_size=2)
    b.load_state_dict(state)
    nxt = next(iter(b))
    assert nxt["keys"] == ["syn14", "syn15"]
    ref = run_epoch(build_loader(cfg, "train", train=True, rank=1, world_size=2), 4)[3]
    torch.testing.assert_close(nxt["video"], ref["video"])
