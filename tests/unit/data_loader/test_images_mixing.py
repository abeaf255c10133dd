"""Images as 1-frame clips, image/video mixing by ratio, and resampled (infinite) mode.

References: PIL decodes of the JPEG/PNG bytes written into the shards (and the original pixels
for the lossless PNGs), the sample keys written into each shard, and full uninterrupted runs
of a loader for the resume checks."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megavid.data.build import build_loader
from megavid.data.mixing import MixedLoader
from megavid.data.pyav_backend import decode_image
from megavid.errors import ConfigError, DataError
from megavid.shards.writer import ShardSample, write_shards
from tests.helpers.loader_clips import NUM_SAMPLES, SIZE, data_config

NUM_IMAGES = 6
IMG_H, IMG_W = SIZE, SIZE + 16  # landscape: eval centre-crops columns 8..8+SIZE


def make_image(i: int) -> np.ndarray:
    """A textured RGB image: a per-sample red level plus gradients, so a crop, a transpose or
    the wrong sample all show."""
    yy, xx = np.mgrid[0:IMG_H, 0:IMG_W]
    img = np.zeros((IMG_H, IMG_W, 3), dtype=np.uint8)
    img[..., 0] = 20 + 35 * i
    img[..., 1] = (xx * 5) % 256
    img[..., 2] = (yy * 7) % 256
    return img


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90) if fmt == "JPEG" else \
        Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_bytes() -> dict[str, tuple[bytes, str]]:
    """key -> (encoded bytes, ext): even samples JPEG, odd samples PNG."""
    out = {}
    for i in range(NUM_IMAGES):
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        out[f"img{i:03d}"] = (encode_image(make_image(i), fmt), ext)
    return out


@pytest.fixture(scope="module")
def mixed_root(shard_root: Path, image_bytes, tmp_path_factory) -> Path:
    """The video shards of ``shard_root`` (train, 24 VP9 clips) plus <root>/shards/images:
    6 real JPEG/PNG images in 2 shards, written by ``write_shards``."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "shards").mkdir()
    (root / "shards" / "train").symlink_to(shard_root / "shards" / "train")
    write_shards(
        (ShardSample(key=k, video=data, ext=ext,
                     meta={"key": k, "captions": [f"a photo number {k}"], "width": IMG_W,
                           "height": IMG_H, "codec": "jpeg" if ext == "jpg" else ext, "source": f"test/{k}.{ext}"})
         for k, (data, ext) in image_bytes.items()),
        root / "shards" / "images", max_count=4)
    return root


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


# -------------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------------
def test_image_shard_decodes_to_the_pil_image(mixed_root, image_bytes):
    cfg = data_config(mixed_root, num_frames=3, eval_batch_size=4)
    loader = build_loader(cfg, "images", train=False)
    seen = {}
    for batch in loader:
        assert batch["video"].dtype == torch.uint8
        assert batch["video"].shape[1:] == (3, 3, SIZE, SIZE)
        for clip, key, meta in zip(batch["video"], batch["keys"], batch["meta"]):
            seen[key] = (clip, meta)
    assert sorted(seen) == sorted(image_bytes)
    for key, (data, ext) in image_bytes.items():
        clip, meta = seen[key]
        assert meta["is_image"] is True
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # PIL: the reference
        if ext == "png":  # lossless: PIL's decode is the original pixels
            np.testing.assert_array_equal(ref, make_image(int(key[3:])))
        crop = torch.from_numpy(ref[:, 8:8 + SIZE].copy()).permute(2, 0, 1)  # eval centre crop
        for t in range(3):  # every frame of the 1-frame clip is the image
            assert torch.equal(clip[t], crop), (key, t)


def test_decode_image_rejects_garbage():
    with pytest.raises(DataError, match="cannot decode image"):
        decode_image(b"not an image at all", 4)
    assert decode_image(encode_image(make_image(1), "PNG"), 5).shape == (5, IMG_H, IMG_W, 3)


