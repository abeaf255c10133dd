"""Webdataset shards: deterministic writer, DALI index files, stats, sample index, verifier.

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
under a final name. ``count`` in the stats is the number of inputs the shard consumed
(``successes`` written + failures attributed to it), which is what resuming needs.
"""

from __future__ import annotations

import argparse
import glob as globlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from megavid.errors import DataError

VIDEO_EXTS = ("webm", "mp4", "mkv", "avi", "mov")
IDX_VERSION = "v1.2"
DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 1 << 30
_SHARD_RE = re.compile(r"^(\d{5})\.tar$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_KEY_LEN = 90  # ustar names are at most 100 bytes: key + "." + extension must fit


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
    """Frames shards (:mod:`megavid.data.frames`): the payload members ``{ext: bytes}``
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


def format_idx(bundles: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI webdataset index text: ``v1.2 <n>`` then one line per sample of
    ``ext offset size name`` groups (the format of nvidia-dali's ``wds2idx``)."""
    lines = [f"{IDX_VERSION} {len(bundles)}"]
    for bundle in bundles:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in bundle))
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
def _verify_sample(tar_name: str, key: str, sample: dict, problems: list[str], decode: bool) -> None:
    from megavid.data.probe import VideoProbeError, probe_video

    where = f"{tar_name}:{key}"
    if "json" not in sample:
        problems.append(f"{where}: no .json member")
        return
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{where}.json: not valid JSON ({e})")
        return
    if not isinstance(meta, dict):
        problems.append(f"{where}.json: not a JSON object")
        return
    if meta.get("key") != key:
        problems.append(f"{where}.json: key {meta.get('key')!r} differs from the member name")
    caps = meta.get("captions")
    if not (isinstance(caps, list) and caps and all(isinstance(c, str) and c.strip() for c in caps)):
        problems.append(f"{where}.json: 'captions' must be a non-empty list of strings")
    from megavid.data.frames import is_frame_ext, verify_frames_sample

    if any(is_frame_ext(e) for e in sample):
        verify_frames_sample(where, meta, sample, problems, decode)
        return
    vexts = [e for e in sample if e in VIDEO_EXTS]
    if len(vexts) != 1:
        problems.append(f"{where}: expected one video member, found {vexts or 'none'}")
        return
    if not decode:
        return
    try:
        info = probe_video(sample[vexts[0]], decode=True)
    except VideoProbeError as e:
        problems.append(f"{where}.{vexts[0]}: video does not decode ({e})")
        return
    if "num_frames" in meta and meta["num_frames"] != info.num_frames:
        problems.append(
            f"{where}: json says num_frames={meta['num_frames']}, PyAV decoded {info.num_frames}"
        )


