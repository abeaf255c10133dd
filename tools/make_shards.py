#!/usr/bin/env python
"""Make validated webdataset shards from a video folder + an annotation file.

Same as ``megavid make-shards``; see ``python tools/make_shards.py --help``.
Example::

    python tools/make_shards.py --videos videos/ --annotations train.csv --out shards/train \
        --video-col video_id --caption-col caption --codec vp9 --short-side 256 --max-fps 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megavid.data.make_shards import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool())
