"""The shard format: what ingest writes and loaders read (the contract between the two).

Layout of a shard folder (the contract every loader codes against)::

    <dir>/00000.tar          {key}.json + {key}.webm|.mp4 per sample, members sorted by key
                             then extension, headers with mtime 0, uid/gid 0, no user names,
                             mode 0o644: identical input gives byte-identical tars
    <dir>/00000.idx          DALI ``fn.readers.webdataset`` index (what ``wds2idx`` writes)
    <dir>/00000_stats.json   {"count", "successes", "failures": {reason: n},
                              "failed": [{"source", "reason"}], "bytes", "seconds"}
    <dir>/index.jsonl        one line per sample: {"key", "shard", "members": {ext: [offset,
                             size]}, "duration", "num_frames", ...} for random access

Every file is written under a temporary name and renamed, and a shard's stats file is renamed
last: a shard whose stats file exists is complete, and no reader ever sees a truncated tar
under a final name (:mod:`megavid.shards.writer`). ``count`` in the stats is the number of
inputs the shard consumed (``successes`` written + failures attributed to it), which is what
resuming needs.

Image samples hold ``{key}.jpg|.jpeg|.png`` (:data:`IMAGE_EXTS`) instead of a video member.

Frames shards (``make-shards --shard-format frames``; ``docs/data.md``) store a
clip as JPEG frames, for DALI's (hardware) JPEG decoder; sample ``key`` of a tar holds::

    key.0000.jpg  key.0001.jpg  ...  key.NNNN.jpg   one JPEG per stored frame, in time order
    key.json                                        the sample JSON (below)

Webdataset splits member names at the first dot, so every frame is a component of the sample
``key`` with extension ``NNNN.jpg``: ``fn.readers.webdataset(ext=["0000.jpg", "0001.jpg", ...],
missing_component_behavior="empty")`` reads a sample without Python in the loop, and the
members sort (digits before letters) in time order, before the JSON.

The sample JSON keeps the *source video's* ``duration``, ``start`` and ``end``, so that a loader
draws the same timestamps as it does for a video shard of the same source and seed; then each
timestamp takes the stored frame on screen at that time (the last stored frame at or before
it, as a video loader takes the source frame: :data:`FRAME_TOLERANCE`). Frame facts:
``format`` "frames", ``codec`` "jpeg", ``num_frames`` (stored frames), ``fps`` (the stored
rate), ``width``/``height`` (of the JPEGs), ``frame_times`` (seconds of each stored frame, i.e.
source frame index / source fps), ``quality``, and ``original`` (the source's width, height,
fps, codec, num_frames).

This module is the only part of :mod:`megavid.shards` that the loaders (:mod:`megavid.data`)
import, and it imports nothing else of :mod:`megavid.shards` (tests/unit/test_imports.py).
"""

from __future__ import annotations

import glob as globlib
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megavid.errors import DataError

VIDEO_EXTS = ("webm", "mp4", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png")
"""Shard member extensions of image samples (``{key}.jpg`` + ``{key}.json``)."""
IDX_VERSION = "v1.2"
_SHARD_RE = re.compile(r"^(\d{5})\.tar$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_KEY_LEN = 90  # ustar names are at most 100 bytes: key + "." + extension must fit

FRAMES_FORMAT = "frames"
"""``format`` of a frames sample JSON (and index.jsonl entry)."""
FRAMES_CODEC = "jpeg"
"""``codec`` of a frames sample: what ``data.backend=auto`` keys on."""
FRAME_DIGITS = 4
MAX_STORED_FRAMES = 10 ** FRAME_DIGITS
"""Frames per sample the member names can number (20 min at 8 fps: cut longer videos into
windows with start/end columns)."""
_FRAME_EXT_RE = re.compile(r"^\d{%d}\.jpg$" % FRAME_DIGITS)
FRAME_TOLERANCE = 1e-6
"""Fraction of a frame by which a timestamp may fall short of a frame boundary and still count
as that frame (float error of t * fps at exact boundaries): the frame on screen at t is
``floor(t * fps + FRAME_TOLERANCE)``, for the frames a frames shard stores and the frames a
loader samples alike."""


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``NNNNN.tar``."""
    return f"{index:05d}.tar"


def check_key(key: str) -> None:
    """Raise DataError unless ``key`` is usable as a webdataset key."""
    if not _KEY_RE.match(key or "") or len(key) > MAX_KEY_LEN:
        raise DataError(
            f"sample key {key!r} is not a valid shard key: use at most {MAX_KEY_LEN} letters, "
            "digits, '_' or '-' (no dots or slashes)"
        )


def format_idx(bundles: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI webdataset index text: ``v1.2 <n>`` then one line per sample of
    ``ext offset size name`` groups (the format of nvidia-dali's ``wds2idx``)."""
    lines = [f"{IDX_VERSION} {len(bundles)}"]
    for bundle in bundles:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in bundle))
    return "\n".join(lines) + "\n"


