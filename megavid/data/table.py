"""The sample table of a split: where every sample lives (its tar and the member offsets of
the shards' ``index.jsonl``, :mod:`megavid.shards.format`), in compact arrays that forked
loader workers share, and the split helpers every backend uses."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megavid.config import DataConfig
from megavid.errors import DataError
from megavid.shards.format import IMAGE_EXTS, is_frame_ext, list_shards, read_index

SPLITS = ("train", "val", "test")


@dataclass(slots=True)
class SampleTable:
    """Where every sample of a split lives, in compact arrays (shared by forked workers).

    Row i is the sample with global index i (index.jsonl order over the split's shards).
    """

    tars: list[str]
    """Absolute tar paths; ``tar_id`` indexes this list."""
    keys: list[str]
    tar_id: np.ndarray  # int32 [N]
    video: np.ndarray  # int64 [N, 2]: offset of the data, size
    meta: np.ndarray  # int64 [N, 2]: offset and size of the sample JSON
    video_ext: list[str]
    frames: list[np.ndarray] | None = None
    """Frames shards (:mod:`megavid.shards.format`): per sample, int64 [n, 2] offset and size of
    each stored JPEG frame in time order (``video`` then spans frame 0); None for video shards."""

    def __len__(self) -> int:
        return len(self.keys)


def build_sample_table(spec: str, root: str | Path | None = None, *,
                       tars: list[Path] | None = None,
                       index: dict[Path, list[dict]] | None = None) -> SampleTable:
    """Read the ``index.jsonl`` of every shard folder that ``spec`` names.

    Args:
        spec: a split name, shard folder, tar file or glob (see ``format.list_shards``).
        root: the dataset root (``data.root``) for split names.
        tars: the tars ``spec`` names, already listed (None: list them).
        index: ``index.jsonl`` entries already read, by resolved shard folder (a folder
            missing here is read). ``megavid.data.build`` scans a split once and passes both.
    """
    tars = list_shards(spec, root) if tars is None else tars
    by_dir: dict[Path, set[str]] = {}
    for t in tars:
        by_dir.setdefault(t.parent.resolve(), set()).add(t.name)
    tar_paths: list[str] = []
    tar_ids: dict[str, int] = {}
    keys, tar_id, video, meta, exts = [], [], [], [], []
    frame_spans: list[np.ndarray] = []
    for d, names in sorted(by_dir.items()):
        for e in index[d] if index is not None and d in index else read_index(d):
            if e["shard"] not in names:
                continue  # a glob naming a subset of the folder's shards
            path = str(d / e["shard"])
            if path not in tar_ids:
                tar_ids[path] = len(tar_paths)
                tar_paths.append(path)
            members = e["members"]
            vext = next((x for x in members if x not in ("json", "txt")), None)
            if vext is None or "json" not in members:
                raise DataError(f"index entry {e.get('key')!r} of {d}/index.jsonl has no video "
                                "or json member; re-create the shards")
            keys.append(e["key"])
            tar_id.append(tar_ids[path])
            video.append(members[vext])
            meta.append(members["json"])
            exts.append(vext)
            fexts = sorted(x for x in members if is_frame_ext(x))
            frame_spans.append(np.asarray([members[x] for x in fexts], dtype=np.int64)
                               .reshape(-1, 2))
    if not keys:
        raise DataError(f"the shards of '{spec}' hold no samples (their index.jsonl is empty); "
                        "re-create them with `megavid make-shards`")
    return SampleTable(
        tars=tar_paths, keys=keys, tar_id=np.asarray(tar_id, dtype=np.int32),
        video=np.asarray(video, dtype=np.int64).reshape(-1, 2),
        meta=np.asarray(meta, dtype=np.int64).reshape(-1, 2), video_ext=exts,
        frames=frame_spans if all(len(f) for f in frame_spans) else None,
    )



def get_split_spec(data_cfg: DataConfig, split: str) -> str:
    """The shard spec of a split name (train/val/test: data.<split>), or the spec itself."""
    if split in SPLITS:
        return getattr(data_cfg, split)
    return split  # a folder / glob given directly


def read_split_meta(data_cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """Every sample JSON of a split, in index order, read by seeking into the tars (no decode).

    A member that is not valid JSON gives ``{}``: the loader skips and counts such a sample.

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' or a shard spec.
    """
    table = build_sample_table(get_split_spec(data_cfg, split), data_cfg.root)
    out: list[dict[str, Any]] = []
    fds: dict[int, int] = {}
    try:
        for i in range(len(table)):
            tid = int(table.tar_id[i])
            if tid not in fds:
                fds[tid] = os.open(table.tars[tid], os.O_RDONLY)
            offset, size = (int(v) for v in table.meta[i])
            try:
                out.append(json.loads(os.pread(fds[tid], size, offset)))
            except ValueError:
                out.append({})
    finally:
        for fd in fds.values():
            os.close(fd)
    return out



def is_image_split(data_cfg: DataConfig, split: str) -> bool:
    """True when the first sample of the split's first shard folder is an image sample
    (``{key}.jpg|.jpeg|.png``, not a frames sample): 1-frame clips, decoded with PIL (PyAV and
    decord loaders) or DALI's image decoder (``dali.image_loaders.ImageDaliLoader``).

    Args:
        data_cfg: the data config (root).
        split: a split name or shard spec.
    """
    index = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0].parent / "index.jsonl"
    try:
        with open(index) as f:
            members = json.loads(f.readline() or "{}").get("members", {})
    except (OSError, ValueError):
        return False  # build_sample_table reports a missing or broken index
    return any(ext in IMAGE_EXTS for ext in members)
