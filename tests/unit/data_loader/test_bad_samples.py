"""Bad samples on a damaged train split: one tar cut in the middle of a member, another
with random bytes written into its video members. Against a reference computed without the
loader (tarfile + a PyAV decode of every member, ``bad_shards``): no key twice in a batch (nor
in a global step over ranks), each bad sample counted once per epoch by reason and logged once,
and the same batches for 0 and 2 workers, for 1 and 2 ranks, and after a resume mid-epoch."""

from __future__ import annotations

import io
import itertools
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megavid.data.build import build_loader
from megavid.data.order import get_permutation
from megavid.shards.format import read_index
from megavid.shards.writer import ShardSample, write_shards
from tests.helpers.bad_shards import assert_no_duplicate_keys, damage_split
from tests.helpers.loader_clips import NUM_SAMPLES, data_config, sample_meta

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N = 48  # 6 tars of 8
B = 8
SEED = 5


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, clip_bytes) -> tuple[Path, list[str], dict[str, str]]:
    """(root, every key in index order, reference {bad key: reason}): 48 real VP9 samples in 6
    tars of 8 (``clip_bytes`` reused for s024..s047); 00001.tar cut in the middle of the video
    of its third sample, random bytes written into the videos of 00003.tar (seeded; patches
    that leave a partly decodable video are undone, see ``bad_shards.damage_split``)."""
    root = tmp_path_factory.mktemp("damaged")
    d = root / "shards" / "train"
    write_shards((ShardSample(key=f"s{i:03d}", video=clip_bytes[i % NUM_SAMPLES], ext="webm",
                              meta=sample_meta(i)) for i in range(N)), d, max_count=8)
    entries = read_index(d)
    ref = damage_split(d, entries, truncate=entries[10], patch=entries[24:32], ext="webm",
                       seed=1)
    # what the damage did, by the reference: the cut member's sample and every later one of
    # 00001.tar, and some (not all) patched videos of 00003.tar
    assert {k for k, r in ref.items() if r == "truncated_shard"} == {
        f"s{i:03d}" for i in range(10, 16)}
    broken = {k for k, r in ref.items() if r == "decode_error"}
    assert 2 <= len(broken) < 8 and broken <= {f"s{i:03d}" for i in range(24, 32)}
    assert set(ref.values()) == {"truncated_shard", "decode_error"}  # no "partial" left
    return root, [e["key"] for e in entries], ref


def skip_lines(caplog) -> dict[str, list[str]]:
    """key -> the "skipped sample" log lines naming it."""
    out: dict[str, list[str]] = {}
    for r in caplog.records:
        msg = r.getMessage()
        if msg.startswith("skipped sample "):
            out.setdefault(msg.split()[2], []).append(msg)
    return out


def check_epoch(batches: list[dict], keys: list[str], ref: dict[str, str]) -> None:
    assert len(batches) == N // B and all(len(b["keys"]) == B for b in batches)
    assert_no_duplicate_keys(batches)
    # every position is visited: each good sample is in the epoch, no bad one is
    assert {k for b in batches for k in b["keys"]} == set(keys) - set(ref)
    assert all(b["valid"].all() for b in batches)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        assert torch.equal(x["indices"], y["indices"]) and torch.equal(x["valid"], y["valid"])
        assert torch.equal(x["video"], y["video"])  # same frames and crops


def test_epoch_counts_logs_and_workers(damaged, caplog):
    root, keys, ref = damaged
    shard_of = {e["key"]: e["shard"] for e in read_index(root / "shards" / "train")}
    runs = {}
    for nw in (0, 2):
        caplog.clear()
        loader = build_loader(data_config(root, batch_size=B, num_workers=nw), "train",
                              train=True, seed=SEED)
        with caplog.at_level("WARNING", logger="megavid.data"):
            runs[nw] = batches = list(loader)
        check_epoch(batches, keys, ref)
        # counted once per distinct bad sample, by reason, whatever the workers reported
        assert loader.failures == Counter(ref.values())
        assert loader.epoch_failures == Counter(ref.values())
        lines = skip_lines(caplog)
        assert sorted(lines) == sorted(ref)  # each bad key logged ...
        for key, (line,) in lines.items():  # ... exactly once, with its shard and reason
            assert f"in shard {shard_of[key]} ({ref[key]}: " in line, line
        assert any(f"{len(ref)} distinct bad samples so far this epoch" in ln
                   for (ln,) in lines.values())
        summary = [r.getMessage() for r in caplog.records if "pass over epoch 0" in r.getMessage()]
        assert len(summary) == 1 and f": {len(ref)} distinct bad samples" in summary[0]
    assert_same_batches(runs[0], runs[2])

    # the next epoch: the same bad samples count again (failures is cumulative over epochs),
    # but are not logged again; its batches follow the rule too
    caplog.clear()
    with caplog.at_level("WARNING", logger="megavid.data"):
        again = list(loader)
    check_epoch(again, keys, ref)
    assert [b["keys"] for b in again] != [b["keys"] for b in runs[2]]
    assert loader.failures == Counter({r: 2 * n for r, n in Counter(ref.values()).items()})
    assert loader.epoch_failures == Counter(ref.values())
    assert not skip_lines(caplog)
    assert any("pass over epoch 1" in r.getMessage() for r in caplog.records)


