"""``data.name=synthetic``: random clips and fixed captions, no files."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Iterator

import torch

from megavid.config import DataConfig
from megavid.data.text import get_cached_tokenizer, tokenize


class SyntheticLoader:
    """Random clips and fixed captions, no files (``data.name=synthetic``): for engine tests
    and throughput runs without decoding. Same batch contract and state API; 64 batches/epoch."""

    steps_per_epoch = 64

    def __init__(self, data_cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0) -> None:
        self.cfg = data_cfg
        self.train = train
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.batch_size = data_cfg.batch_size if train else data_cfg.eval_batch_size
        self.cursor = 0
        self.failures: Counter = Counter()
        self._tokenizer = get_cached_tokenizer(data_cfg.tokenizer)
        self._batches = 0
        self._make_s = 0.0

    def stats(self) -> dict[str, float]:
        """The loader counters of :mod:`megavid.data.loader` ("Counters"): no pipeline and no
        feed; the wait is the time spent drawing a batch's random tensors."""
        n = max(1, self._batches)
        return {"pipeline_builds": 0.0, "batches": float(self._batches),
                "feed_ms_per_batch": 0.0, "decode_wait_ms_per_batch": 1e3 * self._make_s / n}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_samples": self.steps_per_epoch * self.batch_size * self.world_size}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.epoch, self.cursor, self.seed = int(sd["epoch"]), int(sd["cursor"]), int(sd["seed"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        b, g, c = self.batch_size, self.batch_size * self.world_size, self.cfg
        while self.cursor < self.steps_per_epoch * g:
            t0 = time.perf_counter()
            first = self.cursor + self.rank * b
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, first)) % 2**62)
            video = torch.randint(0, 256, (b, c.num_frames, 3, c.img_size, c.img_size),
                                  dtype=torch.uint8, generator=gen)
            captions = [f"synthetic clip {first + j}" for j in range(b)]
            ids, mask = tokenize(self._tokenizer, captions, c.max_text_len)
            self.cursor += g
            self._make_s += time.perf_counter() - t0
            self._batches += 1
            yield {"video": video, "input_ids": ids, "attention_mask": mask,
                   "captions": captions, "keys": [f"syn{first + j}" for j in range(b)],
                   "meta": [{} for _ in range(b)], "valid": torch.ones(b, dtype=torch.bool),
                   "indices": torch.arange(first, first + b)}
        if self.train:
            self.epoch += 1
        self.cursor = 0
