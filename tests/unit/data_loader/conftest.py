"""Fixtures: tiny real VP9 clips (encoded with PyAV/libvpx) written into real tar shards by
``megavid.shards.writer.write_shards``, with their index.jsonl / idx / stats files."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavid.shards.writer import ShardSample, write_shards
from tests.helpers.loader_clips import FPS, NUM_SAMPLES, encode_video, make_clip, sample_meta


@pytest.fixture(scope="session")
def clip_bytes() -> list[bytes]:
    return [encode_video(make_clip(i), FPS) for i in range(NUM_SAMPLES)]


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory, clip_bytes) -> Path:
    """<root>/shards/train: 24 good samples in 3 shards of 8."""
    root = tmp_path_factory.mktemp("data")
    write_shards(
        (ShardSample(key=f"s{i:03d}", video=clip_bytes[i], ext="webm", meta=sample_meta(i))
         for i in range(NUM_SAMPLES)),
        root / "shards" / "train", max_count=8)
    return root


@pytest.fixture(scope="session")
def bad_shard_root(tmp_path_factory, clip_bytes) -> Path:
    """<root>/shards/train: 24 samples where s005's video is hand-written garbage, s013's is a
    real clip cut after 200 bytes, and s018 has no caption."""
    root = tmp_path_factory.mktemp("bad")

    def samples():
        for i in range(NUM_SAMPLES):
            video, meta = clip_bytes[i], sample_meta(i)
            if i == 5:
                video = b"\x1aE\xdf\xa3 this is not a webm file " * 20
            if i == 13:
                video = video[:200]
            if i == 18:
                meta = sample_meta(i, captions=[])
            yield ShardSample(key=meta["key"], video=video, ext="webm", meta=meta)

    write_shards(samples(), root / "shards" / "train", max_count=8)
    return root
