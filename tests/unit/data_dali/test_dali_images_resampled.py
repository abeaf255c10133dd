"""The DALI loader's image mode (JPEG/PNG samples as 1-frame clips, ``fn.decoders.image``) and
resampled (infinite) mode, against the PyAV loader on the same shards and against PIL decodes
and the documented (seed, step) draws."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.dali_shards import data_cfg, make_image_shards

pytest.importorskip("nvidia.dali")

from megavid.data.build import build_loader  # noqa: E402
from megavid.data.dali.backend import build_dali_loader  # noqa: E402
from megavid.data.dali.image_loaders import ImageDaliLoader  # noqa: E402
from megavid.data.dali.loader import DaliLoader  # noqa: E402
from megavid.data.loader import build_pyav_loader  # noqa: E402
from megavid.errors import DataError  # noqa: E402
from megavid.shards.format import read_index, read_sample  # noqa: E402

# Mean |DALI - PyAV| in uint8: DALI's antialiased ROI resize vs torch's antialiased bilinear
# interpolate (libjpeg-turbo decodes in both); measured 0.09-0.12 on images, ~1.4 on the VP9
# clips (two YUV->RGB conversions). The wrong image (5 levels + a moved block per index), a
# flip or a shifted crop is well above these.
MAX_MEAN_ABS_DIFF_IMAGES = 1.0
MAX_MEAN_ABS_DIFF = 3.0


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_images_match_the_pyav_loader(image_shards, train):
    cfg = data_cfg(image_shards, backend="dali", num_frames=3, batch_size=4,
                   eval_batch_size=4, random_flip=True)
    dali = build_loader(cfg, "train", train=train, seed=2, epoch=1)
    assert isinstance(dali, ImageDaliLoader) and dali.device == "cpu"
    pyav = build_pyav_loader(cfg, "train", train=train, seed=2, epoch=1)  # (ignores backend)
    pairs = list(zip(dali, pyav, strict=True))
    assert len(pairs) == (2 if train else 3)  # 10 images: drop_last in train, 4+4+2 in eval
    flips = 0
    for bd, bp in pairs:
        assert bd["keys"] == bp["keys"] and bd["captions"] == bp["captions"]
        assert torch.equal(bd["indices"], bp["indices"]) and torch.equal(bd["valid"], bp["valid"])
        assert bd["meta"] == bp["meta"] and all(m["is_image"] is True for m in bd["meta"])
        assert bd["video"].shape == bp["video"].shape == (len(bd["keys"]), 3, 3, 32, 32)
        assert bd["video"].dtype == torch.uint8
        # a 1-frame clip: every frame is the image
        assert torch.equal(bd["video"], bd["video"][:, :1].expand_as(bd["video"]))
        mad = (bd["video"].float() - bp["video"].float()).abs().mean().item()
        assert mad < MAX_MEAN_ABS_DIFF_IMAGES, mad
        # and each clip is nearer to its own PyAV clip than to the horizontally flipped one,
        # so the flip decisions agree (these images are not left-right symmetric)
        for cd, cp in zip(bd["video"].float(), bp["video"].float()):
            assert (cd - cp).abs().mean() < (cd - cp.flip(-1)).abs().mean()
        flips += sum(not torch.equal(c, c.flip(-1)) for c in bd["video"])
    assert flips > 0


def test_eval_image_is_the_pil_centre_crop(image_shards):
    """Independent of both loaders: the PNG decoded by PIL, short side 40 -> 32 (56 -> 44.8),
    centre-cropped; DALI's frame is that picture, resized from the same box."""
    from megavid.data.transforms import center_crop, resize_short_side

    cfg = data_cfg(image_shards, backend="dali", num_frames=2, eval_batch_size=10)
    (batch,) = list(build_loader(cfg, "val", train=False))
    entries = {e["key"]: e for e in read_index(image_shards)}
    for clip, key in zip(batch["video"], batch["keys"]):
        data, _ = read_sample(image_shards, entries[key])
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
        ref = center_crop(resize_short_side(ref.permute(2, 0, 1)[None], 32), 32)[0]
        mad = (clip[0].float() - ref.float()).abs().mean().item()
        assert mad < MAX_MEAN_ABS_DIFF, (key, mad)


