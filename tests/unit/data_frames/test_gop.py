"""The video-stream speed-ups: ``make-shards --gop N``, PyAV's keyframe-aware
decode (only the GOPs that hold sampled frames) and ``trim_to_gops`` for DALI.

References: PyAV packet flags (keyframe interval), PyAV full decodes of the source and of the
written stream (pixels, exact frames), DALI's decode of the untrimmed stream, hand-computed GOP
costs from the keyframe positions.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from megavid.config import DataConfig
from megavid.data.pyav_backend import decode_clip, trim_to_gops
from megavid.data.sampling import get_sample_rng, sample_timestamps, timestamps_to_indices
from megavid.errors import DataError
from megavid.shards.format import read_index, read_sample
from megavid.shards.ingest.make_shards import _manifest_options, make_shards
from megavid.shards.ingest.options import MakeShardsOptions

from frames_consts import GOP, GOP_SOURCES, make_gop_shards

PSNR_GOP_DB = 32.0
"""Written stream vs the source frame resized the same way (PyAV, area filter, RGB). Measured
at short side 96, GOP 8: h264 (crf 20) 34.7 dB carphone, 35.7 bikes; vp9 (crf 30, realtime)
36.3 carphone, 36.8 bikes."""


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def _packets(data: bytes) -> tuple[list[bool], int]:
    """(keyframe flag of each frame in presentation order, frame count) from the demuxer."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        pk = sorted((p for p in c.demux(s) if p.size), key=lambda p: p.pts)
        return [bool(p.is_keyframe) for p in pk], len(pk)


def _decode_all(src, size: tuple[int, int] | None = None) -> np.ndarray:
    with av.open(src if isinstance(src, str) else io.BytesIO(src)) as c:
        out = []
        for f in c.decode(video=0):
            if size is not None:
                f = f.reformat(width=size[0], height=size[1], interpolation="AREA")
            out.append(f.to_ndarray(format="rgb24"))
        return np.stack(out)


# --------------------------------------------------------------------------------------------
# make-shards --gop
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_gop_keyframe_interval_and_pixels(gop_shards, sources, codec):
    videos, _ = sources
    shards = gop_shards[codec]
    entries = read_index(shards)
    assert sorted(e["key"] for e in entries) == sorted(n.split(".")[0] for n in GOP_SOURCES)
    for e in entries:
        video, meta = read_sample(shards, e)
        keys, n = _packets(video)
        src = _decode_all(str(videos / f"{e['key']}.mp4"), (meta["width"], meta["height"]))
        assert n == len(src) == meta["num_frames"]  # no frame dropped or added
        # a keyframe exactly every GOP frames: the source's own keyframes (bikes: 30, 76, ...)
        # are not carried over, and the encoder adds none (no scene cuts)
        assert [i for i, k in enumerate(keys) if k] == list(range(0, n, GOP))
        assert meta["gop"] == GOP and meta["codec"] == codec
        got = _decode_all(video)
        assert _psnr(got, src) >= PSNR_GOP_DB, (e["key"], _psnr(got, src))