def test_video_samples_say_they_are_not_images(shard_root):
    batch = next(iter(build_loader(data_config(shard_root), "train", train=False)))
    # video metas are the stored sample JSON, as on every backend (no is_image key)
    assert all("is_image" not in m for m in batch["meta"])


# -------------------------------------------------------------------------------------------
# Mixing
# -------------------------------------------------------------------------------------------
def mixed_config(root: Path, **kw):
    base = dict(image_train="images", image_ratio=0.25, batch_size=4)
    base.update(kw)
    return data_config(root, **base)


def test_mixed_batches_have_the_ratio_on_every_rank(mixed_root, image_bytes):
    cfg = mixed_config(mixed_root)
    ranks = [build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=3)
             for r in range(2)]
    assert all(isinstance(loader, MixedLoader) for loader in ranks)
    # 24 clips / (3 clips x 2 ranks) = 4 steps per epoch; images: 1 per rank per step
    assert len(ranks[0]) == NUM_SAMPLES // 6
    per_rank = [list(loader) for loader in ranks]
    assert [len(b) for b in per_rank] == [4, 4]
    video_keys, image_keys = [], []
    for step in range(4):
        for r in range(2):
            batch = per_rank[r][step]
            assert batch["video"].shape == (4, 4, 3, SIZE, SIZE)
            assert batch["input_ids"].shape[0] == 4 and len(batch["captions"]) == 4
            flags = [m.get("is_image", False) for m in batch["meta"]]
            assert flags == [False, False, False, True]  # exactly 25% images, same layout
            assert batch["is_image"].tolist() == flags
            assert all(k.startswith("s") for k in batch["keys"][:3])
            assert batch["keys"][3] in image_bytes
            video_keys += batch["keys"][:3]
            image_keys.append(batch["keys"][3])
    # the video source covers its epoch exactly once; images: 6 images = 3 steps per epoch
    assert sorted(video_keys) == [f"s{i:03d}" for i in range(NUM_SAMPLES)]
    assert sorted(image_keys[:6]) == sorted(image_bytes)
    assert ranks[0].state_dict()["video"]["epoch"] == 1  # the video pass ended


def test_mixed_resume_gives_exactly_the_remaining_samples(mixed_root):
    cfg = mixed_config(mixed_root)
    full = [b["keys"] for b in itertools.islice(
        iter(build_loader(cfg, "train", train=True, seed=5)), 6)]
    assert len(full) == 6  # single rank: 24 clips / 3 per step = 8 steps per video epoch
    first = build_loader(cfg, "train", train=True, seed=5)
    k = 5  # the image source (6 images, 1 per step) wraps into its second epoch at step 6
    got = [b["keys"] for b in take(first, k)]
    assert got == full[:k]
    state = first.state_dict()
    resumed = build_loader(cfg, "train", train=True, seed=5)
    resumed.load_state_dict(state)
    rest = [b["keys"] for b in take(resumed, 1)]
    assert rest == full[k:k + 1]
    # continue the reference across both sources' epoch ends and compare the whole run
    ref = build_loader(cfg, "train", train=True, seed=5)
    ref_keys = [b["keys"] for b in ref] + [b["keys"] for b in ref]  # two video epochs
    again = build_loader(cfg, "train", train=True, seed=5)
    again.load_state_dict(state)
    again_keys = [b["keys"] for b in again] + [b["keys"] for b in again]
    assert again_keys == ref_keys[k:]
    # the image source crossed into its next epoch with its own order
    images = [keys[3] for keys in ref_keys]
    assert Counter(images[:6]) == Counter(images[6:12]) and images[:6] != images[6:12]


def test_mixing_config_errors(mixed_root):
    with pytest.raises(ConfigError, match="whole number"):
        build_loader(mixed_config(mixed_root, image_ratio=0.3), "train", train=True)
    with pytest.raises(ConfigError, match="image_train"):
        build_loader(mixed_config(mixed_root, image_train=""), "train", train=True)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        build_loader(mixed_config(mixed_root, image_ratio=1.0), "train", train=True)
    plain = build_loader(data_config(mixed_root, batch_size=4), "train", train=True)
    mixed = build_loader(mixed_config(mixed_root), "train", train=True)
    with pytest.raises(DataError, match="without image mixing"):
        mixed.load_state_dict(plain.state_dict())


