"""DALI's own ``fn.readers.webdataset`` over a shard folder, through its ``NNNNN.idx`` files:
checks that DALI reads the shards exactly as ``index.jsonl`` describes them (``megavid info
--shards``, tests). The loaders do not use it (it cannot follow megavid's order or cursor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from megavid.errors import DataError
from megavid.shards.format import get_frame_exts, is_frame_ext, list_shards, read_index


def iter_dali_reader(
    spec: str | Path,
    root: str | Path | None = None,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
) -> Iterator[tuple[dict, bytes]]:
    """(sample JSON, video bytes) of every sample ``fn.readers.webdataset`` assigns to
    ``shard_id`` of ``num_shards``, read through the shards' ``NNNNN.idx`` files.

    The DALI reader splits the samples into contiguous ranges per shard (not megavid's
    permuted, resumable order, which is why the loader does not use it); this walks one range
    once, for checking that DALI reads a shard folder exactly as ``index.jsonl`` describes it
    (``megavid info --shards``, tests).

    Args:
        spec: a shard folder, tar, glob or split name (see ``format.list_shards``).
        root: dataset root for split names.
        shard_id: which range (a rank).
        num_shards: number of ranges (world size).
        batch_size: reader batch size.

    Raises:
        DataError: a tar has no ``.idx`` next to it.
    """
    from nvidia.dali import fn, pipeline_def

    tars = list_shards(str(spec), root)
    index_paths = [t.with_suffix(".idx") for t in tars]
    missing = [p.name for p in index_paths if not p.is_file()]
    if missing:
        raise DataError(f"DALI needs an index per tar; missing {', '.join(missing[:3])}: write "
                        "them with `wds2idx <tar>` or re-create the shards with megavid")

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def _reader():
        video, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(p) for p in index_paths],
            ext=["webm;mp4", "json"], name="reader", shard_id=shard_id,
            num_shards=num_shards, pad_last_batch=True, missing_component_behavior="error")
        return video, meta

    pipe = _reader()
    pipe.build()
    total = int(pipe.reader_meta("reader")["epoch_size"])
    # DALI's split: shard i holds samples [floor(i N / S), floor((i + 1) N / S))
    count = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    done = 0
    while done < count:
        videos, metas = pipe.run()
        for k in range(min(len(videos), count - done)):
            raw = np.asarray(metas[k]).tobytes()
            try:
                meta = json.loads(raw)
            except ValueError as e:
                raise DataError(
                    f"DALI read a JSON member that does not parse ({e}) from "
                    f"{metas[k].source_info() or spec}: the .idx files do not match the tars; "
                    "regenerate them (wds2idx) or re-create the shards") from e
            yield meta, np.asarray(videos[k]).tobytes()
        done += len(videos)


def iter_dali_frames_reader(
    spec: str | Path,
    root: str | Path | None = None,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    batch_size: int = 4,
) -> Iterator[tuple[dict, list[bytes]]]:
    """(sample JSON, [JPEG bytes per stored frame]) of every frames sample that
    ``fn.readers.webdataset`` assigns to ``shard_id`` of ``num_shards``: the frames layout read
    by DALI alone (one ``ext`` entry per frame number, ``missing_component_behavior="empty"``
    for clips with fewer frames), as ``iter_dali_reader`` does for video shards.

    Args:
        spec: a frames shard folder, tar, glob or split name.
        root: dataset root for split names.
        shard_id: which range (a rank).
        num_shards: number of ranges.
        batch_size: reader batch size.
    """
    from nvidia.dali import fn, pipeline_def

    tars = list_shards(str(spec), root)
    index_paths = [t.with_suffix(".idx") for t in tars]
    missing = [p.name for p in index_paths if not p.is_file()]
    if missing:
        raise DataError(f"DALI needs an index per tar; missing {', '.join(missing[:3])}: "
                        "re-create the shards with megavid")
    names = {t.name for t in tars}
    most = max(sum(is_frame_ext(x) for x in e["members"])
               for d in {t.parent for t in tars} for e in read_index(d) if e["shard"] in names)
    exts = get_frame_exts(most)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def _reader():
        return tuple(fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(p) for p in index_paths],
            ext=["json", *exts], name="reader", shard_id=shard_id, num_shards=num_shards,
            pad_last_batch=True, missing_component_behavior="empty"))

    pipe = _reader()
    pipe.build()
    total = int(pipe.reader_meta("reader")["epoch_size"])
    count = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    done = 0
    while done < count:
        outs = pipe.run()
        for k in range(min(len(outs[0]), count - done)):
            meta = json.loads(np.asarray(outs[0][k]).tobytes())
            frames = [np.asarray(o[k]).tobytes() for o in outs[1:]]
            yield meta, [f for f in frames if f]  # missing components come back empty
        done += len(outs[0])