@pytest.mark.slow
def test_gop_shards_are_identical_with_one_or_two_workers(gop_shards, sources, tmp_path):
    videos, _ = sources
    two = make_gop_shards(videos, tmp_path / "h264", "h264", workers=2)
    one = gop_shards["h264"]
    names = sorted(p.name for p in one.iterdir() if p.suffix in (".tar", ".idx"))
    assert names and names == sorted(p.name for p in two.iterdir() if p.suffix in (".tar", ".idx"))
    for name in names + ["index.jsonl"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_gop_option_checks_and_manifest(sources, tmp_path):
    videos, ann = sources
    base = dict(videos=str(videos), annotations=str(ann), out=str(tmp_path / "x"))
    with pytest.raises(DataError, match="--gop -1 must be >= 0"):
        make_shards(MakeShardsOptions(**base, gop=-1), quiet=True)
    with pytest.raises(DataError, match="applies to video shards"):
        make_shards(MakeShardsOptions(**base, gop=8, shard_format="frames"), quiet=True)
    # gop 0 leaves the manifest as before the option existed (old folders stay resumable)
    assert "gop" not in _manifest_options(MakeShardsOptions(**base))
    assert _manifest_options(MakeShardsOptions(**base, codec="h264", gop=8))["gop"] == 8


# --------------------------------------------------------------------------------------------
# PyAV: keyframe-aware decode
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_keyframe_aware_decode_is_exact_and_decodes_only_needed_gops(gop_shards, codec):
    shards = gop_shards[codec]
    for i, e in enumerate(read_index(shards)):
        video, meta = read_sample(shards, e)
        full = _decode_all(video)
        n, fps = len(full), meta["fps"]
        for r in range(3):
            ts = sample_timestamps(8, meta["duration"], train=True,
                                   rng=get_sample_rng(r, 0, i, "frames"))
            idx = timestamps_to_indices(ts, fps, n)
            stats: dict = {}
            clip = decode_clip(video, ts, fps=fps, num_video_frames=n, stats=stats)
            np.testing.assert_array_equal(clip, full[idx])
            # hand-computed costs with keyframes every GOP frames: from each touched GOP's
            # keyframe to its last sampled frame, vs from the first frame's keyframe to the last
            touched = {}
            for j in idx.tolist():
                touched[j // GOP] = max(touched.get(j // GOP, 0), j % GOP + 1)
            gops_only = sum(touched.values())
            sequential = int(idx.max()) - int(idx.min()) // GOP * GOP + 1
            # (a decode call may hand back a frame or two past the last one it needed)
            assert gops_only <= stats["decoded_frames"] <= gops_only + 2 * len(touched)
            if len(touched) > 3:
                assert stats["decoded_frames"] < sequential


# --------------------------------------------------------------------------------------------
# trim_to_gops (DALI's input)
# --------------------------------------------------------------------------------------------
def _dali_decode(data: bytes, frames: np.ndarray) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    def source(info):
        if info.iteration:
            raise StopIteration
        return [np.frombuffer(data, np.uint8)], [np.asarray(frames, np.int32)]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def _pipe():
        enc, fr = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                     dtype=[types.UINT8, types.INT32])
        return fn.decoders.video(enc, frames=fr, device="cpu")

    pipe = _pipe()
    pipe.build()
    (out,) = pipe.run()
    return np.asarray(out[0])


@pytest.mark.slow
def test_trim_to_gops_gives_dali_and_pyav_the_same_frames(gop_shards):
    pytest.importorskip("nvidia.dali")
    for codec in ("vp9", "h264"):
        shards = gop_shards[codec]
        for e in read_index(shards):
            video, meta = read_sample(shards, e)
            n = meta["num_frames"]
            frames = np.array([3, 20, 21, n // 2, n - 1], dtype=np.int32)
            trimmed, renumbered = trim_to_gops(video, frames)
            keys, kept = _packets(trimmed)
            # the GOPs of frames 3, 20/21, n/2 and n-1: 4 GOPs (fewer if they coincide)
            n_gops = len({int(f) // GOP for f in frames})
            assert kept <= n_gops * GOP and sum(keys) == n_gops and len(trimmed) < len(video)
            if codec == "vp9":  # DALI's CPU decoder reads VP9: bit-identical frames
                np.testing.assert_array_equal(_dali_decode(trimmed, renumbered),
                                              _dali_decode(video, frames))
            else:  # H.264 needs NVDEC in DALI; PyAV checks the stream copy
                np.testing.assert_array_equal(_decode_all(trimmed)[renumbered],
                                              _decode_all(video)[frames])
    # a frame in every GOP: nothing to drop, the input comes back as it is
    bikes = next(e for e in read_index(gop_shards["vp9"]) if e["key"] == "bikes")
    video, _ = read_sample(gop_shards["vp9"], bikes)
    same, f = trim_to_gops(video, np.arange(0, 250, GOP))
    assert same is video and f.tolist() == list(range(0, 250, GOP))
    assert trim_to_gops(b"not a video", np.array([0]))[0] == b"not a video"


@pytest.mark.slow
def test_dali_loader_with_trimmed_gops_gives_the_same_batches(gop_shards):
    pytest.importorskip("nvidia.dali")
    from megavid.data.dali.backend import build_dali_loader

    shards = gop_shards["vp9"]
    batches = []
    for trim in (False, True):
        cfg = DataConfig(root=str(shards.parent), train=str(shards), num_frames=8, img_size=64,
                         batch_size=1, num_workers=1, random_flip=True, dali_trim_gops=trim)
        batches.append(list(build_dali_loader(cfg, "train", train=True, seed=4, device="cpu")))
    assert [b["keys"] for b in batches[0]] == [b["keys"] for b in batches[1]]
    for a, b in zip(*batches):
        assert torch.equal(a["video"], b["video"])


def test_info_names_the_keyframe_interval(gop_shards, video_shards, capsys):
    from megavid import info

    assert {e["gop"] for e in read_index(gop_shards["h264"])} == {GOP}  # index.jsonl has it
    assert info.main(["--no-decode", "--shards", str(gop_shards["h264"]),
                      "--shards", str(video_shards)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if f"auto for {gop_shards['h264']}:" in x)
    assert line.startswith(f"data.backend=auto for {gop_shards['h264']}: pyav")
    assert f"keyframes every {GOP} frames (make-shards --gop)" in line
    line = next(x for x in out.splitlines() if f"auto for {video_shards}:" in x)
    assert "make-shards --gop 8 cuts PyAV's decode" in line
