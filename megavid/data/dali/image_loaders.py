"""The DALI loaders that decode with ``fn.decoders.image``: :class:`FramesDaliLoader` (frames
shards: T JPEG members per clip) and :class:`ImageDaliLoader` (image shards: one JPEG/PNG per
sample, a 1-frame clip repeated to T). Order, cursor, state, pipeline lifetime, feed and
quarantine: :class:`DaliLoader`'s."""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch

from megavid.data.dali.devices import get_image_decoder_device
from megavid.data.dali.feed import Prepared
from megavid.data.dali.loader import DaliLoader, _Sample
from megavid.data.dali.pipelines import build_frames_pipeline, dali_to_torch
from megavid.data.dali.plan import plan_times
from megavid.data.frames import frames_at
from megavid.data.order import _SampleFailed
from megavid.errors import DataError
from megavid.shards.format import FRAMES_CODEC, get_frame_times

MAX_GAP_BYTES = 1 << 16
"""Frames of a clip closer than this in the tar are read together: one ``pread`` from the
first to the last (the members in between read and ignored), instead of one per frame. A
clip's sampled frames are usually a few members apart, so a clip is usually one read; sparse
frames of a long clip (stored frames x frame size between them beyond this) are read apart
rather than reading the whole clip."""


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

    def _dali_inputs(self, p: Prepared, clips: list[int] | None = None) -> tuple:
        """One DALI sample per image: JPEG/PNG bytes, and its clip's box and flip."""
        sel = slice(None) if clips is None else clips
        items = p.items[sel]  # [B, K, 3]
        k = items.shape[1]
        images = [p.chunks[c][o:o + s] for c, o, s in items.reshape(-1, 3).tolist()]
        roi = p.roi[sel]
        if k == 1:
            return (images, np.ascontiguousarray(roi[:, :2]), np.ascontiguousarray(roi[:, 2:]),
                    np.ascontiguousarray(p.flip[sel]))
        return (images, np.repeat(roi[:, :2], k, axis=0), np.repeat(roi[:, 2:], k, axis=0),
                np.repeat(p.flip[sel], k))


class FramesDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over frames shards: the same order, cursor, state, quarantine and
    per-sample draws, with the clip's frames read as JPEG members and decoded by
    ``fn.decoders.image`` ("mixed": hardware JPEG engines; "cpu": DALI's CPU decoder).

    Frames: the video path's timestamps (:func:`megavid.data.dali.plan.plan_times`), each
    taking the stored frame on screen (:func:`megavid.data.frames.frames_at`); only the runs of
    members that hold those T JPEGs are read (usually one ``pread`` per clip:
    :data:`MAX_GAP_BYTES`), at the offsets of ``index.jsonl``. Crop box and flip: ``plan_box``'s
    draws over the stored frame size. ``Prepared.frames`` holds the stored frame indices.
    Arguments: as :class:`DaliLoader`.
    """

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

    def _read_bytes(self, rows: np.ndarray) -> np.ndarray:
        # at most the sample's frames, first to last
        return np.array([int(s[-1].sum() - s[0, 0]) for s in (self.table.frames[r] for r in rows)],
                        dtype=np.int64)

    def _load(self, index: int, epoch: int) -> _Sample:
        meta, caption = self._load_meta(index, epoch)
        try:
            float(meta["fps"]), int(meta["num_frames"])  # as plan_clip requires
            height, width = int(meta["height"]), int(meta["width"])
            ts = plan_times(meta, index, num_frames=self.cfg.num_frames, train=self.train,
                            seed=self.seed, epoch=epoch)
            stored = frames_at(get_frame_times(meta), ts)
            roi, flip = self._plan_box(meta, index, epoch, height, width)
        except (KeyError, TypeError, ValueError) as e:
            raise _SampleFailed("decode_error", f"sample {meta.get('key')!r}: JSON lacks "
                                f"duration/fps/num_frames/width/height ({e}); re-create the "
                                "shards with megavid") from e
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        spans = self.frame_spans[index]
        wanted = stored.tolist()
        if max(wanted) >= len(spans):
            raise _SampleFailed("bad_json", f"the JSON lists more frames than the tar holds "
                                f"({len(spans)})")
        return meta, caption, stored.astype(np.int32), roi, flip, *self._read_frames(
            index, spans.tolist(), wanted)

    def _read_frames(self, index: int, spans: list[list[int]], wanted: list[int]
                     ) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """Read frames ``wanted`` of sample ``index`` (``spans``: its frames' [offset, size]):
        one read per run of frames less than :data:`MAX_GAP_BYTES` apart. Returns the chunks
        read and, per wanted frame, (chunk, offset in it, size)."""
        runs: list[list[int]] = []  # [first offset, end] of each read
        where: dict[int, tuple[int, int]] = {}  # frame -> (run, its offset)
        for t in sorted(set(wanted), key=lambda f: spans[f][0]):
            off, size = spans[t]
            if not runs or off - runs[-1][1] > MAX_GAP_BYTES or off < runs[-1][0]:
                runs.append([off, off + size])
            else:
                runs[-1][1] = max(runs[-1][1], off + size)
            where[t] = (len(runs) - 1, off)
        chunks = [self._read_chunk(index, lo, hi - lo) for lo, hi in runs]
        items = []
        for t in wanted:
            run, off = where[t]
            items.append((run, off - runs[run][0], spans[t][1]))
        return chunks, items

    def _to_clip(self, out, p: Prepared) -> torch.Tensor:
        frames = dali_to_torch(out)  # [B*T, C, H, W]
        return frames.view(len(p.indices), self.cfg.num_frames, *frames.shape[1:])


# --------------------------------------------------------------------------------------------
# Image shards: fn.decoders.image, 1-frame clips
# --------------------------------------------------------------------------------------------
class ImageDaliLoader(_ImageDecoderLoader):
    """:class:`DaliLoader` over image shards (``{key}.jpg|.jpeg|.png`` + ``{key}.json``): every
    image is a 1-frame clip, decoded once by ``fn.decoders.image`` (the frames pipeline with
    one DALI sample per image) and repeated to ``num_frames`` frames, as the PyAV loader's
    ``pyav_backend.decode_image`` does, so images and videos share one batch shape.

    Crop box and flip: :func:`megavid.data.dali.plan.plan_box` over the image size read from
    the file header (PIL parses the header only; no decode in Python), the draws
    ``transform_clip`` makes on the PyAV path. Order, cursor, state, resampled mode,
    quarantine: :class:`DaliLoader`'s. Arguments: as :class:`DaliLoader`.
    """

    def _get_codec(self) -> str:
        return "image"  # image JSONs need not record a codec; fn.decoders.image reads both

    def _get_device(self, requested: str) -> str:
        return get_image_decoder_device(requested, "image shards")

    def _load(self, index: int, epoch: int) -> _Sample:
        from PIL import Image, UnidentifiedImageError

        meta, caption = self._load_meta(index, epoch)
        meta["is_image"] = True  # as the PyAV loader marks image samples
        offset, size = self.table.video[index].tolist()
        chunk = self._read_chunk(index, offset, size)
        try:
            with Image.open(io.BytesIO(chunk.tobytes())) as im:  # header only: the box's size
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise _SampleFailed("decode_error", f"cannot decode image: {e}") from e
        roi, flip = self._plan_box(meta, index, epoch, height, width)
        return (meta, caption, np.zeros(1, np.int32), roi, flip, [chunk],
                [(0, 0, int(chunk.size))])

    def _images_per_clip(self) -> int:
        return 1  # decoded once, repeated to num_frames in _to_clip

    def _to_clip(self, out, p: Prepared) -> torch.Tensor:
        images = dali_to_torch(out)  # [B, C, H, W]
        # T copies (not a stride-0 view): consumers may normalise the batch in place
        return images.unsqueeze(1).expand(-1, self.cfg.num_frames, -1, -1, -1).contiguous()
