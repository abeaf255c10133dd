"""``megavid make-shards``: videos + an annotation file -> validated webdataset shards.

Per video, in worker processes: probe and fully decode the source (PyAV), optionally
transcode (``--short-side``, ``--max-fps``, ``--codec keep|h264|vp9|mjpeg``), decode the
result again, then hand it to the shard writer. Anything unusable (missing, zero-length,
unreadable, truncated, random bytes, no caption, a caption that is not text, a duplicate
key, a bad time window, an annotation entry missing a field) is skipped and counted by reason
with its source path, or with the annotation entry and field at fault (``MSRVTT_data.json
sentences[17] (sen_id 17, video7): no 'caption'``), in the per-shard stats and in the final
summary.

Deterministic whatever ``--workers`` is: the sample order is the annotation order, results are
consumed in that order, and encoders run single-threaded with bitexact containers.

Frames shards (``--shard-format frames --fps F --short-side S --quality Q``): instead of a video
member, each sample stores the source frames on screen at F fps inside its window as JPEG members
``{key}.0000.jpg``... (layout: ``docs/data.md``, code:
:mod:`megavid.shards.ingest.frames`), made from the same single validation decode of the source.

Chunking (``--chunk-seconds N``): each video is cut into re-encoded chunks of at most N
seconds, one sample each (``<key>_cNNN``), with the windows inside re-based to the chunk
(:mod:`megavid.shards.ingest.chunking`).

Video paths: ``--path-template '{page_dir}/{videoid}.mp4'`` builds them from an entry's columns
(the formats that have them; ``--format webvid`` does it by default); ``--split-file`` selects
the MSR-VTT videos of a released split file (9k train, 1k-A test); ``--from-video2dataset DIR``
ingests existing video2dataset tars instead
(:mod:`megavid.shards.ingest.video2dataset`).

Resumable: shards are written under temporary names and renamed when complete; a re-run with
the same arguments keeps the complete shards, skips the inputs they consumed, and continues.
``--overwrite`` starts afresh.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from megavid.parser import Parser, doc_summary
from megavid.errors import DataError
from megavid.shards.format import VIDEO_EXTS
from megavid.shards.ingest.annotations import FORMATS, read_annotations
from megavid.shards.ingest.chunking import plan_chunks, process_chunk
from megavid.shards.ingest.frames import DEFAULT_QUALITY, FrameExtractor
from megavid.shards.ingest.options import (
    CODECS,
    REASON_BAD_WINDOW,
    REASON_DUPLICATE,
    REASON_TRANSCODE,
    SHARD_FORMATS,
    MakeShardsOptions,
    Task,
    make_key,
    sanitize_key,
)
from megavid.shards.ingest.probe import REASON_MISSING, VideoProbeError, probe_video
from megavid.shards.ingest.records import Record
from megavid.shards.ingest.transcode import _SOURCE_TO_CODEC, Transcoder
from megavid.shards.ingest.video2dataset import plan_video2dataset
from megavid.shards.writer import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COUNT,
    SampleFailure,
    ShardSample,
    complete_shards,
    write_shards,
)

MANIFEST = "make_shards.json"


# --------------------------------------------------------------------------------------------
# Per-video work (runs in worker processes)
# --------------------------------------------------------------------------------------------
def process_task(task: Task) -> ShardSample | SampleFailure:
    """Probe + validate (+ transcode) one video; never raises for a bad input."""
    try:
        if task.member is not None:
            return _process_member(task)
        return _process(task)
    except VideoProbeError as e:
        return SampleFailure(source=task.source, reason=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad video must not stop the run; counted
        return SampleFailure(source=task.source, reason=f"{REASON_TRANSCODE}:{type(e).__name__}")


def _process_member(task: Task) -> ShardSample | SampleFailure:
    """A video inside a tar (video2dataset ingest): its bytes go to a temporary file (PyAV and
    the keep path read files) that lives only while this one video is processed."""
    import dataclasses
    import tempfile

    off, size, ext = task.member  # type: ignore[misc]
    with open(task.path, "rb") as f:
        f.seek(off)
        data = f.read(size)
    with tempfile.TemporaryDirectory(prefix="megavid-ingest-") as d:
        path = Path(d) / f"{task.key}.{ext}"
        path.write_bytes(data)
        return _process(dataclasses.replace(task, path=str(path), member=None))


def _process_frames(task: Task) -> ShardSample | SampleFailure:
    """A frames sample: the source decoded once (validation) while the extractor keeps, resizes
    and JPEG-encodes the frames it needs."""
    extractor = FrameExtractor(fps=task.fps, short_side=task.short_side, quality=task.quality,
                               start=task.start, end=task.end)
    info = probe_video(task.path, decode=True, on_frame=extractor)
    if task.start is not None and task.start >= info.duration:
        return SampleFailure(source=task.source, reason=REASON_BAD_WINDOW)
    end = None if task.end is None else min(task.end, info.duration)
    try:
        members, facts = extractor.finish()
    except Exception as e:  # noqa: BLE001 - an encoder failure is this video's failure
        return SampleFailure(source=task.source, reason=f"{REASON_TRANSCODE}:{type(e).__name__}")
    # duration/start/end are the source's: the sampled timestamps equal the video path's
    meta: dict[str, Any] = {"key": task.key, "captions": task.captions, "duration": info.duration,
                            "source": task.source, "start": task.start, "end": end, **facts}
    meta.update(task.extra)
    meta["original"] = {k: getattr(info, k)
                        for k in ("width", "height", "fps", "codec", "num_frames")}
    return ShardSample(key=task.key, video=b"", ext="", meta=meta, source=task.source,
                       members=members)


def _process(task: Task) -> ShardSample | SampleFailure:
    if task.shard_format == "frames":
        return _process_frames(task)
    if task.chunk_index >= 0:
        return process_chunk(task)
    path = Path(task.path)
    ext = path.suffix.lstrip(".").lower()
    codec = task.codec
    if codec == "keep":
        head = probe_video(path, decode=False)
        needs_resize = task.short_side and min(head.width, head.height) > task.short_side
        needs_fps = task.max_fps and head.fps > task.max_fps
        if needs_resize or needs_fps or task.gop > 0 or ext not in VIDEO_EXTS:
            codec = _SOURCE_TO_CODEC.get(head.codec, "h264")
    transcoder = (Transcoder(codec, short_side=task.short_side, max_fps=task.max_fps,
                             gop=task.gop) if codec != "keep" else None)
    # one full decode of the source: the validation, and (when transcoding) the encoder's input
    src_info = probe_video(path, decode=True, on_frame=transcoder)
    start, end = task.start, task.end
    if start is not None and start >= src_info.duration:
        return SampleFailure(source=task.source, reason=REASON_BAD_WINDOW)
    if end is not None:
        end = min(end, src_info.duration)
    if transcoder is None:
        video = path.read_bytes()
        info = src_info
    else:
        try:
            video, ext = transcoder.finish(), transcoder.ext
        except Exception as e:  # noqa: BLE001 - an encoder failure is this video's failure
            return SampleFailure(source=task.source, reason=f"{REASON_TRANSCODE}:{type(e).__name__}")
        # validate what goes into the shard, not only the source
        info = probe_video(video, decode=True)
    meta: dict[str, Any] = {
        "key": task.key,
        "captions": task.captions,
        "duration": info.duration,
        "fps": info.fps,
        "num_frames": info.num_frames,
        "width": info.width,
        "height": info.height,
        "codec": info.codec,
        "source": task.source,
        "start": start,
        "end": end,
    }
    meta.update(task.extra)
    if codec != "keep":
        meta["original"] = {k: getattr(src_info, k) for k in ("width", "height", "fps", "codec", "num_frames")}
    if task.gop > 0 and codec != "mjpeg":
        meta["gop"] = task.gop  # keyframe interval (frames), for `megavid info` and loaders
    return ShardSample(key=task.key, video=video, ext=ext, meta=meta, source=task.source)


class _VideoFinder:
    """Resolves annotation video names to files: exact relative path, else ``<id>.<ext>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_stem: dict[str, Path] | None = None

    def find(self, name: str) -> Path | None:
        p = Path(name)
        cand = p if p.is_absolute() else self.root / p
        if cand.is_file():
            return cand
        for ext in VIDEO_EXTS:
            c = cand.with_name(cand.name + "." + ext)
            if c.is_file():
                return c
        if self._by_stem is None:
            self._by_stem = {}
            for f in sorted(self.root.rglob("*")):
                if f.is_file() and f.suffix.lstrip(".").lower() in VIDEO_EXTS:
                    self._by_stem.setdefault(f.stem, f)
        return self._by_stem.get(p.stem if p.suffix.lstrip(".").lower() in VIDEO_EXTS else p.name)


