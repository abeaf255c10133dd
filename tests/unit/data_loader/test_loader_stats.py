"""The counters every loader reports (``stats()``: module docstring of megavid.data.loader,
"Counters"), and the PyAV loader's one read per clip of a frames shard.

References: batches counted and wall time measured by the test around the loader; the JPEG
members read with Python's ``tarfile``; the PyAV loader reading frame by frame (the path
before the one-read change)."""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from megavid.data import workers
from megavid.data.loader import build_pyav_loader
from megavid.data.mixing import MixedLoader
from megavid.data.synthetic_loader import SyntheticLoader
from megavid.shards.format import get_frame_ext
from megavid.shards.writer import ShardSample, write_shards
from tests.helpers.loader_clips import data_config, make_clip

KEYS = {"pipeline_builds", "batches", "feed_ms_per_batch", "decode_wait_ms_per_batch"}


def _timed(loader, n: int | None = None) -> tuple[int, float]:
    """(batches read, wall seconds spent reading them) of one pass (or its first n)."""
    count, t0 = 0, time.perf_counter()
    for _ in loader:
        count += 1
        if n is not None and count == n:
            break
    return count, time.perf_counter() - t0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pyav_loader_stats(shard_root, num_workers):
    loader = build_pyav_loader(data_config(shard_root, num_workers=num_workers), "train",
                               train=True)
    assert loader.stats() == {"pipeline_builds": 0.0, "batches": 0.0, "feed_ms_per_batch": 0.0,
                              "decode_wait_ms_per_batch": 0.0}
    n, wall = _timed(loader)
    assert n == 8  # 24 samples, batches of 3
    s = loader.stats()
    assert set(s) == KEYS and s["pipeline_builds"] == 0 and s["batches"] == n
    # the workers read, decode and transform every batch: some CPU each; the consumer cannot
    # have waited longer than the pass took
    assert s["feed_ms_per_batch"] > 0
    assert 0 < s["decode_wait_ms_per_batch"] * n <= wall * 1e3 + 1
    _timed(loader, 2)  # counters go on over passes
    assert loader.stats()["batches"] == n + 2


def test_mixed_and_synthetic_loader_stats(shard_root):
    cfg = data_config(shard_root, batch_size=2)
    video = build_pyav_loader(cfg, "train", train=True)
    image = build_pyav_loader(data_config(shard_root, batch_size=1), "train", train=True, seed=1)
    mixed = MixedLoader(video, image)
    n, wall = _timed(mixed, 5)
    s = mixed.stats()
    assert set(s) == KEYS and s["batches"] == n == 5 and s["pipeline_builds"] == 0
    assert video.stats()["batches"] == 5 and image.stats()["batches"] == 5
    # the mixed batch's feed is both parts' feed
    both = video.stats()["feed_ms_per_batch"] + image.stats()["feed_ms_per_batch"]
    assert s["feed_ms_per_batch"] == pytest.approx(both)
    assert 0 < s["decode_wait_ms_per_batch"] * n <= wall * 1e3 + 1

    syn = SyntheticLoader(data_config(shard_root, num_frames=2, img_size=8), train=True)
    n, wall = _timed(syn, 3)
    s = syn.stats()
    assert set(s) == KEYS and s["batches"] == 3 and s["pipeline_builds"] == 0
    assert s["feed_ms_per_batch"] == 0 and 0 < s["decode_wait_ms_per_batch"] * 3 <= wall * 1e3 + 1


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    """<root>/shards/train: 6 frames samples (8 JPEGs of 32x32 at 4 fps) in 2 tars."""
    root = tmp_path_factory.mktemp("frames")
    samples = []
    for i in range(6):
        members = {}
        for t, rgb in enumerate(make_clip(i)):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
            members[get_frame_ext(t)] = buf.getvalue()
        meta = {"key": f"f{i:03d}", "captions": [f"frames {i}"], "duration": 2.0, "fps": 4.0,
                "num_frames": 8, "width": 32, "height": 32, "codec": "jpeg", "format": "frames",
                "start": None, "end": None, "frame_times": [t / 4 for t in range(8)]}
        samples.append(ShardSample(key=meta["key"], video=b"", ext="", meta=meta,
                                   members=members))
    write_shards(samples, root / "shards" / "train", max_count=3)
    return root


@pytest.mark.parametrize("max_span", [workers.FRAMES_MAX_SPAN, 0], ids=["one_read", "per_frame"])
def test_pil_frames_read_the_members(frames_root, monkeypatch, max_span):
    monkeypatch.setattr(workers, "FRAMES_MAX_SPAN", max_span)
    members = {}
    for tar in sorted((frames_root / "shards" / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf})
    loader = build_pyav_loader(data_config(frames_root), "train", train=True)
    dataset = workers._BatchDataset(loader.table, loader.cfg, loader._plan(), train=True,
                                    seed=0, decode_fn=None, tokenizer=loader.tokenizer)
    for index, key in enumerate(loader.table.keys):
        for chosen in ([0, 2, 5, 7], [3, 3, 4, 6], [1]):
            got = [bytes(b) for b in dataset._read_frames(index, chosen)]
            assert got == [members[f"{key}.{get_frame_ext(t)}"] for t in chosen]


def test_pil_frames_batches_equal_the_frame_by_frame_read(frames_root, monkeypatch):
    batches = {}
    for span in (workers.FRAMES_MAX_SPAN, 0):
        monkeypatch.setattr(workers, "FRAMES_MAX_SPAN", span)
        batches[span] = list(build_pyav_loader(data_config(frames_root, random_flip=True),
                                               "train", train=True, seed=3))
    for a, b in zip(*batches.values(), strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["video"], b["video"])
    assert np.unique(torch.cat([b["video"] for b in batches[0]]).numpy()).size > 10
