"""Opening encoded videos with PyAV, shared by ingest (:mod:`megavid.shards`) and the decode
backends (:mod:`megavid.data`), which import nothing of each other's beyond the shard format."""

from __future__ import annotations

import io
import os

import av

# A container tag that is not UTF-8 must not make a decodable video unreadable. PyAV < 19
# decodes tags strictly unless told to ignore errors; PyAV 19 always decodes them with
# surrogateescape and no longer takes the argument (passing it is a TypeError).
_OPEN_KW = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}


def open_input(data: bytes | str | os.PathLike) -> av.container.InputContainer:
    """``av.open`` for reading an encoded video (its bytes or a path), tolerant of non-UTF-8
    container tags on every PyAV version."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    return av.open(src, mode="r", **_OPEN_KW)