def plan(records: list[Record], opts: MakeShardsOptions) -> list[Task | SampleFailure]:
    """Turn annotation records into tasks (or early failures), in a deterministic order."""
    finder = _VideoFinder(Path(opts.videos))
    seen: set[str] = set()
    out: list[Task | SampleFailure] = []
    groups: dict[Path, tuple[str, list[Record], list[Record]]] = {}
    for r in records:
        source = str(Path(opts.videos) / r.video)
        if r.error:  # reported by the entry and field at fault when the reader names them
            out.append(SampleFailure(source=r.detail or source, reason=r.error))
            continue
        key = sanitize_key(r.key) if r.key else make_key(r.video, r.start, r.end)
        if key in seen:
            out.append(SampleFailure(source=source, reason=REASON_DUPLICATE))
            continue
        seen.add(key)
        path = finder.find(r.video)
        if path is None:
            out.append(SampleFailure(source=source, reason=REASON_MISSING))
            continue
        if opts.chunk_seconds > 0:
            # chunking: all records of a video become the windows/captions of its chunks
            groups.setdefault(path, (make_key(r.video), [], []))[1 if r.start is None and r.end is None else 2].append(r)
            continue
        out.append(Task(
            key=key, path=str(path), source=str(path), captions=list(r.captions),
            start=r.start, end=r.end, extra=dict(r.extra), codec=opts.codec,
            short_side=opts.short_side, max_fps=opts.max_fps, shard_format=opts.shard_format,
            fps=opts.fps, quality=opts.quality, gop=opts.gop,
        ))
    for path, (key, whole, windowed) in groups.items():
        for t in plan_chunks(path, key, whole, windowed, opts):
            if isinstance(t, Task) and t.key in seen:
                out.append(SampleFailure(source=t.source, reason=REASON_DUPLICATE))
                continue
            seen.add(getattr(t, "key", ""))
            out.append(t)
    return out


