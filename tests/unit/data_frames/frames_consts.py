"""Constants and shard makers of the frames-shard and GOP test fixtures (a uniquely named
module: several test folders have a conftest.py, and only one can be imported as ``conftest``)."""

import csv
from pathlib import Path

SOURCES = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
FPS = 8.0
SHORT_SIDE = 144
QUALITY = 90


GOP = 8
"""Keyframe interval of the ``--gop`` fixture shards."""
GOP_SOURCES = ("bikes.mp4", "carphone_pristine.mp4")
"""bikes: 250 frames with source keyframes at 0, 30, 76, ... (which --gop must not keep);
carphone: 120 frames, a single keyframe."""


def make_gop_shards(videos: Path, out: Path, codec: str, *, gop: int = GOP,
                    workers: int = 1) -> Path:
    """``make-shards --codec codec --gop gop --short-side 96`` of GOP_SOURCES into ``out``."""
    from megavid.shards.ingest.make_shards import make_shards
    from megavid.shards.ingest.options import MakeShardsOptions

    ann = out.parent / f"{out.name}.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("video", "caption"))
        for name in GOP_SOURCES:
            w.writerow((name, f"a clip of {name.split('.')[0]}"))
    make_shards(MakeShardsOptions(videos=str(videos), annotations=str(ann), out=str(out),
                                  codec=codec, gop=gop, short_side=96, workers=workers),
                quiet=True)
    return out