def scan_tar(tar_path: str | Path) -> list[tuple[str, list[tuple[str, int, int, str]]]]:
    """Parse a shard tar's headers: [(key, [(ext, data_offset, size, name), ...]), ...] in
    member order; non-regular members are skipped (as wds2idx does)."""
    out: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    with tarfile.open(tar_path, mode="r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            dot = m.name.find(".", len(m.name) - len(base))
            if dot < 0:
                key, ext = m.name, ""
            else:
                key, ext = m.name[:dot], m.name[dot + 1 :]
            if out and out[-1][0] == key:
                out[-1][1].append((ext, m.offset_data, m.size, m.name))
            else:
                out.append((key, [(ext, m.offset_data, m.size, m.name)]))
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def list_shards(spec: str, root: str | Path | None = None) -> list[Path]:
    """Resolve a shard spec to a sorted list of tar files.

    Args:
        spec: a shard folder, a ``.tar`` file, a glob (``dir/0000*.tar``), a brace pattern
            (``dir/{00000..00003}.tar``) or a split name (``train``: ``<root>/shards/train``).
        root: dataset root used for split names (``data.root``).

    Raises:
        DataError: the path does not exist, or names no ``.tar`` shard.
    """
    if not spec:
        raise DataError("empty shard spec: set data.train/val/test to a folder, glob or split name")
    candidates: list[Path] = []
    if any(c in spec for c in "*?[{"):
        import braceexpand  # webdataset's own dependency

        patterns = list(braceexpand.braceexpand(spec)) if "{" in spec else [spec]
        files = sorted({Path(f) for pat in patterns for f in globlib.glob(pat)})
        tars = [f for f in files if f.is_file() and f.suffix == ".tar"]
        if not tars:
            raise DataError(f"no .tar shard matches '{spec}'; check the pattern and the folder")
        return tars
    path = Path(spec)
    if not path.exists() and root is not None and not path.is_absolute():
        candidates = [Path(root) / "shards" / spec, Path(root) / spec]
        path = next((c for c in candidates if c.exists()), candidates[0])
    if not path.exists():
        where = f" (also looked for {', '.join(map(str, candidates))})" if candidates else ""
        raise DataError(
            f"shard path '{spec}' does not exist{where}; run `megavid make-synthetic` or "
            "`megavid make-shards`, or fix data.root / the split name"
        )
    if path.is_file():
        if path.suffix != ".tar":
            raise DataError(f"'{path}' is not a .tar shard; point at a shard folder or a .tar file")
        return [path]
    tars = sorted(p for p in path.iterdir() if p.is_file() and _SHARD_RE.match(p.name))
    if not tars:
        tars = sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise DataError(
            f"shard folder '{path}' holds no .tar shards; (re)create it with "
            "`megavid make-synthetic` or `megavid make-shards`"
        )
    return tars


def read_index(shard_dir: str | Path) -> list[dict]:
    """The entries of ``<shard_dir>/index.jsonl`` (one dict per sample, in shard order).

    Raises:
        DataError: the index is missing or not valid JSON lines.
    """
    path = Path(shard_dir) / "index.jsonl"
    if not path.is_file():
        raise DataError(f"no sample index {path}; re-create the shards with megavid (it writes one)")
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e}); re-create the shards") from e
    return out


def read_sample(shard_dir: str | Path, entry: dict) -> tuple[bytes, dict]:
    """Random access: the (video bytes, sample JSON) of an index entry, read by seeking."""
    tar = Path(shard_dir) / entry["shard"]
    members = entry["members"]
    vext = next(e for e in members if e != "json")  # frames shards: the first frame
    with open(tar, "rb") as f:
        f.seek(members["json"][0])
        meta = json.loads(f.read(members["json"][1]))
        f.seek(members[vext][0])
        video = f.read(members[vext][1])
    return video, meta


def iter_tar_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of a shard, read with tarfile (no webdataset)."""
    with open(tar_path, "rb") as f:
        for key, bundle in scan_tar(tar_path):
            out = {}
            for ext, off, size, _ in bundle:
                f.seek(off)
                out[ext] = f.read(size)
            yield key, out


# --------------------------------------------------------------------------------------------
# Frames shards
# --------------------------------------------------------------------------------------------
def get_frame_ext(i: int) -> str:
    """The member extension of stored frame ``i``: ``0000.jpg``, ``0001.jpg``, ..."""
    if not 0 <= i < MAX_STORED_FRAMES:
        raise DataError(f"frame {i} is past the {MAX_STORED_FRAMES} frames a frames sample "
                        "can hold; lower --fps or cut the video into windows (start/end)")
    return f"{i:0{FRAME_DIGITS}d}.jpg"


def get_frame_exts(n: int) -> list[str]:
    """The extensions of ``n`` stored frames (``fn.readers.webdataset``'s ``ext`` list)."""
    return [get_frame_ext(i) for i in range(n)]


def is_frame_ext(ext: str) -> bool:
    """True for a frame member extension (``NNNN.jpg``)."""
    return bool(_FRAME_EXT_RE.match(ext))


def is_frames_meta(meta: dict[str, Any]) -> bool:
    """True when a sample JSON / index entry describes a frames sample."""
    return meta.get("format") == FRAMES_FORMAT or str(meta.get("codec", "")).lower() == FRAMES_CODEC


def get_frame_times(meta: dict[str, Any]) -> np.ndarray:
    """float64 [n] times (seconds) of the stored frames of a frames sample JSON.

    Raises:
        DataError: the JSON has no ``frame_times`` list matching ``num_frames``.
    """
    times = meta.get("frame_times")
    if not isinstance(times, list) or not times:
        raise DataError(f"frames sample {meta.get('key')!r} has no 'frame_times'; re-create the "
                        "shards with `megavid make-shards --shard-format frames`")
    out = np.asarray(times, dtype=np.float64)
    if "num_frames" in meta and int(meta["num_frames"]) != len(out):
        raise DataError(f"frames sample {meta.get('key')!r}: num_frames={meta['num_frames']} but "
                        f"{len(out)} frame_times; re-create the shards")
    return out


def is_frames_shard_dir(shard_dir: Any) -> bool:
    """True when a shard folder holds frames shards (its first ``index.jsonl`` entry says so)."""
    path = Path(shard_dir) / "index.jsonl"
    if not path.is_file():
        return False
    with open(path) as f:
        line = f.readline()
    if not line.strip():
        return False
    entry = json.loads(line)
    return is_frames_meta(entry) or any(is_frame_ext(e) for e in entry.get("members", {}))
