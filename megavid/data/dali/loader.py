"""The DALI loader of video shards (:class:`DaliLoader`): megavid's order, cursor, sampling and
bad-sample rule (the PyAV loader's), with each batch read and planned in Python and decoded by a
DALI pipeline; a batch DALI fails on is taken apart sample by sample and its culprits
quarantined (package docstring: :mod:`megavid.data.dali`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from megavid.data.dali.devices import get_dali_device, get_shard_codec
from megavid.data.dali.pipelines import (
    _first_error_line,
    build_video_pipeline,
    dali_to_torch,
    one_batch_source,
)
from megavid.data.dali.plan import ClipPlan, plan_clip
from megavid.data.dali.quarantine import Quarantine
from megavid.data.loader import VideoTextLoader
from megavid.data.order import _EpochPlan, _SampleFailed, choose_caption, fill_rank_batch
from megavid.data.pyav_backend import trim_to_gops
from megavid.data.table import SampleTable, build_sample_table
from megavid.data.text import build_tokenizer, tokenize
from megavid.errors import DataError


@dataclass(slots=True)
class _Prepared:
    """One batch read and planned in Python, waiting for DALI's output."""

    indices: list[int]
    valid: list[bool]
    metas: list[dict]
    captions: list[str]
    plans: list[ClipPlan]
    encoded: list[np.ndarray]
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    """(index, reason, detail) of every bad sample met while filling the batch (counted and
    logged by ``VideoTextLoader._record_failures`` when the batch is handed out)."""

    def dali_inputs(self, sel: slice = slice(None)) -> tuple:
        plans = self.plans[sel]
        return (self.encoded[sel], [p.frames for p in plans], [p.roi_start for p in plans],
                [p.roi_end for p in plans], [np.array(int(p.flip), dtype=np.int32) for p in plans])


class _PassSource:
    """External-source callback of one pipeline: iteration i reads step ``first_step + i`` of
    the pass ``plan`` (DALI calls it ahead of consumption, up to ``prefetch``)."""

    def __init__(self, loader: "DaliLoader", plan: _EpochPlan, first_step: int, prepared: dict,
                 lock: threading.Lock) -> None:
        self.loader, self.plan, self.first_step = loader, plan, first_step
        self.prepared, self.lock = prepared, lock

    def __call__(self, info) -> tuple:
        s = self.first_step + info.iteration
        if s >= self.plan.steps:
            raise StopIteration
        p = self.loader._prepare(self.plan, s)
        with self.lock:
            self.prepared[s] = p
        return p.dali_inputs()