def test_resume_mid_epoch_and_two_ranks(damaged, caplog):
    root, keys, ref = damaged
    full = list(build_loader(data_config(root, batch_size=B), "train", train=True, seed=SEED))
    check_epoch(full, keys, ref)

    first = build_loader(data_config(root, batch_size=B, num_workers=2), "train", train=True,
                         seed=SEED)
    head = list(itertools.islice(iter(first), 3))
    state = first.state_dict()
    assert state["cursor"] == 3 * B
    resumed = build_loader(data_config(root, batch_size=B, num_workers=1), "train", train=True,
                           seed=0)
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level("WARNING", logger="megavid.data"):
        rest = list(resumed)
    assert_same_batches(head + rest, full)
    # the resumed loader counts (and logs, once) the bad samples it met: every one at the
    # positions it read, maybe some met as replacement candidates; nothing else
    order = [keys[i] for i in get_permutation(N, SEED, 0, True)]
    met = set(skip_lines(caplog))
    assert {k for k in order[3 * B:] if k in ref} <= met <= set(ref)
    assert resumed.failures == Counter(ref[k] for k in met)

    # two ranks of 4 (the same global batch of 8): each global step holds the one-rank batch,
    # so no key twice across the ranks of a step either
    ranks = [list(build_loader(data_config(root, batch_size=B // 2, num_workers=2), "train",
                               train=True, rank=r, world_size=2, seed=SEED)) for r in range(2)]
    assert [a["keys"] + b["keys"] for a, b in zip(*ranks)] == [b["keys"] for b in full]


def test_eval_counts_every_good_sample_once(damaged):
    root, keys, ref = damaged
    loader = build_loader(data_config(root, eval_batch_size=B, num_workers=2), "train",
                          train=False)
    batches = list(loader)
    assert_no_duplicate_keys(batches)  # stand-ins come from outside the step
    valid = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert sorted(valid) == sorted(set(keys) - set(ref))
    assert sum(len(b["keys"]) for b in batches) == N  # the shapes stay full
    assert loader.failures == Counter(ref.values())
    list(loader)  # a second evaluation pass counts its bad samples again
    assert loader.failures == Counter({r: 2 * n for r, n in Counter(ref.values()).items()})


def test_mixed_loader_with_a_corrupt_image(damaged, tmp_path, caplog):
    """Joint image-video batches: both sources follow the rules; ``failures`` sums them."""
    root, keys, ref = damaged
    images = tmp_path / "images"
    samples = []
    for i in range(8):
        buf = io.BytesIO()
        rgb = np.full((24, 40, 3), 30 * i, dtype=np.uint8)
        Image.fromarray(rgb).save(buf, format="PNG")
        data = buf.getvalue()
        if i == 5:  # garbage after the header: PIL reads the size, the pixels do not decode
            cut = data.index(b"IDAT") + 8
            data = data[:cut] + bytes((b * 11 + 5) % 256 for b in range(len(data) - cut))
        samples.append(ShardSample(key=f"img{i:03d}", video=data, ext="png",
                                   meta={"key": f"img{i:03d}", "captions": [f"image {i}"],
                                         "width": 40, "height": 24}))
    write_shards(samples, images, max_count=4)
    # independent reference: PIL cannot decode img005 alone
    with pytest.raises(Exception):
        Image.open(io.BytesIO(samples[5].video)).load()

    cfg = data_config(root, batch_size=B, num_workers=2, image_train=str(images),
                      image_ratio=0.25)  # 6 clips + 2 images per batch
    loader = build_loader(cfg, "train", train=True, seed=SEED)
    with caplog.at_level("WARNING", logger="megavid.data"):
        batches = list(loader)
    assert len(batches) == N // 6
    assert_no_duplicate_keys(batches)
    assert not {k for b in batches for k in b["keys"]} & (set(ref) | {"img005"})
    # 8 steps x 2 images = two epochs of the image source, each meeting img005 once
    assert loader.failures == Counter(ref.values()) + Counter({"decode_error": 2})
    assert sorted(skip_lines(caplog)) == sorted([*ref, "img005"])  # logged once each