def _run(items: list[Task | SampleFailure], workers: int) -> Iterator[ShardSample | SampleFailure]:
    """Results in input order; videos processed by ``workers`` processes."""
    tasks = [it for it in items if isinstance(it, Task)]
    if workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("spawn")  # never fork a process that may hold threads
        with ctx.Pool(workers) as pool:
            results = pool.imap(process_task, tasks, chunksize=1)
            for it in items:
                yield next(results) if isinstance(it, Task) else it
    else:
        for it in items:
            yield process_task(it) if isinstance(it, Task) else it


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def _manifest_options(opts: MakeShardsOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("workers")  # the output does not depend on it
    d.pop("out")
    if opts.shard_format == "video":
        # video shards do not depend on the frames options (and older manifests lack them)
        for k in ("shard_format", "fps", "quality"):
            d.pop(k)
    for k, default in (("path_template", None), ("chunk_seconds", 0.0), ("gop", 0),
                       ("from_video2dataset", ""), ("split_file", None)):
        if d[k] == default:
            d.pop(k)  # manifests written before these options existed stay resumable
    return d


def make_shards(opts: MakeShardsOptions, *, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Make shards from ``opts.videos`` + ``opts.annotations`` into ``opts.out``.

    Args:
        opts: the run's options.
        overwrite: delete existing shards in ``opts.out`` first; otherwise a previous run
            with the same options is resumed (complete shards kept), and one with different
            options is an error.
        quiet: do not print the summary.

    Returns:
        The summary of :func:`megavid.shards.writer.write_shards` plus "skipped_inputs" and
        "videos_per_s".

    Raises:
        DataError: missing video folder, unreadable annotations, or an output folder made
            with other options (without ``overwrite``).
    """
    t0 = time.perf_counter()
    videos = Path(opts.videos)
    if not opts.from_video2dataset and not videos.is_dir():
        raise DataError(f"video folder '{videos}' does not exist; pass --videos DIR")
    if opts.codec not in CODECS:
        raise DataError(f"--codec {opts.codec!r} is not one of {', '.join(CODECS)}")
    if opts.shard_format not in SHARD_FORMATS:
        raise DataError(f"--shard-format {opts.shard_format!r} is not one of "
                        f"{', '.join(SHARD_FORMATS)}")
    if opts.shard_format == "frames" and (opts.fps < 0 or not 1 <= opts.quality <= 100):
        raise DataError(f"--fps {opts.fps} must be >= 0 and --quality {opts.quality} in 1..100")
    if opts.shard_format == "frames" and (opts.codec != "keep" or opts.max_fps):
        raise DataError("--codec/--max-fps apply to video shards; frames shards take --fps, "
                        "--short-side and --quality")
    if opts.gop < 0 or (opts.gop and opts.shard_format == "frames"):
        raise DataError(f"--gop {opts.gop} must be >= 0 and applies to video shards (every "
                        "stored frame of a frames shard is a JPEG already)")
    if opts.chunk_seconds < 0 or (opts.chunk_seconds and opts.shard_format == "frames"):
        raise DataError(f"--chunk-seconds {opts.chunk_seconds} must be > 0 and applies to video "
                        "shards (frames shards store windows without cutting)")
    v2d_stats: dict[str, Any] | None = None
    if opts.from_video2dataset:
        if opts.chunk_seconds:
            raise DataError("--chunk-seconds does not apply to --from-video2dataset (its clips are "
                            "already cut); drop one of them")
        items, v2d_stats = plan_video2dataset(opts.from_video2dataset, opts)
    else:
        records = read_annotations(
            opts.annotations, opts.format, video_col=opts.video_col, caption_col=opts.caption_col,
            key_col=opts.key_col, start_col=opts.start_col, end_col=opts.end_col, split=opts.split,
            split_file=opts.split_file, path_template=opts.path_template,
        )
        if not records:
            raise DataError(f"annotation file '{opts.annotations}' lists no samples")
        items = plan(records, opts)

    out = Path(opts.out)
    manifest_path = out / MANIFEST
    wanted = _manifest_options(opts)
    start_shard = skip = 0
    if out.exists() and overwrite:
        for p in out.iterdir():
            if re.match(r"^(\d{5}(\.tar|\.idx|_stats\.json)|index\.jsonl|make_shards\.json|\..*\.tmp)$", p.name):
                p.unlink()
    elif manifest_path.is_file():
        have = json.loads(manifest_path.read_text()).get("options")
        if have != wanted:
            raise DataError(
                f"'{out}' holds shards made with other options ({manifest_path}); pass "
                "--overwrite to replace them or choose another --out"
            )
        start_shard, skip = complete_shards(out)
    elif out.exists() and any(out.glob("*.tar")):
        raise DataError(f"'{out}' already holds .tar files not made by make-shards; use --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"options": wanted}, indent=1))
    if skip > len(items):
        raise DataError(f"'{out}' holds more samples than the annotations list; use --overwrite")

    n_tasks = sum(isinstance(it, Task) for it in items[skip:])
    summary = write_shards(
        _run(items[skip:], max(1, opts.workers)), out, max_count=opts.max_count,
        max_bytes=opts.max_bytes, start_shard=start_shard,
    )
    seconds = time.perf_counter() - t0
    summary["skipped_inputs"] = skip
    summary["processed_videos"] = n_tasks
    summary["seconds"] = round(seconds, 3)
    summary["videos_per_s"] = round(n_tasks / seconds, 3) if seconds > 0 else 0.0
    if v2d_stats is not None:
        summary["video2dataset"] = v2d_stats
    manifest_path.write_text(json.dumps({"options": wanted, "summary": summary}, indent=1))
    if not quiet:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary: counts, failures by reason with their sources."""
    lines = [
        f"make-shards: {summary['successes']} samples in {len(summary['shards'])} shards "
        f"({summary['bytes'] / 1e6:.1f} MB) -> {summary['dir']}",
        f"  inputs {summary['count']}, written {summary['successes']}, failed "
        f"{sum(summary['failures'].values())}; {summary['processed_videos']} videos processed in "
        f"{summary['seconds']:.1f}s ({summary['videos_per_s']:.2f} videos/s)"
        + (f"; resumed after {summary['resumed_shards']} complete shards" if summary["resumed_shards"] else ""),
    ]
    for reason, n in summary["failures"].items():
        srcs = [f["source"] for f in summary["failed"] if f["reason"] == reason]
        more = f" (+{len(srcs) - 5} more)" if len(srcs) > 5 else ""
        lines.append(f"  failed {reason}: {n}: {', '.join(srcs[:5])}{more}")
    if "video2dataset" in summary:
        v = summary["video2dataset"]
        lines.append(f"  video2dataset stats ({v['shards']} files): {v['count']} urls, {v['successes']} "
                     f"downloaded, {v['failed_to_download']} failed to download, "
                     f"{v['failed_to_subsample']} failed to subsample")
    return "\n".join(lines)


def build_parser() -> Parser:
    """``megavid make-shards``'s parser."""
    p = Parser(prog="megavid make-shards", description=doc_summary(__doc__),
               epilog="Annotation formats, the shard layout and frames shards: docs/data.md.")
    p.add_argument("--videos", help="folder holding the videos")
    p.add_argument("--annotations", help="annotation file")
    p.add_argument("--from-video2dataset", metavar="DIR", help="ingest video2dataset output tars "
                   "(instead of --videos/--annotations): validate, index and re-shard them")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS + ("frames",),
                   help="annotation format; 'frames' is short for --shard-format frames "
                   "(annotation format auto-detected)")
    p.add_argument("--video-col", help="CSV/TSV column of the video path or id")
    p.add_argument("--caption-col", help="CSV/TSV column of the caption")
    p.add_argument("--key-col", help="CSV/TSV column of the sample key")
    p.add_argument("--start-col", help="CSV/TSV column of the window start (seconds)")
    p.add_argument("--end-col", help="CSV/TSV column of the window end (seconds)")
    p.add_argument("--split", help="MSR-VTT: only this split (train/validate/test); QuerYD: the "
                   "ids of <split>_list.txt beside the captions")
    p.add_argument("--split-file", help="MSR-VTT: only the videos of this released split file: "
                   "MSRVTT_train.9k.csv (sentences from --annotations MSRVTT_data.json) or "
                   "MSRVTT_JSFUSION_test.csv (the 1k-A test, its own sentence per video)")
    p.add_argument("--path-template", help="video path from an entry's columns, e.g. "
                   "'{page_dir}/{videoid}.mp4' (formats with per-row columns; refused for others)")
    p.add_argument("--chunk-seconds", type=float, default=0.0, help="cut videos into re-encoded "
                   "chunks of at most this many seconds, one sample each (0: off)")
    p.add_argument("--codec", default="keep", choices=CODECS, help="re-encode to this codec")
    p.add_argument("--short-side", type=int, default=0, help="downscale to this short side")
    p.add_argument("--shard-format", default="video", choices=SHARD_FORMATS,
                   help="video members, or JPEG frames for DALI's JPEG decoder (docs/data.md)")
    p.add_argument("--fps", type=float, default=8.0, help="frames shards: stored frames/s "
                   "(0: every source frame)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help="frames shards: JPEG quality 1..100")
    p.add_argument("--max-fps", type=float, default=0.0, help="drop frames above this rate")
    p.add_argument("--gop", type=int, default=0, help="video shards: re-encode with a keyframe "
                   "every N frames, so a clip decodes only the GOPs it samples (0: encoder "
                   "default)")
    p.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="samples per shard")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="bytes per shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """``megavid make-shards`` / ``tools/make_shards.py``. Returns 0, or 1 if no sample was
    written. DataError propagates (the CLI prints it as one line and exits 2)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    one_input = (not (args.videos or args.annotations) if args.from_video2dataset
                 else bool(args.videos and args.annotations))
    if not one_input:
        raise DataError("pass --videos DIR and --annotations FILE, or --from-video2dataset DIR "
                        "(one input, not both)")
    if args.format == "frames":  # `--format frames` (the spelling) = --shard-format
        args.format, args.shard_format = "auto", "frames"
    opts = MakeShardsOptions(
        videos=args.videos or "", annotations=args.annotations or "", out=args.out, format=args.format,
        video_col=args.video_col, caption_col=args.caption_col, key_col=args.key_col,
        start_col=args.start_col, end_col=args.end_col, split=args.split,
        split_file=args.split_file, codec=args.codec,
        short_side=args.short_side, max_fps=args.max_fps, max_count=args.max_count,
        max_bytes=args.max_bytes, workers=args.workers, shard_format=args.shard_format,
        fps=args.fps, quality=args.quality, path_template=args.path_template,
        chunk_seconds=args.chunk_seconds, from_video2dataset=args.from_video2dataset or "", gop=args.gop,
    )
    summary = make_shards(opts, overwrite=args.overwrite, quiet=args.quiet)
    return 0 if summary["successes"] else 1


def run_tool(argv: list[str] | None = None) -> int:
    """Entry for tools/make_shards.py: like :func:`main`, DataError printed as one line."""
    try:
        return main(argv)
    except DataError as e:
        print(f"make-shards: error: {e}", file=sys.stderr)
        return 2