class DaliLoader(VideoTextLoader):
    """Batches of clips decoded by DALI, with megavid's order, cursor, sampling and quarantine.

    A :class:`megavid.data.loader.VideoTextLoader` (the PyAV loader) whose batches are decoded
    by DALI: it inherits the sample table, permutation, per-rank positions, drop_last / wrap /
    eval-padding rules, resampled mode, ``__iter__``, ``__len__``, ``set_epoch``,
    ``state_dict`` and ``load_state_dict``, so a run can switch backends on resume; only
    ``_iter_plan`` (decode a pass with DALI) is its own. The batch contract is the same ("video",
    "input_ids", "attention_mask", "captions", "keys", "meta", "valid", "indices"); "video" is
    on the GPU for ``device='mixed'`` (no round trip through host memory; ``normalize_clip``
    accepts either).

    A sample that fails (unreadable member, bad JSON, no caption: found in Python; a video
    DALI cannot decode: found by re-decoding the failed batch one sample at a time) is
    quarantined and replaced by the PyAV loader's rule (``fill_rank_batch``), and counted in
    ``failures`` once per epoch; ``data.max_consecutive_failures`` failures in a row raise
    :class:`DataError`.

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' (through ``data_cfg.<split>``) or a shard spec.
        train: random frames/captions/crops/flips, per-epoch shuffling, drop_last.
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: first epoch.
        device: DALI decoder: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.
        quarantine: a :class:`Quarantine` or the path of its JSON file (None:
            ``data_cfg.quarantine``, in memory when that is empty).
        num_threads: DALI CPU threads (None: ``data_cfg.num_workers``, at least 1).
        table: the split's sample table, already built (None: read the split's index).
        codec: the shards' codec, already known (None: read it from the index).
    """

    def __init__(
        self,
        data_cfg,
        split: str,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        device: str = "auto",
        quarantine: Quarantine | str | Path | None = None,
        num_threads: int | None = None,
        table: SampleTable | None = None,
        codec: str | None = None,
    ) -> None:
        if table is None:
            spec = getattr(data_cfg, split) if split in ("train", "val", "test") else split
            table = build_sample_table(spec, data_cfg.root)
        # checks rank/world size and that one global batch fits (same messages as PyAV's)
        super().__init__(table, data_cfg, split=split, train=train, rank=rank,
                         world_size=world_size, seed=seed, epoch=epoch)
        self.codec = self._get_codec() if codec is None else codec
        self.device = self._get_device(device)
        self.device_id = torch.cuda.current_device() if self.device == "mixed" else None
        self.num_threads = max(1, num_threads or data_cfg.num_workers)
        self.prefetch = 2
        if quarantine is None:
            quarantine = getattr(data_cfg, "quarantine", "") or None
        self.quarantine = (quarantine if isinstance(quarantine, Quarantine)
                           else Quarantine(quarantine))
        self.tokenizer = build_tokenizer(data_cfg.tokenizer)

    def _get_codec(self) -> str:
        """The codec of this loader's shards (decides the DALI device)."""
        return get_shard_codec(Path(self.table.tars[0]).parent)

    def _get_device(self, requested: str) -> str:
        """'cpu' or 'mixed' for this loader's shards (raises when they cannot be decoded)."""
        return get_dali_device(self.codec, requested)

    # -- reading and planning --------------------------------------------------------------
    def _where(self, index: int) -> tuple[str, str]:
        return Path(self.table.tars[int(self.table.tar_id[index])]).name, self.table.keys[index]

    def _read(self, index: int, span: np.ndarray) -> bytes:
        offset, size = (int(v) for v in span[index])
        try:
            with open(self.table.tars[int(self.table.tar_id[index])], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise _SampleFailed("read_error", str(e)) from e
        if len(data) != size:
            raise _SampleFailed("truncated_shard", f"member ends after {len(data)} of {size} bytes")
        return data

    def _load(self, index: int, epoch: int) -> tuple[dict, str, ClipPlan, np.ndarray]:
        """Read and plan one sample: (sample JSON, caption, plan, encoded bytes)."""
        meta, caption = self._load_meta(index, epoch)
        try:
            plan = plan_clip(meta, index, num_frames=self.cfg.num_frames,
                             img_size=self.cfg.img_size, train=self.train, seed=self.seed,
                             epoch=epoch, random_flip=self.cfg.random_flip,
                             crop_scale=self.cfg.crop_scale,
                             shard=self._where(index)[0])
        except DataError as e:
            raise _SampleFailed("decode_error", str(e)) from e
        encoded = self._read(index, self.table.video)
        if self.cfg.dali_trim_gops:
            # only the GOPs of the sampled frames: DALI does not seek in memory (FRAMES.md)
            encoded, plan.frames = trim_to_gops(encoded, plan.frames)
        return meta, caption, plan, np.frombuffer(encoded, dtype=np.uint8)

    def _load_meta(self, index: int, epoch: int) -> tuple[dict, str]:
        """Read one sample's JSON and choose its caption (the PyAV loader's choice)."""
        try:
            meta = json.loads(self._read(index, self.table.meta))
        except (ValueError, UnicodeDecodeError) as e:
            raise _SampleFailed("bad_json", str(e)) from e
        return meta, choose_caption(meta, train=self.train, seed=self.seed, epoch=epoch, index=index)

    def _known_bad(self, index: int) -> tuple[str, str] | None:
        """(reason, detail) of a quarantined sample (this run's or a previous one's), else None."""
        record = self.quarantine.get(*self._where(index))
        return None if record is None else (record["reason"], record["detail"])

    def _mark_bad(self, index: int, reason: str, detail: str) -> None:
        """Quarantine a bad sample: never read or decoded again (counted and logged when a
        batch that met it is handed out)."""
        shard, key = self._where(index)
        self.quarantine.add(shard, key, reason, detail)

    def _prepare(self, epoch_plan: _EpochPlan, step: int) -> _Prepared:
        """This rank's part of step ``step`` of the pass ``epoch_plan``: the positions of
        ``VideoTextLoader``, bad samples (quarantined, or failing in Python now) replaced by
        the rule of :func:`megavid.data.order.fill_rank_batch`, as in the PyAV loader. A sample
        DALI cannot decode is found when the batch fails, quarantined, and the batch prepared
        again: the same rule then replaces it, so the batch is the one PyAV's would be."""
        out = self._prepared_cls([], [], [], [], [], [])
        try:
            slots = fill_rank_batch(
                epoch_plan, step, num_samples=self.num_samples, train=self.train,
                seed=self.seed, load=lambda index: self._load(index, epoch_plan.epoch),
                known_bad=self._known_bad, mark_bad=self._mark_bad, failed=out.failed,
                max_failures=self.cfg.max_consecutive_failures, where=self._where)
        except DataError:
            self._record_failures(out.failed)  # the abort's culprits are counted and logged
            raise
        for index, valid, (meta, caption, plan, encoded) in slots:
            out.indices.append(index)
            out.valid.append(valid)
            out.metas.append(meta)
            out.captions.append(caption)
            out.plans.append(plan)
            out.encoded.append(encoded)
        return out

    def _assemble(self, video: torch.Tensor, p: _Prepared) -> dict[str, Any]:
        input_ids, attention_mask = tokenize(self.tokenizer, p.captions, self.cfg.max_text_len)
        return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask,
                "captions": list(p.captions), "keys": [self.table.keys[i] for i in p.indices],
                "meta": p.metas, "valid": torch.tensor(p.valid, dtype=torch.bool),
                "indices": torch.tensor(p.indices, dtype=torch.int64)}

    # -- the DALI part (overridden by FramesDaliLoader) ------------------------------------
    _prepared_cls = _Prepared

    def _build_pipeline(self, source: Callable, *, batch_size: int, num_threads: int,
                        prefetch: int):
        """The built pipeline decoding ``batch_size`` samples per iteration from ``source``."""
        return build_video_pipeline(source, batch_size=batch_size, img_size=self.cfg.img_size,
                                    device=self.device, device_id=self.device_id,
                                    num_threads=num_threads, prefetch=prefetch, seed=self.seed)

    def _to_clip(self, out, p: _Prepared) -> torch.Tensor:
        """The pipeline's output for prepared batch ``p`` -> uint8 [B, T, C, H, W]."""
        return dali_to_torch(out)

    # -- faults ---------------------------------------------------------------------------
    def _decode_alone(self, p: _Prepared, j: int) -> str | None:
        """Decode sample ``j`` of a prepared batch in a 1-sample pipeline of the same kind;
        None if it decodes, else DALI's message."""
        try:
            pipe = self._build_pipeline(one_batch_source(p.dali_inputs(slice(j, j + 1))),
                                        batch_size=1, num_threads=1, prefetch=1)
            pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI reports decode failures as RuntimeError
            return _first_error_line(e)
        return None

    def _quarantine_culprits(self, batches: list[_Prepared], error: Exception) -> int:
        """Quarantine the samples of the failed batch (or, failing that, of the batches DALI
        had prefetched after it) that fail alone. Returns how many."""
        found = 0
        for p in batches:
            for j, index in enumerate(p.indices):
                if self._where(index) in self.quarantine:
                    continue
                problem = self._decode_alone(p, j)
                if problem is not None:
                    self._mark_bad(index, "decode_error", problem)
                    found += 1
            if found:
                return found  # the earliest failing batch is the one DALI reported
        raise DataError(f"DALI failed on a batch but no sample fails alone "
                        f"({_first_error_line(error)}); set data.backend=pyav")

    # -- iteration ------------------------------------------------------------------------
    def _iter_plan(self, plan: _EpochPlan) -> Iterator[dict[str, Any]]:
        """The batches of one pass (an epoch from the cursor, or a resampled chunk) decoded by
        DALI; ``VideoTextLoader.__iter__`` moves the cursor and ends the epoch, so order,
        resume and resampled mode are the PyAV loader's."""
        steps = plan.steps
        step = 0
        consecutive = 0
        while step < steps:
            first_step = step
            prepared: dict[int, _Prepared] = {}
            lock = threading.Lock()
            source = _PassSource(self, plan, first_step, prepared, lock)
            pipe = self._build_pipeline(source, batch_size=self.batch_size,
                                        num_threads=self.num_threads, prefetch=self.prefetch)
            try:
                while step < steps:
                    try:
                        (video,) = pipe.run()
                    except StopIteration:  # pragma: no cover - the source and `steps` agree
                        raise RuntimeError("DALI pipeline ended before its last batch") from None
                    except RuntimeError as e:  # DALI's operator errors; others propagate
                        with lock:
                            pending = [prepared[s] for s in sorted(prepared) if s >= step]
                        consecutive += self._quarantine_culprits(pending, e)
                        if consecutive >= self.cfg.max_consecutive_failures:
                            raise DataError(
                                f"{consecutive} samples in a row failed to decode with DALI "
                                f"(quarantine: {self.quarantine.path or 'in memory'}); check "
                                "the shards with `megavid verify-shards`") from e
                        break  # rebuild the pipeline at `step`, without the culprits
                    with lock:
                        p = prepared.pop(step)
                    self._record_failures(p.failed)
                    consecutive = 0
                    clip = self._to_clip(video, p)
                    step += 1
                    yield self._assemble(clip, p)
            finally:
                del pipe
