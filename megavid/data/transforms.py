"""Clip transforms on uint8 video [T, C, H, W] (torch), and normalization on the device.

Train: random resized crop (area scale and aspect ratio drawn from the sample's "augment" rng)
then resize to ``img_size`` x ``img_size``, optionally a horizontal flip. The crop box is chosen
on the decoded frame and resized once, which equals "short-side resize, then random resized
crop" up to interpolation, at one resize instead of two.
Eval: short-side resize to ``img_size``, then centre crop.

Flip policy (caption-aware): a clip is flipped only when none of its texts (captions, QA
questions and answers) mentions a horizontal direction (left, right, clockwise, ...). Flipping
such a clip would make its caption wrong, and rewriting the text ("left" <-> "right") breaks
for QA answers and idioms ("right away"), so those clips are simply never flipped.

The same box/flip parameters are applied to every frame: a clip is transformed as one image.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DIRECTION_WORDS = re.compile(
    r"\b(left|right|leftwards?|rightwards?|leftmost|rightmost|clockwise|counterclockwise|"
    r"anticlockwise|counter-clockwise|anti-clockwise)\b",
    re.IGNORECASE,
)


def is_flip_safe(texts: list[str]) -> bool:
    """True when no text names a horizontal direction, so a mirrored clip still matches it.

    Args:
        texts: every text attached to the sample (captions, QA questions/answers/choices).
    """
    return not any(_DIRECTION_WORDS.search(t) for t in texts)


def sample_texts(meta: dict) -> list[str]:
    """Every text of a sample JSON (captions, QA questions, answers and choices): what
    :func:`is_flip_safe` must check."""
    caps = meta.get("captions") or []
    texts = [str(c) for c in ([caps] if isinstance(caps, str) else caps)]
    for qa in meta.get("qa") or []:
        if isinstance(qa, dict):
            texts += [str(qa.get("question", "")), str(qa.get("answer", ""))]
            texts += [str(c) for c in qa.get("choices") or []]
    return texts


def resize(video_TCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 frames to ``size`` = (H, W); returns uint8."""
    if tuple(video_TCHW.shape[-2:]) == tuple(size):
        return video_TCHW
    # torch's uint8 antialiased bilinear kernel (CPU, AVX2) is ~5x faster than a float round
    # trip and within 1 level of it; the output stays uint8 (no clamping needed).
    return F.interpolate(video_TCHW, size=size, mode="bilinear", align_corners=False,
                         antialias=True)


def resize_short_side(video_TCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (uint8)."""
    h, w = video_TCHW.shape[-2:]
    if h <= w:
        new = (size, max(size, int(round(w * size / h))))
    else:
        new = (max(size, int(round(h * size / w))), size)
    return resize(video_TCHW, new)


def center_crop(video_TCHW: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` square (the frame must be at least that large)."""
    h, w = video_TCHW.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return video_TCHW[..., top:top + size, left:left + size]


def get_random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect ``ratio``.

    torchvision's RandomResizedCrop algorithm (10 tries, then a centre crop of the clamped
    ratio), drawing from a numpy generator so the box is reproducible from the sample's seed.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform_clip(
    video_TCHW: torch.Tensor,
    img_size: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    allow_flip: bool = False,
    scale: tuple[float, float] = (0.5, 1.0),
) -> torch.Tensor:
    """Crop and resize a decoded clip to uint8 [T, C, img_size, img_size].

    Args:
        video_TCHW: uint8 frames [T, C, H, W].
        img_size: output height and width.
        train: random resized crop (+ optional flip) when True; short-side resize + centre
            crop when False.
        rng: the sample's "augment" generator (required when ``train``).
        allow_flip: flip with probability 0.5 (train only). Pass
            ``data_cfg.random_flip and is_flip_safe(texts)``.
        scale: area range of the random resized crop (``data.crop_scale``).
    """
    if video_TCHW.dtype != torch.uint8 or video_TCHW.dim() != 4:
        raise ValueError(f"expected uint8 [T, C, H, W], got {video_TCHW.dtype} "
                         f"{tuple(video_TCHW.shape)}")
    if not train:
        return center_crop(resize_short_side(video_TCHW, img_size), img_size).contiguous()
    if rng is None:
        raise ValueError("transform_clip(train=True) needs an rng")
    top, left, h, w = get_random_resized_crop_box(*video_TCHW.shape[-2:], rng, scale)
    out = resize(video_TCHW[..., top:top + h, left:left + w], (img_size, img_size))
    # Draw the flip coin even when flipping is off, so the stream does not depend on config.
    if rng.random() < 0.5 and allow_flip:
        out = out.flip(-1)
    return out.contiguous()


def normalize_clip(video_u8: torch.Tensor, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, T, C, H, W] (CPU) -> ImageNet-normalized float on ``device`` in ``dtype``.

    The uint8 tensor is moved first (4x fewer bytes over PCIe than float) and converted there.

    Args:
        video_u8: the loader's ``batch["video"]``.
        device: where the model runs.
        dtype: the model's input dtype (float32, bfloat16, float16).
    """
    x = video_u8.to(device, non_blocking=True).to(torch.float32).div_(255.0)
    shape = (1,) * (x.dim() - 3) + (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(shape)
    return x.sub_(mean).div_(std).to(dtype)
