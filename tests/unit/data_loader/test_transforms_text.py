"""Clip transforms (torchvision as the resize/normalize oracle) and the offline tokenizer
(ids checked against the package's vocab.txt)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from megavid.data.text import build_tokenizer, get_tokenizer_path, tokenize
from megavid.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    get_random_resized_crop_box,
    is_flip_safe,
    normalize_clip,
    resize_short_side,
    sample_texts,
    transform_clip,
)
from megavid.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _video(t=2, h=40, w=80, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8, generator=g)


def test_eval_is_short_side_resize_then_centre_crop():
    v = _video(h=32, w=64)  # short side already 32: a pure crop of columns 16..47
    torch.testing.assert_close(transform_clip(v, 32, train=False), v[..., :, 16:48])
    v = _video(h=90, w=40)  # portrait: resize to 72x32, then rows 20..51
    ref = TF.resize(v.float(), [72, 32], antialias=True).round().clamp(0, 255)
    out = transform_clip(v, 32, train=False)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert (out.float() - ref[..., 20:52, :]).abs().max() <= 1
    assert resize_short_side(_video(h=40, w=80), 32).shape[-2:] == (32, 64)


def test_random_resized_crop_box_properties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = get_random_resized_crop_box(60, 100, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 100
        assert 0.5 * 6000 * 0.95 <= h * w <= 6000
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # data.crop_scale: the area range is the caller's; [1, 1] on a square frame is the frame
    for _ in range(100):
        top, left, h, w = get_random_resized_crop_box(60, 100, rng, (0.2, 0.3))
        assert 0.2 * 6000 * 0.9 <= h * w <= 0.3 * 6000 * 1.1
    assert get_random_resized_crop_box(48, 48, rng, (1.0, 1.0)) == (0, 0, 48, 48)
    v = _video(h=32, w=32)
    torch.testing.assert_close(transform_clip(v, 32, train=True, rng=rng, scale=(1.0, 1.0)), v)


def test_train_crop_is_reproducible_and_same_box_for_all_frames():
    v = torch.zeros(3, 3, 48, 64, dtype=torch.uint8)
    v += torch.arange(64, dtype=torch.uint8).view(1, 1, 1, 64)  # a horizontal ramp
    v[1] += 50  # frame 1 = frame 0 + 50 everywhere
    a = transform_clip(v, 32, train=True, rng=np.random.default_rng(5))
    b = transform_clip(v, 32, train=True, rng=np.random.default_rng(5))
    torch.testing.assert_close(a, b)
    assert ((a[1].int() - a[0].int()) == 50).all()  # one box for the whole clip
    # the crop is the resized box of torchvision's functional crop, with the same draws
    top, left, h, w = get_random_resized_crop_box(48, 64, np.random.default_rng(5))
    ref = TF.resized_crop(v.float(), top, left, h, w, [32, 32], antialias=True).round()
    assert (a.float() - ref).abs().max() <= 1


def test_flip_is_caption_aware():
    assert is_flip_safe(["a red ball bounces"])
    assert not is_flip_safe(["a red ball moves Left"])
    assert not is_flip_safe(["ok", "it spins clockwise"])
    assert is_flip_safe(["a bright ball"])  # 'right' only as a whole word
    meta = {"captions": ["a ball"], "qa": [{"question": "where?", "answer": "up",
                                            "choices": ["up", "right"]}]}
    assert sample_texts(meta) == ["a ball", "where?", "up", "up", "right"]
    v = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    v[..., :16] = 255  # left half white
    flipped = 0
    for seed in range(40):
        out = transform_clip(v, 32, train=True, rng=np.random.default_rng(seed), allow_flip=True)
        ref = transform_clip(v, 32, train=True, rng=np.random.default_rng(seed), allow_flip=False)
        if torch.equal(out, ref.flip(-1)) and not torch.equal(out, ref):
            flipped += 1
        else:
            assert torch.equal(out, ref)
    assert 8 <= flipped <= 32  # a fair coin


def test_normalize_clip_matches_torchvision():
    v = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    out = normalize_clip(v, "cpu", torch.float32)
    ref = TF.normalize(v.float().div(255).flatten(0, 1), list(IMAGENET_MEAN),
                       list(IMAGENET_STD)).view(2, 3, 3, 8, 8)
    torch.testing.assert_close(out, ref)
    assert normalize_clip(v, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_tokenizer_matches_vocab_file():
    tok = build_tokenizer("minilm")
    vocab = (get_tokenizer_path("minilm") / "vocab.txt").read_text().splitlines()
    vid = {w: i for i, w in enumerate(vocab)}
    ids, mask = tokenize(tok, ["A RED ball moves left", "hi"], 10)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (2, 10)
    expect = [vid[w] for w in ["[CLS]", "a", "red", "ball", "moves", "left", "[SEP]"]]
    assert ids[0, :7].tolist() == expect and (ids[0, 7:] == vid["[PAD]"]).all()
    assert mask[0].tolist() == [1] * 7 + [0] * 3 and mask[1].sum() == 3
    ids, mask = tokenize(tok, ["one two three four five six"], 4)  # truncation keeps [SEP]
    assert ids[0].tolist() == [vid["[CLS]"], vid["one"], vid["two"], vid["[SEP]"]]


def test_tokenizer_from_folder_and_bad_name(tmp_path):
    tok = build_tokenizer(str(get_tokenizer_path("minilm")))
    assert tok.vocab_size == 30522
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer("no-such-tokenizer")
    with pytest.raises(ConfigError, match="vocab.txt"):
        build_tokenizer(str(tmp_path))
