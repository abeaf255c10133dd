"""Loader throughput: DALI CPU vs PyAV (and DALI mixed on a GPU) on the same shards.

Clips of 8 frames at 224x224 (train mode: random segment offsets, random resized crop), in
batches of 8, from the same webdataset shards through megavid's two backends. Prints clips/s
per path and the ratio against PyAV measured in the same run.

    .venv/bin/python bench/loader_dali.py                       # makes its own shards in /tmp
    .venv/bin/python bench/loader_dali.py --workers 16 --videos 96 --seconds 60
    .venv/bin/python bench/loader_dali.py --shards DIR          # existing shards (one codec)

Without --shards it writes VP9 shards (DALI CPU and PyAV read them) and, when a CUDA GPU is
present, H.264 shards of the same clips (DALI mixed / NVDEC vs PyAV). Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def render(index: int, frames: int, width: int, height: int) -> np.ndarray:
    """A textured moving scene (gradients, bars, a drifting checkerboard): realistic enough
    that the encoders produce real inter frames, cheap to make."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        checker = ((((xx + 3 * t) // 16) + ((yy + t) // 16)) % 2) * 60
        img = np.stack([xx / width * 180 + checker, yy / height * 180,
                        (xx + yy + 5 * t + 29 * index) % 200], -1)
        x0 = (5 * t + 17 * index) % (width - 40)
        img[:, x0:x0 + 40] = (240, 200, 30)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_shards(out: Path, codec: str, n: int, distinct: int, frames: int, fps: int,
                width: int, height: int) -> Path:
    """``n`` samples whose videos cycle through ``distinct`` encodes (encoding is the slow
    part of making shards; decoding cost does not depend on which copy is read)."""
    from megavid.shards.synthetic import encode_clip
    from megavid.shards.writer import ShardSample, write_shards

    ext = "webm" if codec == "vp9" else "mp4"
    samples = []
    encoded = [encode_clip(render(i, frames, width, height), fps, codec)
               for i in range(min(n, distinct))]
    for i in range(n):
        video = encoded[i % len(encoded)]
        key = f"bench_{i:05d}"
        meta = {"key": key, "captions": [f"bench clip {i}"], "duration": frames / fps,
                "fps": float(fps), "num_frames": frames, "width": width, "height": height,
                "codec": codec, "source": key, "start": None, "end": None}
        samples.append(ShardSample(key=key, video=video, ext=ext, meta=meta, source=key))
    write_shards(samples, out, max_count=max(1, n // 4))
    return out


def measure(loader, seconds: float, batch: int) -> tuple[float, int]:
    """clips/s over whole epochs (at least one), after one warm-up batch."""
    it = iter(loader)
    next(it)  # warm-up: worker start, pipeline build, tokenizer
    clips, t0 = 0, time.perf_counter()
    while True:
        for b in it:
            clips += b["video"].shape[0]
            if b["video"].is_cuda:
                torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
        it = iter(loader)
    return clips / (time.perf_counter() - t0), clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="existing shard folder (default: make VP9/H.264 shards)")
    p.add_argument("--videos", type=int, default=256, help="samples in the shards")
    p.add_argument("--distinct", type=int, default=16, help="distinct encoded videos")
    p.add_argument("--frames", type=int, default=64, help="frames per source video")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--size", default="456x256", help="source WxH")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="PyAV worker processes = DALI threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=20.0, help="minimum time per path")
    p.add_argument("--out", help="also write the markdown table to this file "
                                 "(e.g. bench/results/loader_dali_h100.md)")
    args = p.parse_args(argv)

    from megavid.config import DataConfig
    from megavid.data.dali.backend import build_dali_loader
    from megavid.data.dali.devices import get_shard_codec
    from megavid.data.loader import build_pyav_loader

    width, height = (int(v) for v in args.size.split("x"))
    cuda = torch.cuda.is_available()
    tmp = tempfile.TemporaryDirectory(prefix="megavid-bench-")
    shard_sets: dict[str, Path] = {}
    if args.shards:
        shard_sets[get_shard_codec(args.shards)] = Path(args.shards)
    else:
        for codec in ["vp9"] + (["h264"] if cuda else []):
            t0 = time.perf_counter()
            shard_sets[codec] = make_shards(Path(tmp.name) / codec, codec, args.videos,
                                            args.distinct, args.frames, args.fps, width, height)
            print(f"made {args.videos} samples ({args.distinct} distinct) {codec} videos "
                  f"{width}x{height}, {args.frames} frames "
                  f"@ {args.fps} fps in {time.perf_counter() - t0:.1f} s", flush=True)

    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.cuda.get_device_name() if cuda else 'no GPU'}, load average "
              f"{os.getloadavg()[0]:.1f}; {args.batch} x {args.num_frames}x{args.img_size}^2 "
              f"clips, {args.workers} workers/threads")
    print("\n" + header)
    rows = []
    for codec, shards in shard_sets.items():
        cfg = DataConfig(root=str(shards.parent), train=str(shards), num_frames=args.num_frames,
                         img_size=args.img_size, batch_size=args.batch,
                         num_workers=args.workers, max_text_len=16)
        paths = [("PyAV", lambda: build_pyav_loader(cfg, "train", train=True))]
        if codec in ("vp8", "vp9", "mjpeg"):
            paths.append(("DALI cpu", lambda: build_dali_loader(cfg, "train", train=True,
                                                                device="cpu")))
        if cuda:
            paths.append(("DALI mixed", lambda: build_dali_loader(cfg, "train", train=True,
                                                                  device="mixed")))
        base = None
        for name, build in paths:
            rate, clips = measure(build(), args.seconds, args.batch)
            base = base or rate
            rows.append((codec, name, rate, rate / base, clips))
            print(f"  {codec:<5} {name:<11} {rate:8.1f} clips/s  ({rate / base:.2f}x PyAV, "
                  f"{clips} clips)", flush=True)
    table = [f"{header}", "", "| source | path | clips/s | vs PyAV |", "|---|---|---|---|"]
    table += [f"| {codec} {width}x{height} | {name} | {rate:.1f} | {ratio:.2f}x |"
              for codec, name, rate, ratio, _ in rows]
    print("\n" + "\n".join(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(table) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
