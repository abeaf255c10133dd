"""Per-sample plans for the DALI pipelines: frame indices, crop box and flip, drawn from the
sample's generators exactly as the PyAV path draws them (:mod:`megavid.data.sampling`,
:mod:`megavid.data.transforms`).

The loaders' feed stage calls :func:`plan_times` and :func:`plan_box` (no object per sample;
the generators built by :func:`megavid.data.order.get_fast_sample_rng`); :func:`plan_clip` is
the same plan as one :class:`ClipPlan` (tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megavid.data.order import get_fast_sample_rng
from megavid.data.sampling import sample_timestamps, timestamps_to_indices
from megavid.data.transforms import get_random_resized_crop_box, is_flip_safe, sample_texts
from megavid.errors import DataError


@dataclass(slots=True)
class ClipPlan:
    """Everything DALI needs for one sample, decided in Python from the sample's generators."""

    index: int
    """Global sample index (line of the split's index)."""
    shard: str
    key: str
    frames: np.ndarray
    """int32 [T] frame indices (``timestamps_to_indices`` of ``sample_timestamps``)."""
    roi_start: np.ndarray
    """float32 [2] (y, x) of the crop box's top-left corner, in source pixels."""
    roi_end: np.ndarray
    """float32 [2] (y, x) of the crop box's bottom-right corner."""
    flip: bool


def plan_clip(
    meta: dict[str, Any],
    index: int,
    *,
    num_frames: int,
    img_size: int,
    train: bool,
    seed: int,
    epoch: int,
    random_flip: bool = False,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    shard: str = "",
) -> ClipPlan:
    """Frame indices, crop box and flip of one sample: the draws PyAV's path makes.

    Frames: ``sample_timestamps`` with the sample's "frames" generator, then
    ``timestamps_to_indices`` (the frame on screen, clamped). Box and flip: eval is the short-side
    resize + centre crop of :func:`megavid.data.transforms.transform_clip` expressed as a box
    in source pixels (the same sampling grid, resampled once); train draws
    ``get_random_resized_crop_box`` and then the flip coin from the "augment" generator, in
    that order, exactly as ``transform_clip`` does.

    Args:
        meta: the sample JSON (duration, fps, num_frames, width, height, start, end, captions).
        index: the sample's global index (seeds its generators).
        num_frames: frames per clip.
        img_size: output side.
        train: random draws (True) or deterministic eval choices.
        seed: run seed.
        epoch: epoch (seeds train draws).
        random_flip: ``data.random_flip`` (a flip still needs caption-aware safety).
        crop_scale: ``data.crop_scale``.
        shard: the shard file name, recorded in the plan for error messages.
    """
    try:
        fps, n_video = float(meta["fps"]), int(meta["num_frames"])
        height, width = int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"sample {meta.get('key')!r}: JSON lacks duration/fps/num_frames/"
                        f"width/height ({e}); re-create the shards with megavid") from e
    ts = plan_times(meta, index, num_frames=num_frames, train=train, seed=seed, epoch=epoch)
    frames = timestamps_to_indices(ts, fps, n_video).astype(np.int32)
    roi_start, roi_end, flip = plan_box(meta, index, height=height, width=width,
                                        img_size=img_size, train=train, seed=seed, epoch=epoch,
                                        random_flip=random_flip, crop_scale=crop_scale)
    return ClipPlan(index=index, shard=shard, key=str(meta.get("key", "")), frames=frames,
                    roi_start=roi_start, roi_end=roi_end, flip=flip)


def plan_times(meta: dict[str, Any], index: int, *, num_frames: int, train: bool, seed: int,
               epoch: int) -> np.ndarray:
    """The sample's timestamps (float64 [T]): ``sample_timestamps`` over its ``duration`` and
    [start, end] window with its "frames" generator (train), as every backend draws them.

    Raises:
        DataError: the JSON has no usable ``duration``.
    """
    try:
        duration = float(meta["duration"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"sample {meta.get('key')!r}: JSON lacks duration/fps/num_frames/"
                        f"width/height ({e}); re-create the shards with megavid") from e
    rng = get_fast_sample_rng(seed, epoch, index, "frames") if train else None
    return sample_timestamps(num_frames, duration, start=meta.get("start"), end=meta.get("end"),
                             train=train, rng=rng)


def plan_box(meta: dict[str, Any], index: int, *, height: int, width: int, img_size: int,
             train: bool, seed: int, epoch: int, random_flip: bool = False,
             crop_scale: tuple[float, float] = (0.5, 1.0)) -> tuple[np.ndarray, np.ndarray, bool]:
    """Crop box (float32 (y, x) start and end, in source pixels) and flip of one sample: the
    draws ``transform_clip`` makes on a [T, C, height, width] clip (video or image).

    Args:
        meta: the sample JSON (its captions decide whether a flip is caption-safe).
        index: the sample's global index (seeds its "augment" generator).
        height: source height.
        width: source width.
        img_size: output side.
        train: random resized crop + coin (True) or short-side resize + centre crop.
        seed: run seed.
        epoch: epoch.
        random_flip: ``data.random_flip``.
        crop_scale: ``data.crop_scale`` (area range of the random resized crop).
    """
    flip = False
    if train:
        arng = get_fast_sample_rng(seed, epoch, index, "augment")
        top, left, h, w = get_random_resized_crop_box(height, width, arng, crop_scale)
        box = (float(top), float(left), float(top + h), float(left + w))
        # same order of draws as transform_clip: box first, then the coin (always drawn)
        coin = arng.random() < 0.5
        flip = bool(coin and random_flip and is_flip_safe(sample_texts(meta)))
    else:
        # resize_short_side(size) then center_crop(size), as a box in source pixels
        if height <= width:
            new_h, new_w = img_size, max(img_size, int(round(width * img_size / height)))
        else:
            new_h, new_w = max(img_size, int(round(height * img_size / width))), img_size
        top, left = (new_h - img_size) // 2, (new_w - img_size) // 2
        sy, sx = height / new_h, width / new_w
        box = (top * sy, left * sx, (top + img_size) * sy, (left + img_size) * sx)
    return (np.array(box[:2], dtype=np.float32), np.array(box[2:], dtype=np.float32), flip)
