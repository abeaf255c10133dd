"""``megavid shard-stats DIR``: what a shard folder holds, read from the tars and stats files.

Totals (shards, samples, bytes, seconds of media, frames, captions), a duration histogram,
codec / resolution / frame-rate / container counts, and the failures of the run that made the
shards, by reason, from the ``NNNNN_stats.json`` files. Works for video shards and frames
shards (JPEG members, :mod:`megavid.shards.format`): the facts come from each sample's JSON,
read by seeking to the JSON member (the media is not read, so a large folder is quick).
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from megavid.parser import Parser, doc_summary
from megavid.errors import DataError
from megavid.shards.format import list_shards, read_index, scan_tar

# Upper edges (seconds) of the duration histogram bins; the last bin is open-ended.
DURATION_BINS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _bin_label(i: int, edges: tuple[float, ...]) -> str:
    lo = 0.0 if i == 0 else edges[i - 1]
    if i == len(edges):
        return f">={lo:g}s"
    return f"{lo:g}-{edges[i]:g}s"


def _media_seconds(meta: dict[str, Any]) -> float:
    """Seconds of media a sample stands for: its window when it has one, else its duration."""
    duration = float(meta.get("duration") or 0.0)
    start, end = meta.get("start"), meta.get("end")
    if start is not None or end is not None:
        s = float(start or 0.0)
        e = float(end) if end is not None else duration
        return max(0.0, e - s)
    return duration


def get_shard_stats(shard_dir: str | Path, *, bins: tuple[float, ...] = DURATION_BINS) -> dict[str, Any]:
    """Statistics of a shard folder written by make-shards / make-synthetic.

    Args:
        shard_dir: the folder (``NNNNN.tar`` + ``NNNNN_stats.json`` files).
        bins: upper edges in seconds of the duration histogram (sorted); a last bin holds
            everything longer.

    Returns:
        ``{"dir", "shards", "samples", "bytes", "media_bytes", "seconds", "frames",
        "captions", "duration": {"min", "max", "mean", "histogram": {bin: n}},
        "codecs", "resolutions", "fps", "formats", "containers": {value: n},
        "inputs", "failures": {reason: n}, "failed_sources": {reason: [sources]}}``; durations
        are the sample windows (``end - start``) where a sample has one.

    Raises:
        DataError: the folder does not exist or holds no shards.
    """
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise DataError(f"shard folder '{shard_dir}' does not exist; pass a folder written by make-shards")
    if list(bins) != sorted(bins):
        raise DataError(f"duration bins {bins} must be increasing")
    tars = list_shards(str(shard_dir))
    counts: dict[str, Counter] = {k: Counter() for k in ("codecs", "resolutions", "fps", "formats", "containers")}
    hist = [0] * (len(bins) + 1)
    durations: list[float] = []
    total_bytes = media_bytes = frames = captions = 0
    for tar in tars:
        total_bytes += tar.stat().st_size
        with open(tar, "rb") as f:
            for key, bundle in scan_tar(tar):
                members = {ext: (off, size) for ext, off, size, _ in bundle}
                media_bytes += sum(size for ext, (_, size) in members.items() if ext != "json")
                meta: dict[str, Any] = {}
                if "json" in members:
                    f.seek(members["json"][0])
                    try:
                        meta = json.loads(f.read(members["json"][1]))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        meta = {}
                seconds = _media_seconds(meta)
                durations.append(seconds)
                hist[bisect.bisect_right(bins, seconds)] += 1  # bins are [lo, hi)
                frames += int(meta.get("num_frames") or 0)
                caps = meta.get("captions")
                captions += len(caps) if isinstance(caps, list) else 0
                counts["codecs"][str(meta.get("codec", "unknown"))] += 1
                if meta.get("width") and meta.get("height"):
                    counts["resolutions"][f"{meta['width']}x{meta['height']}"] += 1
                if meta.get("fps"):
                    counts["fps"][f"{float(meta['fps']):g}"] += 1
                counts["formats"][str(meta.get("format", "video"))] += 1
                exts = sorted({e.rsplit(".", 1)[-1] for e in members if e != "json"})
                counts["containers"][",".join(exts) or "none"] += 1
    failures: Counter = Counter()
    failed: dict[str, list[str]] = {}
    inputs = 0
    for st_path in sorted(shard_dir.glob("[0-9][0-9][0-9][0-9][0-9]_stats.json")):
        try:
            st = json.loads(st_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{st_path} is not valid JSON ({e}); re-create the shards or run verify-shards") from e
        inputs += int(st.get("count", 0))
        failures.update(st.get("failures", {}))
        for item in st.get("failed", []):
            failed.setdefault(item.get("reason", "?"), []).append(item.get("source", "?"))
    n = len(durations)
    return {
        "dir": str(shard_dir),
        "shards": len(tars),
        "samples": n,
        "bytes": total_bytes,
        "media_bytes": media_bytes,
        "seconds": round(sum(durations), 3),
        "frames": frames,
        "captions": captions,
        "duration": {
            "min": round(min(durations), 3) if n else 0.0,
            "max": round(max(durations), 3) if n else 0.0,
            "mean": round(sum(durations) / n, 3) if n else 0.0,
            "histogram": {_bin_label(i, bins): c for i, c in enumerate(hist)},
        },
        **{k: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for k, c in counts.items()},
        "inputs": inputs,
        "failures": dict(sorted(failures.items())),
        "failed_sources": dict(sorted(failed.items())),
    }


def format_shard_stats(stats: dict[str, Any]) -> str:
    """The human-readable report of :func:`get_shard_stats`."""
    hours = stats["seconds"] / 3600
    lines = [
        f"{stats['dir']}: {stats['samples']} samples in {stats['shards']} shards, "
        f"{stats['bytes'] / 1e6:.1f} MB, {stats['seconds']:.1f} s ({hours:.2f} h) of media, "
        f"{stats['frames']} frames, {stats['captions']} captions",
        f"  inputs {stats['inputs']}, failed {sum(stats['failures'].values())}",
    ]
    for reason, n in stats["failures"].items():
        srcs = stats["failed_sources"].get(reason, [])
        more = f" (+{len(srcs) - 3} more)" if len(srcs) > 3 else ""
        lines.append(f"    {reason}: {n}  {', '.join(srcs[:3])}{more}")
    d = stats["duration"]
    lines.append(f"  duration min {d['min']:.2f}s mean {d['mean']:.2f}s max {d['max']:.2f}s")
    width = max((c for c in d["histogram"].values()), default=0)
    for label, c in d["histogram"].items():
        if c:
            bar = "#" * max(1, math.ceil(30 * c / width))
            lines.append(f"    {label:>12} {c:7d} {bar}")
    for k in ("formats", "containers", "codecs", "resolutions", "fps"):
        items = list(stats[k].items())
        more = f", ... ({len(items) - 8} more)" if len(items) > 8 else ""
        lines.append(f"  {k}: " + ", ".join(f"{v} {n}" for v, n in items[:8]) + more)
    return "\n".join(lines)


def get_bytes_per_clip_second(shard_dir: str | Path) -> float:
    """Payload bytes (video or JPEG members, not JSON) per second of clip window of a shard
    folder, from its ``index.jsonl``: the storage cost of a format."""
    total = secs = 0.0
    for e in read_index(Path(shard_dir)):
        total += sum(size for ext, (_, size) in e["members"].items() if ext not in ("json", "txt"))
        end = e["end"] if e.get("end") is not None else e["duration"]
        secs += end - (e.get("start") or 0.0)
    if secs <= 0:
        raise DataError(f"{shard_dir}: the samples have no duration; re-create the shards")
    return total / secs


def build_parser() -> Parser:
    """``megavid shard-stats``'s parser."""
    p = Parser(prog="megavid shard-stats", description=doc_summary(__doc__))
    p.add_argument("dirs", nargs="+", metavar="DIR", help="shard folder(s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """``megavid shard-stats DIR [DIR ...] [--json]``."""
    args = build_parser().parse_args(argv)
    for d in args.dirs:
        stats = get_shard_stats(d)
        print(json.dumps(stats, sort_keys=True) if args.json else format_shard_stats(stats))
    return 0
