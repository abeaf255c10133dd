"""The deterministic, resumable shard writer (the layout is :mod:`megavid.shards.format`'s).

Every file is written under a temporary name and renamed, and a shard's stats file is renamed
last: a shard whose stats file exists is complete, and no reader ever sees a truncated tar
under a final name. ``count`` in the stats is the number of inputs the shard consumed
(``successes`` written + failures attributed to it), which is what resuming needs.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from megavid.errors import DataError
from megavid.shards.format import check_key, format_idx, scan_tar, shard_name

DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(kw_only=True, slots=True)
class ShardSample:
    """One sample to write: the encoded video and its sample JSON."""

    key: str
    """Unique key: letters, digits, '_' and '-' only (webdataset splits names at dots)."""
    video: bytes
    """The encoded video file."""
    ext: str
    """Video extension without the dot: 'webm' or 'mp4'."""
    meta: dict[str, Any]
    """The sample JSON (``key`` is set to ``key``)."""
    source: str = ""
    """Where the sample came from (for stats and error messages)."""
    members: dict[str, bytes] | None = None
    """Frames shards (:mod:`megavid.shards.format`): the payload members ``{ext: bytes}``
    (``0000.jpg``, ``0001.jpg``, ...) written instead of ``video``/``ext``."""

    def payloads(self) -> dict[str, bytes]:
        """The non-JSON members of the sample: ``{ext: bytes}``."""
        return dict(self.members) if self.members is not None else {self.ext: self.video}

    @property
    def nbytes(self) -> int:
        """Payload bytes (what ``max_bytes`` counts)."""
        return sum(len(v) for v in self.payloads().values())


@dataclass(kw_only=True, slots=True)
class SampleFailure:
    """An input that was rejected; counted in the stats of the shard being filled."""

    source: str
    reason: str


@dataclass(slots=True)
class _OpenShard:
    samples: list[ShardSample] = field(default_factory=list)
    failed: list[SampleFailure] = field(default_factory=list)
    nbytes: int = 0
    started: float = field(default_factory=time.perf_counter)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def encode_meta(meta: dict[str, Any]) -> bytes:
    """The canonical JSON bytes of a sample (sorted keys: deterministic)."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _index_entry(shard: str, key: str, members: dict[str, list[int]], meta: dict) -> dict:
    entry: dict[str, Any] = {"key": key, "shard": shard, "members": members}
    for k in ("duration", "num_frames", "fps", "width", "height", "codec", "start", "end",
              "format", "gop"):
        if k in meta:
            entry[k] = meta[k]
    return entry


def _flush_shard(out_dir: Path, index: int, shard: _OpenShard) -> tuple[dict, list[dict]]:
    """Write one tar + idx + stats; returns (stats, index entries)."""
    name = shard_name(index)
    tar_path = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    bundles: list[list[tuple[str, int, int, str]]] = []
    entries: list[dict] = []
    # Sorted by key, then extension: the member order is part of the byte-identity contract.
    samples = sorted(shard.samples, key=lambda s: s.key)
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for s in samples:
                meta = dict(s.meta)
                meta["key"] = s.key
                # frame members "0000.jpg" < ... < "json": digits sort before letters
                payloads = sorted([("json", encode_meta(meta)), *s.payloads().items()])
                bundle = []
                members: dict[str, list[int]] = {}
                for ext, data in payloads:
                    member = f"{s.key}.{ext}"
                    # ustar: one 512-byte header block, then the data
                    data_offset = tf.offset + tarfile.BLOCKSIZE
                    tf.addfile(_tarinfo(member, len(data)), io.BytesIO(data))
                    bundle.append((ext, data_offset, len(data), member))
                    members[ext] = [data_offset, len(data)]
                bundles.append(bundle)
                entries.append(_index_entry(name, s.key, members, meta))
        raw.flush()
        os.fsync(raw.fileno())
    failures: dict[str, int] = {}
    for f in shard.failed:
        failures[f.reason] = failures.get(f.reason, 0) + 1
    stats = {
        "count": len(samples) + len(shard.failed),
        "successes": len(samples),
        "failures": dict(sorted(failures.items())),
        "failed": [{"source": f.source, "reason": f.reason} for f in shard.failed],
        "bytes": tmp.stat().st_size,
        "seconds": round(time.perf_counter() - shard.started, 3),
    }
    _write_atomic(out_dir / f"{index:05d}.idx", format_idx(bundles).encode())
    os.replace(tmp, tar_path)
    # stats last: its presence marks the shard complete
    _write_atomic(out_dir / f"{index:05d}_stats.json", json.dumps(stats, indent=1).encode())
    return stats, entries


def _entries_from_tar(tar_path: Path) -> list[dict]:
    """Rebuild the index.jsonl entries of a complete shard (used when resuming)."""
    entries = []
    with open(tar_path, "rb") as f:
        for key, bundle in scan_tar(tar_path):
            members = {ext: [off, size] for ext, off, size, _ in bundle}
            meta: dict = {}
            if "json" in members:
                f.seek(members["json"][0])
                meta = json.loads(f.read(members["json"][1]))
            entries.append(_index_entry(tar_path.name, key, members, meta))
    return entries


