#!/usr/bin/env python
"""Make validated webdataset shards from a video folder + an annotation file.

Same as ``megavid make-shards``; see ``python tools/make_shards.py --help``.
Example::

    python tools/make_shards.py --videos videos/ --annotations train.csv --out shards/train \
        --video-col video_id --caption-col caption --codec vp9 --short-side 256 --max-fps 8
    # Epic-Kitchens-100 narrations, long videos cut into 600 s chunks
    python tools/make_shards.py --videos EPIC-KITCHENS/ --annotations EPIC_100_train.csv \
        --out shards/ek100 --chunk-seconds 600 --codec h264 --short-side 256
    # WebVid page folders; existing video2dataset output
    python tools/make_shards.py --videos webvid/ --annotations results_2M_train.csv \
        --path-template '{page_dir}/{videoid}.mp4' --out shards/webvid
    python tools/make_shards.py --from-video2dataset v2d_out/ --out shards/v2d
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megavid.shards.ingest.make_shards import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool())