# -------------------------------------------------------------------------------------------
# Resampled (infinite) mode
# -------------------------------------------------------------------------------------------
def drawn(seed: int, step: int, global_batch: int) -> np.ndarray:
    """The documented draw of a step: G indices with replacement from RNG (seed, 1, step)."""
    return np.random.default_rng([seed, 1, step]).integers(NUM_SAMPLES, size=global_batch)


def test_resampled_draws_by_step_across_ranks(shard_root):
    cfg = data_config(shard_root, resampled=True, batch_size=4)
    ranks = [build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=9)
             for r in range(2)]
    assert len(ranks[0]) == NUM_SAMPLES // 8  # a nominal epoch
    steps = 7  # past the nominal epoch (3 steps): no boundary, keeps drawing
    batches = [take(loader, steps) for loader in ranks]
    all_indices = []
    for s in range(steps):
        ref = drawn(9, s, 8)
        for r in range(2):
            assert batches[r][s]["indices"].tolist() == ref[4 * r:4 * r + 4].tolist()
            assert batches[r][s]["keys"] == [f"s{i:03d}" for i in ref[4 * r:4 * r + 4]]
        all_indices += ref.tolist()
    assert max(Counter(all_indices).values()) > 1  # with replacement: repeats happen
    assert ranks[0].state_dict()["cursor"] == steps


def test_resampled_resume_is_exact(shard_root):
    cfg = data_config(shard_root, resampled=True, batch_size=4)
    full = take(build_loader(cfg, "train", train=True, seed=2), 10)
    first = build_loader(cfg, "train", train=True, seed=2)
    take(first, 4)
    state = first.state_dict()
    assert state["cursor"] == 4 and state["resampled"] is True
    resumed = build_loader(cfg, "train", train=True, seed=2)
    resumed.set_epoch(0)  # what the trainer does before loading: must not reset anything
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    for a, b in zip(rest, full[4:]):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["video"], b["video"])  # same frames and crops, not just samples
    plain = build_loader(data_config(shard_root, batch_size=4), "train", train=True, seed=2)
    with pytest.raises(DataError, match="data.resampled"):
        plain.load_state_dict(state)


def test_resampled_with_mixing_resumes_both_sources(mixed_root):
    cfg = mixed_config(mixed_root, resampled=True)
    full = [b["keys"] for b in take(build_loader(cfg, "train", train=True, seed=4), 12)]
    first = build_loader(cfg, "train", train=True, seed=4)
    take(first, 7)
    resumed = build_loader(cfg, "train", train=True, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert [b["keys"] for b in take(resumed, 5)] == full[7:]


def test_image_shards_backend_choice(mixed_root):
    pytest.importorskip("nvidia.dali")
    from megavid.data.dali.image_loaders import ImageDaliLoader
    from megavid.data.dali.loader import DaliLoader

    # codec "jpeg" in a sample JSON would otherwise look like a frames shard to auto; without
    # a GPU auto decodes images with PIL (the PyAV loader)
    auto = build_loader(data_config(mixed_root, backend="auto"), "images", train=False)
    if not torch.cuda.is_available():
        assert not isinstance(auto, DaliLoader)
    assert sorted(k for b in auto for k in b["keys"]) == [f"img{i:03d}" for i in range(NUM_IMAGES)]
    # data.backend=dali reads them with fn.decoders.image (tests/unit/data_dali compares them)
    dali = build_loader(data_config(mixed_root, backend="dali"), "images", train=False)
    assert isinstance(dali, ImageDaliLoader)
    assert sorted(k for b in dali for k in b["keys"]) == [f"img{i:03d}" for i in range(NUM_IMAGES)]