def complete_shards(out_dir: str | Path) -> tuple[int, int]:
    """How far a previous (possibly interrupted) write got.

    Returns ``(n_shards, n_inputs)``: the length of the contiguous run of complete shards
    ``00000..`` (tar, idx and stats present, stats consistent with the tar size) and how many
    inputs those shards consumed (the sum of their ``count``), so that a writer fed the same
    ordered inputs can skip them and continue at shard ``n_shards``.
    """
    out_dir = Path(out_dir)
    n = consumed = 0
    while True:
        tar, idx = out_dir / shard_name(n), out_dir / f"{n:05d}.idx"
        stats_path = out_dir / f"{n:05d}_stats.json"
        if not (tar.is_file() and idx.is_file() and stats_path.is_file()):
            break
        try:
            stats = json.loads(stats_path.read_text())
            if int(stats["bytes"]) != tar.stat().st_size:
                break
            consumed += int(stats["count"])
        except (ValueError, KeyError, TypeError):
            break
        n += 1
    return n, consumed


def _remove_shards_from(out_dir: Path, start: int) -> None:
    """Delete shards numbered >= start and any temporary files (a rewrite starts there)."""
    for p in out_dir.iterdir():
        m = re.match(r"^(\d{5})(\.tar|\.idx|_stats\.json)$", p.name)
        if (m and int(m.group(1)) >= start) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink()


def write_shards(
    samples: Iterable[ShardSample | SampleFailure],
    out_dir: str | Path,
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    start_shard: int = 0,
) -> dict[str, Any]:
    """Write samples into ``out_dir/NNNNN.tar`` shards with idx, stats and index.jsonl.

    A shard is closed when it holds ``max_count`` samples or ``max_bytes`` of payload.
    Failures are counted in the stats of the shard open when they arrive.

    Args:
        samples: samples (and failures) in the order they should be written.
        out_dir: the shard folder (created).
        max_count: samples per shard.
        max_bytes: payload bytes per shard (a shard always holds at least one sample).
        start_shard: resume: keep shards ``0..start_shard-1`` (complete, see
            :func:`complete_shards`; the caller skips the inputs they consumed) and write
            from shard ``start_shard``. Later shards and temporary files are removed.

    Returns:
        summary: {"dir", "shards", "count", "successes", "failures", "failed", "bytes",
        "seconds", "resumed_shards"}.
    """
    if max_count < 1 or max_bytes < 1:
        raise DataError(f"max_count={max_count} and max_bytes={max_bytes} must be positive")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_shards_from(out, start_shard)
    (out / "index.jsonl").unlink(missing_ok=True)

    entries: list[dict] = []
    all_stats: list[dict] = []
    for i in range(start_shard):
        tar = out / shard_name(i)
        entries += _entries_from_tar(tar)
        all_stats.append(json.loads((out / f"{i:05d}_stats.json").read_text()))
    seen = {e["key"] for e in entries}

    index = start_shard
    cur = _OpenShard()
    for item in samples:
        if isinstance(item, SampleFailure):
            cur.failed.append(item)
            continue
        check_key(item.key)
        if item.key in seen:
            # callers dedupe with a reason; reaching here is a caller bug
            raise DataError(f"duplicate sample key {item.key!r} ({item.source})")
        seen.add(item.key)
        cur.samples.append(item)
        cur.nbytes += item.nbytes
        if len(cur.samples) >= max_count or cur.nbytes >= max_bytes:
            stats, ents = _flush_shard(out, index, cur)
            all_stats.append(stats)
            entries += ents
            index += 1
            cur = _OpenShard()
    if cur.samples or cur.failed:
        if cur.samples:
            stats, ents = _flush_shard(out, index, cur)
            all_stats.append(stats)
            entries += ents
            index += 1
        else:
            # trailing failures with no sample to carry them: an empty tar would break DALI,
            # so they are attributed to the last shard's stats (or reported only in the summary)
            if all_stats:
                last = out / f"{index - 1:05d}_stats.json"
                st = all_stats[-1]
                st["count"] += len(cur.failed)
                for f in cur.failed:
                    st["failures"][f.reason] = st["failures"].get(f.reason, 0) + 1
                    st["failed"].append({"source": f.source, "reason": f.reason})
                st["failures"] = dict(sorted(st["failures"].items()))
                _write_atomic(last, json.dumps(st, indent=1).encode())
            else:
                all_stats.append(
                    {
                        "count": len(cur.failed),
                        "successes": 0,
                        "failures": _count_reasons(cur.failed),
                        "failed": [{"source": f.source, "reason": f.reason} for f in cur.failed],
                        "bytes": 0,
                        "seconds": 0.0,
                    }
                )
    _write_atomic(
        out / "index.jsonl",
        "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode(),
    )
    failures: dict[str, int] = {}
    failed: list[dict] = []
    for st in all_stats:
        for r, n in st["failures"].items():
            failures[r] = failures.get(r, 0) + n
        failed += st["failed"]
    return {
        "dir": str(out),
        "shards": [shard_name(i) for i in range(index)],
        "count": sum(st["count"] for st in all_stats),
        "successes": len(entries),
        "failures": dict(sorted(failures.items())),
        "failed": failed,
        "bytes": sum(st["bytes"] for st in all_stats),
        "seconds": round(time.perf_counter() - t0, 3),
        "resumed_shards": start_shard,
    }


def _count_reasons(failed: list[SampleFailure]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in failed:
        out[f.reason] = out.get(f.reason, 0) + 1
    return dict(sorted(out.items()))
