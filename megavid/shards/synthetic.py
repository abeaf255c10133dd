"""The deterministic "moving shapes" video-text dataset (``megavid make-synthetic``).

Each clip shows one coloured shape on a plain grey background, moving left, right, up or
down, slowly or fast, for ``frames`` frames of ``size`` x ``size``. The shape wraps around the
frame edges (a torus), and the start position is uniform, so the position of the shape in
any single frame has the same distribution for every direction: only motion tells the
direction apart. Captions are paraphrases built from the attributes; QA pairs ask the colour,
the shape and the direction.

Clips come in groups of 4 consecutive indices that share colour, shape, speed (and size,
background, start position) and differ only in direction. In the test split this gives the
"temporal check" (retrieval among clips that differ only in motion) and every test clip's
first caption is distinct; in the train split, ``data.shuffle_block=4`` keeps a group together
in the shuffled order so that every batch holds direction-only hard negatives (without them a
contrastive loss is satisfied by colour and shape alone and never has to look at motion).

Everything derives from ``(seed, split, clip index)``: the same config gives byte-identical
videos (encoders run single-threaded, container written bitexact) whatever the number of
worker processes.

Layout under ``data.root``::

    raw/<split>/<key>.webm|mp4   the videos
    raw/<split>.jsonl            one sample JSON per line
    shards/<split>/              shards (megavid.shards.format)
    manifest.json                the SyntheticConfig that made it (re-runs skip when equal)
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from megavid.errors import ConfigError, DataError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 225, 40),
    "purple": (140, 40, 190),
    "orange": (245, 140, 20),
    "cyan": (40, 220, 225),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
SPLITS = ("train", "val", "test")
# pixels per frame at size 64 (scaled with the size); both keep the shape on screen for a
# large part of the clip and "fast" is clearly faster than "slow"
_SPEED_PX = {"slow": 1.0, "fast": 3.0}
# (dy, dx) unit step of each direction in image coordinates (y grows downwards)
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_DIR_PHRASE = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
_SPEED_ADV = {"slow": "slowly", "fast": "quickly"}
_SPEED_VERB = {"slow": "drifts", "fast": "races"}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}
_CODEC = {
    # name: (encoder, container format, extension, encoder options)
    "vp9": (
        "libvpx-vp9",
        "webm",
        "webm",
        # realtime + cpu-used 8: ~5 ms per 16-frame 64x64 clip. Constant quality with a low
        # qmax: at 32-64 px the default quantizers blur the shape edges by a pixel or more.
        {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "row-mt": "0",
         "crf": "8", "qmin": "0", "qmax": "12", "b": "0", "g": "240"},
    ),
    # mbtree=0: with macroblock-tree rate control libx264 gave different bytes for the same
    # input across runs (3 variants in 150 encodes of one 32x32 clip, even with explicit pts
    # and threads=1); without it 60 x 12 encodes were identical
    "h264": ("libx264", "mp4", "mp4", {"preset": "veryfast", "crf": "18", "g": "240",
                                       "x264-params": "mbtree=0"}),
}
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------------------------
# Attributes, captions, QA
# --------------------------------------------------------------------------------------------
def make_captions(colour: str, shape: str, direction: str, speed: str) -> list[str]:
    """Paraphrases describing one clip; the first is the canonical caption."""
    d, adv = _DIR_PHRASE[direction], _SPEED_ADV[speed]
    return [
        f"a {colour} {shape} moving {direction} {adv}",
        f"a {speed} {colour} {shape} moves {d}",
        f"the {colour} {shape} {_SPEED_VERB[speed]} {d}",
        f"a {shape} in {colour} travels {d} {adv}",
        f"{colour} {shape} going {direction} at a {speed} pace",
    ]


def make_qa(colour: str, shape: str, direction: str) -> list[dict[str, Any]]:
    """Question-answer pairs; ``choices`` are all values of the asked attribute."""
    return [
        {"question": f"what colour is the {shape}?", "answer": colour, "type": "colour",
         "choices": list(COLOURS)},
        {"question": f"what shape is the {colour} object?", "answer": shape, "type": "shape",
         "choices": list(SHAPES)},
        {"question": f"which direction is the {colour} {shape} moving?", "answer": direction,
         "type": "direction", "choices": list(DIRECTIONS)},
    ]


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_ID[split], index])


def clip_params(cfg_seed: int, split: str, index: int, num_test: int = 0) -> dict[str, Any]:
    """The random parameters of clip ``index`` of ``split`` (pure function of its arguments).

    Every split: index = 4 * group + member; the 4 members of a group share everything drawn
    from the group's RNG (size, background, start position, and outside the test split colour,
    shape and speed) and differ only in direction. Test groups take a distinct
    (colour, shape, speed) from a seeded permutation, in direction order; train/val groups
    draw them at random, and the directions in a seeded order (so a clip's position in its
    group says nothing about its direction).
    """
    colours = list(COLOURS)
    group, d = divmod(index, 4)
    rng = _clip_rng(cfg_seed, split, group)
    if split == "test":
        combos = [(c, s, v) for c in colours for s in SHAPES for v in SPEEDS]
        order = np.random.default_rng([cfg_seed, _SPLIT_ID[split], 1 << 20]).permutation(len(combos))
        colour, shape, speed = combos[int(order[group])]
        direction = DIRECTIONS[d]
    else:
        colour = colours[int(rng.integers(len(colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        speed = SPEEDS[int(rng.integers(len(SPEEDS)))]
        direction = DIRECTIONS[int(rng.permutation(len(DIRECTIONS))[d])]
    return {
        "colour": colour,
        "shape": shape,
        "direction": direction,
        "speed": speed,
        "radius_frac": float(rng.uniform(0.12, 0.2)),
        "background": int(rng.integers(40, 110)),
        "y0": float(rng.uniform(0, 1)),
        "x0": float(rng.uniform(0, 1)),
    }


def _shape_mask(shape: str, size: int, radius: float) -> np.ndarray:
    """Boolean [size, size] mask of the shape centred in the frame."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - c, xx - c
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= radius * 1.15
    if shape == "cross":
        arm = radius * 0.35
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    if shape == "triangle":
        # apex up; base at +radius*0.8, apex at -radius
        top, bottom = -radius, radius * 0.8
        t = (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= t * radius)
    raise ValueError(f"unknown shape {shape}")


