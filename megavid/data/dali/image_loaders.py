"""The DALI loaders that decode with ``fn.decoders.image``: :class:`FramesDaliLoader` (frames
shards: T JPEG members per clip) and :class:`ImageDaliLoader` (image shards: one JPEG/PNG per
sample, a 1-frame clip repeated to T). Order, cursor, state, quarantine: :class:`DaliLoader`'s."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from megavid.data.dali.devices import get_image_decoder_device
from megavid.data.dali.loader import DaliLoader, _Prepared
from megavid.data.dali.pipelines import build_frames_pipeline, dali_to_torch
from megavid.data.dali.plan import ClipPlan, plan_box, plan_clip
from megavid.data.frames import sample_clip_frames
from megavid.data.order import _SampleFailed
from megavid.errors import DataError
from megavid.shards.format import FRAMES_CODEC


@dataclass(slots=True)
class _FramesPrepared(_Prepared):
    """A prepared batch of a frames loader: ``encoded[i]`` is the list of the clip's T JPEGs."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        jpegs, starts, ends, flips = [], [], [], []
        for frames, p in zip(self.encoded[sel], self.plans[sel]):
            flip = np.array(int(p.flip), dtype=np.int32)
            for jpeg in frames:
                jpegs.append(jpeg)
                starts.append(p.roi_start)
                ends.append(p.roi_end)
                flips.append(flip)
        return jpegs, starts, ends, flips


class _ImageDecoderLoader(DaliLoader):
    """Base of the loaders that decode with ``fn.decoders.image`` (:func:`build_frames_pipeline`):
    one DALI sample per JPEG/PNG, ``_images_per_clip()`` of them per clip."""

    def _images_per_clip(self) -> int:
        return self.cfg.num_frames

    def _build_pipeline(self, source: Callable, *, batch_size: int, num_threads: int,
                        prefetch: int):
        return build_frames_pipeline(source, batch_size=batch_size * self._images_per_clip(),
                                     img_size=self.cfg.img_size, device=self.device,
                                     device_id=self.device_id, num_threads=num_threads,
                                     prefetch=prefetch, seed=self.seed)


class FramesDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over frames shards: the same order, cursor, state, quarantine and
    per-sample draws, with the clip's frames read as JPEG members and decoded by
    ``fn.decoders.image`` ("mixed": hardware JPEG engines; "cpu": DALI's CPU decoder).

    Frames: the video path's timestamps (:func:`megavid.data.frames.sample_clip_frames`), each
    taking the stored frame on screen; only those T JPEGs are read (``pread`` at the offsets of
    ``index.jsonl``). Crop box and flip: ``plan_clip``'s draws over the stored frame size.
    ``ClipPlan.frames`` holds the stored frame indices. Arguments: as :class:`DaliLoader`.
    """

    _prepared_cls = _FramesPrepared

    def __init__(self, data_cfg, split: str, **kw: Any) -> None:
        super().__init__(data_cfg, split, **kw)
        if self.table.frames is None:
            raise DataError(f"split '{split}' mixes frames and video shards, or a frames sample "
                            "has no frame members; re-create the frames shards")
        # per sample, the [offset, size] of each stored frame (from index.jsonl)
        self.frame_spans: list[np.ndarray] = self.table.frames

    def _get_device(self, requested: str) -> str:
        if self.codec != FRAMES_CODEC:
            raise DataError(f"the shards hold {self.codec} videos, not frames; use the video "
                            "DALI loader (build_dali_loader picks it)")
        return get_image_decoder_device(requested, "frames shards")

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, list[np.ndarray]]:
        meta, caption = self._load_meta(index, epoch)
        try:
            # crop box + flip over the stored frame size (frames replaced below)
            plan = plan_clip(meta, index, num_frames=self.cfg.num_frames,
                             img_size=self.cfg.img_size, train=self.train, seed=self.seed,
                             epoch=epoch, random_flip=self.cfg.random_flip,
                             crop_scale=self.cfg.crop_scale,
                             shard=self._where(index)[0])
            _, stored = sample_clip_frames(meta, index, num_frames=self.cfg.num_frames,
                                           train=self.train, seed=self.seed, epoch=epoch)
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        spans = self.frame_spans[index]
        if int(stored.max()) >= len(spans):
            raise _SampleFailed("bad_json", f"the JSON lists more frames than the tar holds "
                                f"({len(spans)})")
        plan.frames = stored.astype(np.int32)
        return meta, caption, plan, self._read_frames(index, spans[stored])

    def _read_frames(self, index: int, spans: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes at ``spans`` ([T, 2] offset, size) of sample ``index``'s tar."""
        out = []
        try:
            with open(self.table.tars[int(self.table.tar_id[index])], "rb") as f:
                for offset, size in spans.tolist():
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise _SampleFailed("truncated_shard",
                                            f"frame ends after {len(data)} of {size} bytes")
                    out.append(np.frombuffer(data, dtype=np.uint8))
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        return out

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        frames = dali_to_torch(out)  # [B*T, C, H, W]
        return frames.view(len(p.indices), self.cfg.num_frames, *frames.shape[1:])


# --------------------------------------------------------------------------------------------
# Image shards: fn.decoders.image, 1-frame clips
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _ImagePrepared(_Prepared):
    """A prepared batch of an image loader: ``encoded[i]`` is one JPEG/PNG, decoded once."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        plans = self.plans[sel]
        return (self.encoded[sel], [p.roi_start for p in plans], [p.roi_end for p in plans],
                [np.array(int(p.flip), dtype=np.int32) for p in plans])


class ImageDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over image shards (``{key}.jpg|.jpeg|.png`` + ``{key}.json``): every
    image is a 1-frame clip, decoded once by ``fn.decoders.image`` (the frames pipeline with
    one DALI sample per image) and repeated to ``num_frames`` frames, as the PyAV loader's
    ``pyav_backend.decode_image`` does, so images and videos share one batch shape.

    Crop box and flip: :func:`plan_box` over the image size read from the file header (PIL
    parses the header only; no decode in Python), the draws ``transform_clip`` makes on the
    PyAV path. Order, cursor, state, resampled mode, quarantine: :class:`DaliLoader`'s.
    Arguments: as :class:`DaliLoader`.
    """

    _prepared_cls = _ImagePrepared

    def _get_codec(self) -> str:
        return "image"  # image JSONs need not record a codec; fn.decoders.image reads both

    def _get_device(self, requested: str) -> str:
        return get_image_decoder_device(requested, "image shards")

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        meta, caption = self._load_meta(index, epoch)
        meta["is_image"] = True  # as the PyAV loader marks image samples
        data = self._read(index, self.table.video)
        try:
            with Image.open(io.BytesIO(data)) as im:  # header only: the size for the box
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise _SampleFailed("decode_error", f"cannot decode image: {e}") from e
        roi_start, roi_end, flip = plan_box(
            meta, index, height=height, width=width, img_size=self.cfg.img_size,
            train=self.train, seed=self.seed, epoch=epoch, random_flip=self.cfg.random_flip,
            crop_scale=self.cfg.crop_scale)
        shard, key = self._where(index)
        plan = ClipPlan(index=index, shard=shard, key=key, frames=np.zeros(1, dtype=np.int32),
                        roi_start=roi_start, roi_end=roi_end, flip=flip)
        return meta, caption, plan, np.frombuffer(data, dtype=np.uint8)

    def _images_per_clip(self) -> int:
        return 1  # decoded once, repeated to num_frames in _to_clip

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        images = dali_to_torch(out)  # [B, C, H, W]
        # T copies (not a stride-0 view): consumers may normalise the batch in place
        return images.unsqueeze(1).expand(-1, self.cfg.num_frames, -1, -1, -1).contiguous()