def verify_shards(shard_dir: str | Path, *, decode: bool = True) -> list[str]:
    """Check a shard folder; returns the problems found (empty: all good).

    Checks: every tar is readable by ``webdataset.WebDataset``; each sample has a JSON that
    parses (with its key and captions) and one video that PyAV decodes completely (frame count
    equal to the JSON's ``num_frames``), or, in frames shards, JPEG members ``0000.jpg``...
    numbered without gaps, one per entry of the JSON's ``frame_times``, that all decode to the
    JSON's width x height; each ``.idx`` equals the DALI index of its tar; each
    stats file matches its tar (successes, bytes); ``index.jsonl`` lists exactly the samples of
    the tars with the right member offsets.

    Args:
        shard_dir: the folder written by :func:`write_shards`.
        decode: decode every video (the slow part).
    """
    import webdataset as wds

    shard_dir = Path(shard_dir)
    tars = list_shards(str(shard_dir))
    problems: list[str] = []
    tar_entries: dict[tuple[str, str], dict[str, list[int]]] = {}
    for tar in tars:
        name = tar.name
        try:
            scanned = scan_tar(tar)
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: not a readable tar ({e})")
            continue
        for key, bundle in scanned:
            tar_entries[(name, key)] = {ext: [off, size] for ext, off, size, _ in bundle}
        # the DALI index
        idx = tar.with_suffix(".idx")
        expected = format_idx([b for _, b in scanned]) if scanned else None
        if not idx.is_file():
            problems.append(f"{name}: missing DALI index {idx.name}")
        elif expected is not None and idx.read_text() != expected:
            problems.append(f"{name}: {idx.name} does not match the tar (re-run wds2idx or re-shard)")
        # stats
        stats_path = tar.with_name(f"{tar.stem}_stats.json")
        if not stats_path.is_file():
            problems.append(f"{name}: missing {stats_path.name}")
        else:
            try:
                st = json.loads(stats_path.read_text())
                if st.get("successes") != len(scanned):
                    problems.append(
                        f"{name}: stats say {st.get('successes')} samples, the tar holds {len(scanned)}"
                    )
                if st.get("bytes") != tar.stat().st_size:
                    problems.append(f"{name}: stats say {st.get('bytes')} bytes, the tar has {tar.stat().st_size}")
            except json.JSONDecodeError as e:
                problems.append(f"{stats_path.name}: not valid JSON ({e})")
        # read through webdataset (the reader loaders use), then check each sample
        seen = []
        try:
            ds = wds.WebDataset(str(tar), shardshuffle=False, handler=wds.reraise_exception, empty_check=False)
            for sample in ds:
                key = sample["__key__"]
                seen.append(key)
                _verify_sample(name, key, {k: v for k, v in sample.items() if not k.startswith("__")}, problems, decode)
        except Exception as e:  # noqa: BLE001 - any reader failure is a problem to report
            problems.append(f"{name}: webdataset cannot read it ({type(e).__name__}: {e})")
        if [k for k, _ in scanned] != seen and not any(p.startswith(f"{name}: webdataset") for p in problems):
            problems.append(f"{name}: webdataset saw {len(seen)} samples, tar headers list {len(scanned)}")
        if [k for k, _ in scanned] != sorted(k for k, _ in scanned):
            problems.append(f"{name}: members are not sorted by key")
    # the global index
    try:
        entries = read_index(shard_dir)
    except DataError as e:
        problems.append(str(e))
        return problems
    listed = set()
    for e in entries:
        k = (e.get("shard"), e.get("key"))
        if k in listed:
            problems.append(f"index.jsonl: {k[1]} listed twice")
        listed.add(k)
        if k not in tar_entries:
            problems.append(f"index.jsonl: {k[1]} in {k[0]} is not in any tar")
        elif tar_entries[k] != e.get("members"):
            problems.append(f"index.jsonl: {k[1]} member offsets {e.get('members')} != tar {tar_entries[k]}")
    for k in tar_entries:
        if k not in listed:
            problems.append(f"index.jsonl: {k[0]}:{k[1]} is missing")
    return problems


def verify_main(argv: list[str] | None = None) -> int:
    """``megavid verify-shards DIR [DIR ...]``: print problems; exit 1 if any."""
    p = argparse.ArgumentParser(prog="megavid verify-shards", description=verify_shards.__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="shard folder(s)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding the videos")
    args = p.parse_args(argv)
    bad = 0
    for d in args.dirs:
        if not Path(d).is_dir():
            raise DataError(f"shard folder '{d}' does not exist; pass a folder written by make-shards")
        problems = verify_shards(d, decode=not args.no_decode)
        n = len(read_index(d)) if (Path(d) / "index.jsonl").is_file() else 0
        if problems:
            bad += 1
            print(f"{d}: {len(problems)} problem(s)")
            for prob in problems:
                print(f"  {prob}")
        else:
            print(f"{d}: OK ({len(list_shards(d))} shards, {n} samples)")
    return 1 if bad else 0


def iter_tar_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of a shard, read with tarfile (no webdataset)."""
    with open(tar_path, "rb") as f:
        for key, bundle in scan_tar(tar_path):
            out = {}
            for ext, off, size, _ in bundle:
                f.seek(off)
                out[ext] = f.read(size)
            yield key, out