def render_clip(params: dict[str, Any], frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3] RGB frames of one clip."""
    radius = params["radius_frac"] * size
    mask = _shape_mask(params["shape"], size, radius)
    base = np.full((size, size, 3), params["background"], np.uint8)
    base[mask] = COLOURS[params["colour"]]
    step = _SPEED_PX[params["speed"]] * size / 64.0
    sy, sx = _STEP[params["direction"]]
    # offset of the shape centre from the frame centre at frame 0
    y0 = params["y0"] * size - size / 2.0
    x0 = params["x0"] * size - size / 2.0
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        # integer shifts with wrap-around: the shape leaving one edge re-enters at the other
        # floor(x + 0.5), not round(): banker's rounding would make equal steps uneven
        dy = int(np.floor(y0 + sy * step * t + 0.5)) % size
        dx = int(np.floor(x0 + sx * step * t + 0.5)) % size
        out[t] = np.roll(base, (dy, dx), axis=(0, 1))
    return out


_RGB2YUV = np.array(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]],
    dtype=np.float32,
).T / 255.0


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar yuv420p, in numpy.

    Args:
        rgb: uint8 [..., H, W, 3] (one frame or a clip).

    Returns:
        uint8 [..., H * 3 / 2, W]: the Y plane, then U and V (each H/2 x W/2, flattened into
        H/4 rows of W), the layout of PyAV's ``VideoFrame.from_ndarray(..., "yuv420p")``.

    Done here rather than by swscale inside the encoder call so that the conversion is
    bit-identical on every run and machine (the files must be).
    """
    h, w = rgb.shape[-3:-1]
    lead = rgb.shape[:-3]
    x = rgb.astype(np.float32)
    # explicit sums, not a matmul or a multi-axis mean: both are 10x slower at these sizes
    y, u, v = (x[..., 0] * m[0] + x[..., 1] * m[1] + x[..., 2] * m[2] + off
               for m, off in zip(_RGB2YUV.T, (16.0, 128.0, 128.0)))

    def sub(c: np.ndarray) -> np.ndarray:  # 2x2 mean (chroma siting is moot at this rounding)
        return ((c[..., 0::2, 0::2] + c[..., 1::2, 0::2] + c[..., 0::2, 1::2] + c[..., 1::2, 1::2])
                * 0.25).reshape(*lead, h // 4, w)

    planes = [y, sub(u), sub(v)]
    return np.clip(np.floor(np.concatenate(planes, axis=-2) + 0.5), 0, 255).astype(np.uint8)


def encode_clip(frames_u8: np.ndarray, fps: int, codec: str) -> bytes:
    """Encode RGB frames with PyAV; single-threaded and bitexact so bytes are reproducible.

    Args:
        frames_u8: uint8 [T, H, W, 3] RGB frames (H and W even).
        fps: frame rate.
        codec: 'vp9' (.webm) or 'h264' (.mp4).
    """
    import av

    encoder, fmt, _, opts = _CODEC[codec]
    buf = io.BytesIO()
    # bitexact: no random segment/track UIDs or version strings that vary between runs
    with av.open(buf, "w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps, options=dict(opts))
        stream.width = frames_u8.shape[2]
        stream.height = frames_u8.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for t, f in enumerate(rgb_to_yuv420p(frames_u8)):
            frame = av.VideoFrame.from_ndarray(f, format="yuv420p")
            # explicit timestamps, independent of PyAV's defaults
            frame.pts = t
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _make_one(job: tuple[int, str, int, int, int, int, str]) -> tuple[str, bytes, dict]:
    """Worker: render and encode one clip; returns (key, video bytes, sample JSON)."""
    seed, split, index, frames, size, fps, codec = job
    params = clip_params(seed, split, index)
    video = encode_clip(render_clip(params, frames, size), fps, codec)
    # validate like make-shards does: a video reaches a shard only after a full decode
    from megavid.shards.ingest.probe import probe_video

    info = probe_video(video, decode=True)
    if info.num_frames != frames:  # pragma: no cover - an encoder bug, not a user mistake
        raise RuntimeError(f"{split} clip {index}: encoded {frames} frames, decoded {info.num_frames}")
    attrs = {k: params[k] for k in ("colour", "shape", "direction", "speed")}
    key = f"{split}_{index:06d}"
    ext = _CODEC[codec][2]
    meta = {
        "key": key,
        "captions": make_captions(**attrs),
        "duration": frames / fps,
        "fps": float(fps),
        "num_frames": frames,
        "width": size,
        "height": size,
        "codec": codec,
        "source": f"raw/{split}/{key}.{ext}",
        "start": None,
        "end": None,
        "qa": make_qa(attrs["colour"], attrs["shape"], attrs["direction"]),
        "attributes": attrs,
        "render": {k: params[k] for k in ("radius_frac", "background", "y0", "x0")},
    }
    meta["group"] = index // 4
    return key, video, meta


def _split_sizes(syn) -> dict[str, int]:
    return {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}


def check_synthetic_config(syn) -> None:
    """Raise ConfigError for impossible synthetic settings."""
    combos = len(COLOURS) * len(SHAPES) * len(SPEEDS)
    if syn.num_test % 4:
        raise ConfigError(
            f"data.synthetic.num_test={syn.num_test} must be a multiple of 4 (test clips come in "
            "groups of 4 directions)"
        )
    if syn.num_test > 4 * combos:
        raise ConfigError(
            f"data.synthetic.num_test={syn.num_test} exceeds {4 * combos}: only {combos} distinct "
            "(colour, shape, speed) groups give distinct test captions"
        )
    for name, n in _split_sizes(syn).items():
        if n < 0:
            raise ConfigError(f"data.synthetic.num_{name}={n} must be >= 0")
    if syn.frames < 1 or syn.size < 16 or syn.size % 2 or syn.fps < 1:
        raise ConfigError(
            f"data.synthetic frames={syn.frames}, size={syn.size}, fps={syn.fps}: need frames >= 1, "
            "an even size >= 16 (yuv420p) and fps >= 1"
        )
    if syn.codec not in _CODEC:
        raise ConfigError(f"data.synthetic.codec={syn.codec!r} is not one of {', '.join(_CODEC)}")


def generate_synthetic(
    root: str | Path,
    syn,
    *,
    workers: int = 2,
    shard_max_count: int = 500,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, Any]:
    """Generate raw videos, per-split JSONL and shards under ``root``.

    Args:
        root: the dataset folder (``data.root``).
        syn: a :class:`megavid.config.SyntheticConfig`.
        workers: encoder processes (output does not depend on it).
        shard_max_count: samples per shard.
        splits: which splits to generate.

    Returns:
        {split: {"count", "shards", "bytes", "seconds"}}.
    """
    from megavid.shards.writer import ShardSample, write_shards

    check_synthetic_config(syn)
    root = Path(root)
    summary: dict[str, Any] = {}
    ctx = mp.get_context("spawn")  # never fork a process that may hold threads (torch, pytest)
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        for split in splits:
            t0 = time.perf_counter()
            n = _split_sizes(syn)[split]
            raw_dir = root / "raw" / split
            raw_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(syn.seed, split, i, syn.frames, syn.size, syn.fps, syn.codec) for i in range(n)]
            results = pool.imap(_make_one, jobs, chunksize=16) if pool else map(_make_one, jobs)
            lines = []
            samples = []
            for key, video, meta in results:
                ext = _CODEC[syn.codec][2]
                path = raw_dir / f"{key}.{ext}"
                tmp = raw_dir / f".{key}.{ext}.tmp"
                tmp.write_bytes(video)
                os.replace(tmp, path)
                lines.append(json.dumps(meta, sort_keys=True) + "\n")
                samples.append(ShardSample(key=key, video=video, ext=ext, meta=meta, source=str(path)))
            jsonl = root / "raw" / f"{split}.jsonl"
            jsonl.write_text("".join(lines))
            shard_dir = root / "shards" / split
            if shard_dir.exists():
                shutil.rmtree(shard_dir)
            info = write_shards(samples, shard_dir, max_count=shard_max_count) if samples else {
                "shards": [], "bytes": 0}
            summary[split] = {
                "count": n,
                "shards": len(info["shards"]),
                "bytes": info["bytes"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return summary


def run_make_synthetic(cfg, overwrite: bool = False) -> dict[str, Any]:
    """``megavid make-synthetic``: generate ``cfg.data.synthetic`` under ``cfg.data.root``.

    Skips (and says so) when ``<root>/manifest.json`` records the same SyntheticConfig,
    unless ``overwrite``.

    Args:
        cfg: the full :class:`megavid.config.Config`.
        overwrite: regenerate even if an identical dataset exists; replace a different one.
    """
    syn = cfg.data.synthetic
    check_synthetic_config(syn)
    root = Path(cfg.data.root)
    manifest_path = root / "manifest.json"
    wanted = {"version": MANIFEST_VERSION, "synthetic": asdict(syn)}
    if manifest_path.is_file() and not overwrite:
        try:
            have = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            have = None
        if have is not None and {k: have.get(k) for k in wanted} == wanted:
            print(f"make-synthetic: {root} already holds this dataset ({manifest_path}); "
                  "skipping (pass --overwrite to regenerate)")
            return have
        raise DataError(
            f"{root} holds a synthetic dataset made with a different config ({manifest_path}); "
            "pass --overwrite to replace it or set data.root to another folder"
        )
    if overwrite or not manifest_path.is_file():
        # a partial earlier run (no manifest) or an overwrite: start from clean folders
        for sub in ("raw", "shards"):
            if (root / sub).exists():
                shutil.rmtree(root / sub)
    manifest_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    workers = max(1, min(2, os.cpu_count() or 1))
    splits = generate_synthetic(root, syn, workers=workers)
    seconds = round(time.perf_counter() - t0, 2)
    manifest = dict(wanted, splits=splits, seconds=seconds)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    total = sum(s["count"] for s in splits.values())
    print(f"make-synthetic: {total} clips ({syn.frames}x{syn.size}x{syn.size} {syn.codec}) "
          f"in {seconds:.1f}s with {workers} workers -> {root}")
    for split, s in splits.items():
        print(f"  {split:5s} {s['count']:6d} clips  {s['shards']} shards  {s['bytes'] / 1e6:.1f} MB"
              f"  -> {root / 'shards' / split}")
    return manifest
