"""Joint image-video training (TESTA's ``--sep_img``): every train batch mixes clips from the
video shards (``data.train``) with images from the image shards (``data.image_train``) in the
fixed ratio ``data.image_ratio``.

Each source is a loader of its own (own permutation, cursor and epochs), so the resume contract
of :mod:`megavid.data.loader` holds for both: ``state_dict()`` = {"video": ..., "image": ...}.
Every rank takes the same number of clips and images per step, so all ranks' batches have the
same composition and shapes. Bad samples follow each source's loader rules (a replacement is
never already in that source's part of the batch; each distinct bad sample counted once per
epoch of its source and logged once); ``failures`` sums the two.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable, Iterator

import torch

from megavid.config import DataConfig
from megavid.data.loader import build_pyav_loader
from megavid.errors import ConfigError, DataError


def get_image_batch_size(data_cfg: DataConfig) -> int:
    """Images per rank per train batch: ``batch_size x image_ratio``, checked to be whole.

    Raises:
        ConfigError: the ratio is out of range, has no image shards, or does not split the
            batch into whole numbers of images and videos.
    """
    b, r = data_cfg.batch_size, data_cfg.image_ratio
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"data.image_ratio={r} must be in [0, 1) (the rest of each batch is "
                          "video); train on images alone by pointing data.train at image shards")
    if r > 0 and not data_cfg.image_train:
        raise ConfigError(f"data.image_ratio={r} needs image shards: set data.image_train")
    n_img = round(b * r)
    if abs(n_img - b * r) > 1e-6 or (r > 0 and n_img == 0):
        raise ConfigError(
            f"data.image_ratio={r} x data.batch_size={b} = {b * r:g} images per batch is not a "
            "positive whole number; pick a ratio that is a multiple of 1/batch_size")
    return n_img


def build_mixed_loader(data_cfg: DataConfig, video_builder: Callable[..., Any] | None = None, *,
                       rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0
                       ) -> "MixedLoader":
    """Train batches mixing video shards (``data.train``) and image shards
    (``data.image_train``) with ``data.image_ratio`` of every batch from images.

    Args:
        data_cfg: the data config (batch_size is the per-rank total of both sources).
        video_builder: builder of the video part (a ``LOADER_BACKENDS`` entry; default PyAV).
            The image part always uses the PyAV loader (PIL decode).
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: the epoch to start in (of the video source).
    """
    n_img = get_image_batch_size(data_cfg)
    video_cfg = dataclasses.replace(data_cfg, batch_size=data_cfg.batch_size - n_img,
                                    image_ratio=0.0)
    image_cfg = dataclasses.replace(data_cfg, batch_size=n_img, image_ratio=0.0,
                                    train=data_cfg.image_train)
    video = (video_builder or build_pyav_loader)(video_cfg, "train", train=True, rank=rank,
                                                 world_size=world_size, seed=seed, epoch=epoch)
    # A seed of its own for the image source: its order is independent of the video order.
    image = build_pyav_loader(image_cfg, "train", train=True, rank=rank, world_size=world_size,
                              seed=seed + 1, epoch=0)
    return MixedLoader(video, image)


class MixedLoader:
    """Joint image-video training batches (TESTA's ``--sep_img``): each rank's batch is the
    video loader's batch followed by the image loader's, so every rank (and every step) has the
    same composition: ``batch_size x (1 - image_ratio)`` clips then ``batch_size x image_ratio``
    images (``meta[i]["is_image"]``).

    The video source defines the epoch (``__len__``, ``set_epoch``); the image source runs on
    its own cursor and epochs, starting its next epoch whenever it runs out. ``state_dict()``
    holds both cursors, so a resume continues each source exactly where it stopped.

    Args:
        video: the video loader (any backend with the loader contract).
        image: the image loader (PyAV loader over image shards).
    """

    def __init__(self, video: Any, image: Any) -> None:
        self.video = video
        self.image = image
        self._image_iter: Iterator[dict[str, Any]] | None = None
        self._batches = 0
        self._wait_s = 0.0

    def stats(self) -> dict[str, float]:
        """The counters of :mod:`megavid.data.loader` ("Counters") over the mixed batches: the
        two sources' pipeline builds and feed CPU summed, the wait for both parts of a batch."""
        v, i = self.video.stats(), self.image.stats()
        n = max(1, self._batches)
        feed = (v["feed_ms_per_batch"] * v["batches"] + i["feed_ms_per_batch"] * i["batches"])
        return {"pipeline_builds": v["pipeline_builds"] + i["pipeline_builds"],
                "batches": float(self._batches), "feed_ms_per_batch": feed / n,
                "decode_wait_ms_per_batch": 1e3 * self._wait_s / n}

    @property
    def failures(self) -> Counter:
        """Bad samples skipped by both sources, by reason: each source counts each distinct bad
        sample once per epoch of its own (``megavid.data.loader``, "Counting"), so a bad image
        counts once per pass over the image shards."""
        return Counter(self.video.failures) + Counter(self.image.failures)

    def __len__(self) -> int:
        return len(self.video)

    def set_epoch(self, epoch: int) -> None:
        """Set the video source's epoch (the image source keeps its own)."""
        self.video.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """{"video": video loader state, "image": image loader state}."""
        return {"video": self.video.state_dict(), "image": self.image.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore both sources' positions.

        Raises:
            DataError: the state is not a mixed loader's (saved without data.image_ratio).
        """
        if "video" not in sd or "image" not in sd:
            raise DataError("loader state was saved without image mixing but this run has "
                            "data.image_ratio > 0; resume with the same data config or start a "
                            "new run")
        self._close_image()
        self.video.load_state_dict(sd["video"])
        self.image.load_state_dict(sd["image"])

    def _close_image(self) -> None:
        if self._image_iter is not None:
            self._image_iter.close()  # shuts its DataLoader workers; its cursor stays put
            self._image_iter = None

    def _next_image(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch change per batch
            if self._image_iter is None:
                self._image_iter = iter(self.image)
            try:
                return next(self._image_iter)
            except StopIteration:
                self._image_iter = None  # the image loader moved to its next epoch
        raise DataError("the image shards (data.image_train) yield no batch; add images or "
                        "lower data.image_ratio")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            videos = iter(self.video)
            while True:
                t0 = time.perf_counter()
                vb = next(videos, None)
                if vb is None:
                    break
                ib = self._next_image()
                self._wait_s += time.perf_counter() - t0
                self._batches += 1
                yield {
                    "video": torch.cat([vb["video"], ib["video"]]),
                    "input_ids": torch.cat([vb["input_ids"], ib["input_ids"]]),
                    "attention_mask": torch.cat([vb["attention_mask"], ib["attention_mask"]]),
                    "captions": vb["captions"] + ib["captions"],
                    "keys": vb["keys"] + ib["keys"],
                    "meta": vb["meta"] + ib["meta"],
                    "valid": torch.cat([vb["valid"], ib["valid"]]),
                    "indices": torch.cat([vb["indices"], ib["indices"]]),
                    "is_image": torch.tensor([False] * len(vb["keys"]) + [True] * len(ib["keys"])),
                }
        finally:
            # a pass that stops early (or ends) must not leave image workers behind; the
            # image cursor already counts only the batches handed out
            self._close_image()