def test_corrupt_image_is_quarantined_and_replaced(tmp_path):
    shards = make_image_shards(tmp_path / "shards", 6, corrupt=(2,))
    cfg = data_cfg(shards, backend="dali", num_frames=2, eval_batch_size=3)
    loader = build_loader(cfg, "val", train=False)
    batches = list(loader)
    assert dict(loader.failures) == {"decode_error": 1}
    (q,) = loader.quarantine.samples
    assert (q["key"], q["reason"]) == ("img_0002", "decode_error")
    # found by DALI failing on the batch (PIL reads the header fine), named with its message
    assert "decoders.image" in q["detail"] or "PNG" in q["detail"].upper(), q["detail"]
    # the stand-in comes from outside the step (loader docstring, "Faults"): with 6 images and
    # steps of 3 the walk p + k*3 has one place, k = 1: position 2 + 3 = 5
    assert batches[0]["keys"] == ["img_0000", "img_0001", "img_0005"]
    assert batches[0]["valid"].tolist() == [True, True, False]  # the stand-in is not counted


def test_resampled_mode_draws_by_step_and_matches_pyav(vp9_shards):
    """12 samples, batch 2 x 2 ranks: the nominal epoch is 3 steps; 5 steps cross it."""
    cfg = data_cfg(vp9_shards, resampled=True, batch_size=2)
    for rank in range(2):
        dali = build_dali_loader(cfg, "train", train=True, rank=rank, world_size=2, seed=9,
                                 device="cpu")
        pyav = build_pyav_loader(cfg, "train", train=True, rank=rank, world_size=2, seed=9)
        assert len(dali) == len(pyav) == 3
        for step, (bd, bp) in enumerate(zip(take(dali, 5), take(pyav, 5))):
            # the documented draw: G = 4 indices with replacement from RNG (seed, 1, step)
            ref = np.random.default_rng([9, 1, step]).integers(12, size=4)
            assert bd["indices"].tolist() == ref[2 * rank:2 * rank + 2].tolist()
            assert bd["keys"] == bp["keys"] and bd["captions"] == bp["captions"]
            mad = (bd["video"].float() - bp["video"].float()).abs().mean().item()
            assert mad < MAX_MEAN_ABS_DIFF, mad
        assert dali.state_dict() == pyav.state_dict() == {
            "epoch": 1, "cursor": 5, "seed": 9, "num_samples": 12, "resampled": True}


def test_resampled_resume_is_exact(vp9_shards):
    cfg = data_cfg(vp9_shards, resampled=True, batch_size=3)  # nominal epoch: 4 steps
    full = take(build_dali_loader(cfg, "train", train=True, seed=4, device="cpu"), 6)
    first = build_dali_loader(cfg, "train", train=True, seed=4, device="cpu")
    take(first, 3)
    state = first.state_dict()
    assert state["cursor"] == 3 and state["resampled"] is True
    resumed = build_dali_loader(cfg, "train", train=True, seed=4, device="cpu")
    resumed.set_epoch(0)  # what a trainer does: must not move a resampled loader
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 3), full[3:], strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["video"], b["video"])  # same frames and crops after the resume
    # a resampled state does not resume an epoch-mode DALI loader (and vice versa)
    epoch_mode = build_dali_loader(data_cfg(vp9_shards, batch_size=3), "train", train=True,
                                   device="cpu")
    assert isinstance(epoch_mode, DaliLoader)
    with pytest.raises(DataError, match="data.resampled"):
        epoch_mode.load_state_dict(state)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_image_decode_matches_pyav(image_shards):
    """On a GPU: data.backend=dali decodes image shards on the GPU (dali_device auto); the
    mixed decoder (hardware JPEG / nvJPEG, PNG on the CPU) gives the PyAV loader's images
    (nvJPEG's IDCT may differ by a level). (auto follows the measured JPEG paths now:
    megavid.data.build.AUTO_POLICY, tests/unit/data_dali/test_decode_plan.py.)"""
    cfg = data_cfg(image_shards, backend="dali", dali_device="auto", num_frames=2, batch_size=4)
    dali = build_loader(cfg, "train", train=True, seed=1)
    assert isinstance(dali, ImageDaliLoader) and dali.device == "mixed"
    for bd, bp in zip(dali, build_pyav_loader(cfg, "train", train=True, seed=1), strict=True):
        assert bd["video"].is_cuda and bd["keys"] == bp["keys"]
        mad = (bd["video"].cpu().float() - bp["video"].float()).abs().mean().item()
        assert mad < MAX_MEAN_ABS_DIFF, mad
