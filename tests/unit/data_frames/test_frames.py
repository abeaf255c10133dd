"""Frames shards (``make-shards --shard-format frames``) and their DALI CPU loader.

References: PyAV decodes of the source mp4s (pixels), PIL decodes of the stored JPEGs,
Python's ``tarfile`` (layout), hand-computed frame times and frame-on-screen choices, and the
video shards of the same sources (timestamps).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megavid.config import DataConfig
from megavid.data.build import build_loader
from megavid.data.frames import frames_at, sample_clip_frames
from megavid.data.sampling import get_sample_rng, sample_timestamps
from megavid.data.transforms import transform_clip
from megavid.shards.format import get_frame_exts, read_index
from megavid.shards.stats import get_bytes_per_clip_second
from megavid.shards.verify import verify_shards

from frames_consts import FPS, SHORT_SIDE

PSNR_STORED_DB = 27.0
"""Loader output vs a PyAV decode of the source frame each chosen JPEG was made from, both
taken to 64x64 by the eval transform. Measured (q90, short side 144): bikes 28.3 dB (fine
texture: the 640->144->64 path vs 640->64 costs most of it), bigbuckbunny 40.3, carphone 44.7."""
PSNR_SAMPLED_DB = 27.0
"""The same against PyAV's decode at the sampled timestamps themselves (the frames the video
path decodes; the stored frame on screen may be up to 1/8 s earlier at 8 fps). Measured: bikes
28.3 dB, bigbuckbunny 35.5, carphone 43.5."""


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def _source_frames(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]), fps


def _cfg(shards: Path, **kw) -> DataConfig:
    args = dict(root=str(shards.parent), train=str(shards), val=str(shards), num_frames=8,
                img_size=64, batch_size=1, eval_batch_size=3, num_workers=1,
                dali_device="cpu")  # DALI's CPU decoder; the GPU test asks for device="mixed"
    args.update(kw)
    return DataConfig(**args)


def _eval_transform(frames_THWC: np.ndarray, size: int = 64) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(0, 3, 1, 2)
    return transform_clip(t, size, train=False).numpy()


# --------------------------------------------------------------------------------------------
# Writing: layout, frame choice, verification
# --------------------------------------------------------------------------------------------
def test_layout_and_frame_times(frames_shards, sources):
    videos, _ = sources
    entries = {e["key"]: e for e in read_index(frames_shards)}
    assert sorted(entries) == ["bigbuckbunny", "bikes", "carphone_pristine"]
    for key, e in entries.items():
        with tarfile.open(frames_shards / e["shard"]) as tf:
            names = [m.name for m in tf if m.name.startswith(key + ".")]
            meta = json.loads(tf.extractfile(f"{key}.json").read())
            first = tf.extractfile(f"{key}.0000.jpg").read()
        n = meta["num_frames"]
        # one member per frame, numbered without gaps, in time order, then the JSON
        assert names == [f"{key}.{x}" for x in get_frame_exts(n)] + [f"{key}.json"]
        with av.open(str(videos / f"{key}.mp4")) as c:
            s = c.streams.video[0]
            src_fps, src_n = float(s.average_rate), s.frames
        # hand-computed: target k/8 s takes the source frame on screen, floor(k/8 * fps)
        dur = src_n / src_fps
        want = sorted({math.floor(k / FPS * src_fps + 1e-6)
                       for k in range(int(math.ceil(dur * FPS))) if k / FPS < dur})
        want = [i for i in want if i < src_n]
        assert meta["frame_times"] == pytest.approx([i / src_fps for i in want], abs=1e-6)
        assert meta["codec"] == "jpeg" and meta["format"] == "frames"
        assert meta["duration"] == pytest.approx(dur, abs=0.05)
        img = Image.open(io.BytesIO(first))
        assert img.format == "JPEG" and min(img.size) == min(SHORT_SIDE, 144)
        assert (img.size[0], img.size[1]) == (meta["width"], meta["height"])
        assert meta["original"]["num_frames"] == src_n


def test_verify_shards_accepts_and_catches_a_corrupt_frame(frames_shards, tmp_path):
    assert verify_shards(frames_shards) == []
    bad = tmp_path / "bad"
    shutil.copytree(frames_shards, bad)
    e = next(e for e in read_index(bad) if e["key"] == "bikes")
    off, size = e["members"]["0003.jpg"]
    with open(bad / e["shard"], "r+b") as f:  # garbage of the same length: the tar stays valid
        f.seek(off)
        f.write(bytes(size))
    problems = verify_shards(bad)
    assert any("bikes.0003.jpg: JPEG does not decode" in p for p in problems), problems


def test_bytes_per_clip_second(frames_shards, video_shards):
    # hand-computed from the member sizes of index.jsonl over the window durations
    for d in (frames_shards, video_shards):
        entries = read_index(d)
        total = sum(size for e in entries for ext, (_, size) in e["members"].items()
                    if ext != "json")
        secs = sum((e["end"] if e.get("end") is not None else e["duration"])
                   - (e.get("start") or 0.0) for e in entries)
        assert get_bytes_per_clip_second(d) == pytest.approx(total / secs)


# --------------------------------------------------------------------------------------------
# Sampling: the video path's timestamps, the stored frames on screen
# --------------------------------------------------------------------------------------------
def test_timestamps_equal_the_video_path_and_frames_are_on_screen(frames_shards, video_shards):
    video_meta = {e["key"]: e for e in read_index(video_shards)}
    frames = read_index(frames_shards)
    for train in (True, False):
        for i, e in enumerate(frames):
            meta = json.loads(_read_json(frames_shards, e))
            ts, idx = sample_clip_frames(meta, i, num_frames=8, train=train, seed=5, epoch=2)
            v = video_meta[e["key"]]  # the video shard's sample (same source)
            rng = get_sample_rng(5, 2, i, "frames") if train else None
            ref = sample_timestamps(8, v["duration"], start=v.get("start"), end=v.get("end"),
                                    train=train, rng=rng)
            np.testing.assert_allclose(ts, ref, rtol=0, atol=1e-9)
            times = np.asarray(meta["frame_times"])
            # by brute force: the last stored frame at or before each timestamp
            brute = [max([j for j, x in enumerate(times) if x <= t + 1e-6] or [0]) for t in ts]
            assert idx.tolist() == brute
            lag = ts - times[idx]
            assert lag.min() >= -1e-6 and lag.max() < 1 / FPS + 1 / 25, lag


def test_frames_at_takes_the_frame_on_screen():
    times = np.array([0.0, 0.125, 0.25])
    ts = np.array([0.0625, 0.05, 0.2, 9.0, -1.0, 0.125, 0.125 - 1e-9, 0.1249])
    np.testing.assert_array_equal(frames_at(times, ts), [0, 0, 1, 2, 0, 1, 1, 0])


def _read_json(shard_dir: Path, e: dict) -> bytes:
    off, size = e["members"]["json"]
    with open(shard_dir / e["shard"], "rb") as f:
        f.seek(off)
        return f.read(size)


# --------------------------------------------------------------------------------------------
# The loader (DALI CPU fn.decoders.image)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dali_cpu_frames_match_pyav_decode_of_source(frames_shards, sources):
    from megavid.data.dali.image_loaders import FramesDaliLoader

    videos, _ = sources
    # data.backend=dali: auto takes PIL here (faster measured, bench/results/loader_cpu-2core.md)
    loader = build_loader(_cfg(frames_shards, backend="dali"), "val", train=False)
    assert isinstance(loader, FramesDaliLoader) and loader.device == "cpu"
    (batch,) = list(loader)
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 8, 3, 64, 64)
    for b, (key, meta) in enumerate(zip(batch["keys"], batch["meta"])):
        src, src_fps = _source_frames(videos / f"{key}.mp4")
        ts, idx = sample_clip_frames(meta, int(batch["indices"][b]), num_frames=8,
                                     train=False, seed=0, epoch=0)
        got = batch["video"][b].numpy()
        # the source frames the stored JPEGs were made from
        stored_src = [round(meta["frame_times"][j] * src_fps) for j in idx]
        p_stored = _psnr(got, _eval_transform(src[stored_src]))
        # the source frames on screen at the sampled timestamps (what the video path decodes)
        sampled_src = np.clip(np.floor(ts * src_fps + 1e-6).astype(int), 0, len(src) - 1)
        p_sampled = _psnr(got, _eval_transform(src[sampled_src]))
        assert p_stored >= PSNR_STORED_DB, (key, p_stored)
        assert p_sampled >= PSNR_SAMPLED_DB, (key, p_sampled)
        # and the loader took exactly the stored frames on screen: decoding those JPEGs with
        # PIL matches far better than the neighbouring stored frames do
        e = next(e for e in read_index(frames_shards) if e["key"] == key)
        jpegs = _jpegs(frames_shards, e)
        mine = _psnr(got, _eval_transform(np.stack([jpegs[j] for j in idx])))
        shifted = np.clip(idx + 1, 0, len(jpegs) - 1)
        other = _psnr(got, _eval_transform(np.stack([jpegs[j] for j in shifted])))
        assert mine >= 38.0 and mine > other + 3, (key, mine, other)


def _jpegs(shard_dir: Path, e: dict) -> list[np.ndarray]:
    out = []
    with open(shard_dir / e["shard"], "rb") as f:
        for ext in get_frame_exts(e["num_frames"]):
            off, size = e["members"][ext]
            f.seek(off)
            out.append(np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB")))
    return out


def test_train_loader_resumes_exactly_and_backend_choice(frames_shards):
    cfg = _cfg(frames_shards, backend="dali", random_flip=True)
    full = [b for b in build_loader(cfg, "train", train=True, seed=3)]
    assert len(full) == 3
    first = build_loader(cfg, "train", train=True, seed=3)
    it = iter(first)
    b0 = next(it)
    state = first.state_dict()
    resumed = build_loader(cfg, "train", train=True, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b0["keys"]] + [b["keys"] for b in rest] == [b["keys"] for b in full]
    for a, b in zip([b0] + rest, full):
        assert torch.equal(a["video"], b["video"])  # same random crops/flips/frames

    # the no-DALI fallback (data.backend=pyav: PIL in the loader's workers) gives the same
    # samples, frames, crops and flips: only the JPEG decoder and the resampler differ
    from megavid.data.loader import VideoTextLoader

    pil_loader = build_loader(_cfg(frames_shards, backend="pyav", random_flip=True), "train",
                              train=True, seed=3)
    assert type(pil_loader) is VideoTextLoader
    pil = list(pil_loader)
    assert [b["keys"] for b in pil] == [b["keys"] for b in full]
    for a, b in zip(pil, full):
        assert _psnr(a["video"].numpy(), b["video"].numpy()) >= 45.0  # measured 53-54 dB


def test_auto_selection_and_info(frames_shards, video_shards, capsys):
    from megavid import info
    from megavid.data.build import plan_decode, select_backend
    from megavid.data.dali.devices import get_shard_codec

    # the auto policy follows bench/results: PIL (the pyav loader's workers) beat DALI's JPEG
    # paths on the H200 (182.1 vs 130.0 cpu and 50.7 mixed clips/s on 16 cores) and per
    # CPU-second on 2 cores (44.40 vs 31.45); DALI mixed only where few cores feed each GPU
    gpu = dict(has_dali=True, has_cuda=True)
    assert select_backend("jpeg", **gpu, cpu_cores=16, num_gpus=1)[:2] == ("pyav", "")  # 182
    assert select_backend("jpeg", **gpu, cpu_cores=10, num_gpus=2)[:2] == ("pyav", "")  # 56.9
    assert select_backend("jpeg", **gpu, cpu_cores=8, num_gpus=2)[:2] == ("dali", "mixed")  # 45.5
    assert select_backend("jpeg", has_dali=True, has_cuda=False)[:2] == ("pyav", "")
    backend, _, why = select_backend("jpeg", has_dali=False, has_cuda=True, cpu_cores=1)
    assert backend == "pyav" and "nvidia-dali" in why
    assert info.main(["--no-decode", "--shards", str(frames_shards),
                      "--shards", str(video_shards)]) == 0
    out = capsys.readouterr().out
    # info prints the plan of this machine; video shards take what select_backend says for
    # their codec (PyAV without a GPU)
    frames = plan_decode("frames", "jpeg")
    assert (f"data.backend=auto for {frames_shards}: {frames.backend} ({frames.device}); "
            "codec jpeg (frames shards)") in out
    video_backend = select_backend(get_shard_codec(video_shards))[0]
    assert torch.cuda.is_available() or video_backend == "pyav"
    assert f"data.backend=auto for {video_shards}: {video_backend}" in out


def test_dali_webdataset_reader_reads_the_layout(frames_shards):
    from megavid.data.dali.readers import iter_dali_frames_reader

    seen = {}
    for tar in sorted(frames_shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for meta, frames in iter_dali_frames_reader(tar):
            key = meta["key"]
            assert frames == [members[f"{key}.{x}"] for x in get_frame_exts(meta["num_frames"])]
            seen[key] = len(frames)
    assert len(seen) == 3


@pytest.mark.gpu
def test_mixed_hardware_decode_matches_cpu(frames_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megavid.data.dali.backend import build_dali_loader

    cfg = _cfg(frames_shards)
    cpu = next(iter(build_dali_loader(cfg, "val", train=False, device="cpu")))
    gpu = next(iter(build_dali_loader(cfg, "val", train=False, device="mixed")))
    assert gpu["video"].is_cuda and gpu["keys"] == cpu["keys"]
    assert _psnr(gpu["video"].cpu().numpy(), cpu["video"].numpy()) >= 35.0


def test_corrupt_frame_is_quarantined_and_replaced(frames_shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(frames_shards, bad)
    e = next(e for e in read_index(bad) if e["key"] == "carphone_pristine")
    with open(bad / e["shard"], "r+b") as f:  # every frame of one sample becomes zeros
        for ext in get_frame_exts(e["num_frames"]):
            off, size = e["members"][ext]
            f.seek(off)
            f.write(bytes(size))
    loader = build_loader(_cfg(bad, backend="dali"), "val", train=False)
    (batch,) = list(loader)
    assert loader.failures == {"decode_error": 1}
    assert [s["key"] for s in loader.quarantine.samples] == ["carphone_pristine"]
    # eval: the failed sample's slot is taken by a stand-in that is marked invalid
    assert batch["valid"].tolist().count(True) == 2
    assert "carphone_pristine" not in [k for k, v in zip(batch["keys"], batch["valid"]) if v]


def test_make_shards_cli_frames_is_deterministic_and_checks_options(sources, tmp_path):
    from megavid.errors import DataError
    from megavid.shards.ingest.make_shards import main

    videos, _ = sources
    ann = tmp_path / "one.csv"
    ann.write_text("video,caption\ncarphone_pristine.mp4,a man on the phone\n")
    outs = []
    for i, flag in enumerate((["--format", "frames"], ["--shard-format", "frames"])):
        out = tmp_path / f"o{i}"
        assert main(["--videos", str(videos), "--annotations", str(ann), "--out", str(out),
                     *flag, "--fps", "4", "--short-side", "72", "--quality", "80",
                     "--workers", "1", "--quiet"]) == 0
        outs.append({p.name: p.read_bytes() for p in out.iterdir()
                     if p.suffix in (".tar", ".idx") or p.name == "index.jsonl"})
    assert outs[0] == outs[1]  # byte-identical, and --format frames == --shard-format frames
    meta = read_index(tmp_path / "o0")[0]
    # 4.004 s at 4 fps: targets 0, 0.25, ..., 4.0 s (4.0 < 4.004 shows the last frame)
    assert meta["num_frames"] == 17 and (meta["width"], meta["height"]) == (88, 72)
    with pytest.raises(DataError, match="--codec/--max-fps apply to video shards"):
        main(["--videos", str(videos), "--annotations", str(ann), "--out", str(tmp_path / "x"),
              "--shard-format", "frames", "--codec", "vp9", "--quiet"])
    with pytest.raises(DataError, match="--quality 0"):
        main(["--videos", str(videos), "--annotations", str(ann), "--out", str(tmp_path / "y"),
              "--shard-format", "frames", "--quality", "0", "--quiet"])
