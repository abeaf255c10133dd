"""``build_loader``: the loader of a split from config. It decides once: one scan of the shard
folder (:func:`scan_shards`: the tars listed once, each ``index.jsonl`` read once) gives the
shard kind and codec, :func:`plan_decode` turns them into a :class:`DecodePlan` (backend,
device and the reason), and the plan and the index already read are handed to the backend's
builder, which then reads nothing again.

``data.backend=auto`` follows the project's own loader measurements, kept as data in
:data:`AUTO_POLICY` and cited by file (``bench/results/``): where they show a GPU path slower
than a CPU one, ``auto`` takes the faster measured path until the GPU path is fixed and
re-measured (then update the table).

This module sits above every backend (they never import it): PyAV
(:mod:`megavid.data.loader`), decord (:mod:`megavid.data.decord_backend`), DALI
(:mod:`megavid.data.dali`), joint image-video batches (:mod:`megavid.data.mixing`) and
``data.name=synthetic`` (:mod:`megavid.data.synthetic_loader`).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megavid.config import DataConfig
from megavid.data.dali.backend import build_dali_loader
from megavid.data.dali.devices import CPU_CODECS, MIXED_CODECS, dali_available, get_shard_codec
from megavid.data.decord_backend import build_decord_loader, decord_available
from megavid.data.loader import build_pyav_loader
from megavid.data.mixing import build_mixed_loader
from megavid.data.synthetic_loader import SyntheticLoader
from megavid.data.table import build_sample_table, get_split_spec
from megavid.errors import ConfigError, DataError
from megavid.shards.format import (
    FRAMES_CODEC,
    IMAGE_EXTS,
    is_frame_ext,
    is_frames_meta,
    list_shards,
    read_index,
)

logger = logging.getLogger("megavid.data")

SHARD_KINDS = ("video", "frames", "images")
IMAGE_CODEC = "image"
"""The codec a plan names for image shards (``fn.decoders.image`` and PIL read JPEG and PNG)."""


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How a split is decoded, decided once from one scan of its shards."""

    shard_kind: str
    """'video', 'frames' (JPEG frames per clip) or 'images' (one JPEG/PNG per sample)."""
    codec: str
    """The shards' codec: 'vp9', 'h264', ... for video, 'jpeg' for frames, 'image' for images."""
    backend: str
    """'pyav', 'decord' or 'dali' (a ``LOADER_BACKENDS`` name)."""
    device: str
    """Where it decodes: 'cpu', or 'mixed' (DALI on the GPU)."""
    reason: str
    """Why, in a sentence with the numbers it rests on (``megavid info``, the run's log)."""
    source: str
    """What the decision rests on: a ``bench/results/`` file, or the ``data.backend`` setting."""

    @property
    def path(self) -> str:
        """'pyav', 'decord', 'dali-cpu' or 'dali-mixed' (the rows of ``megavid bench-loader``)."""
        return f"dali-{self.device}" if self.backend == "dali" else self.backend

    def describe(self) -> str:
        """One line: path, shard kind and codec, reason, source."""
        return (f"{self.path} for {self.shard_kind} shards ({self.codec}): {self.reason} "
                f"[{self.source}]")


# --------------------------------------------------------------------------------------------
# The auto policy: measurements, as data
# --------------------------------------------------------------------------------------------
H200_RESULTS = "bench/results/loader_gpu_nvidia-h200.md"
"""bench/loader_gpu.py on an NVIDIA H200 with 16 cores, 16 PyAV workers / DALI threads,
8x224^2 clips (2026-12-04)."""
CPU_RESULTS = "bench/results/loader_cpu-2core.md"
"""bench/loader.py on 2 AMD EPYC cores, one process, one decode thread per path: clips per
CPU-second (the best of 3 interleaved rounds)."""


@dataclass(frozen=True, slots=True)
class Measured:
    """One row of a results table: a decode path's rate."""

    path: str
    """'pyav', 'dali-cpu' or 'dali-mixed'."""
    rate: float
    """Clips per second (per CPU-second in a per-core table)."""
    row: str
    """The row's first cells in the file (``" | "`` between cells), before its numbers."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """The decode paths of one shard kind, measured together on one machine."""

    source: str
    """The ``bench/results/`` file."""
    machine: str
    cores: int
    """CPU cores behind the CPU paths' rates (1 for a per-CPU-second table): a CPU path's rate
    is scaled by this machine's cores per GPU over ``cores``; a GPU path's rate is per GPU."""
    unit: str
    rows: tuple[Measured, ...]


AUTO_POLICY: dict[tuple[str, bool], Measurement] = {
    # (shard kind, a CUDA GPU is visible) -> the measurement auto follows. Image shards follow
    # the frames rows (the same decoders: PIL, DALI fn.decoders.image; not measured apart).
    # When a path is fixed, re-measure it (bench/loader_gpu.py, bench/loader.py), add the
    # results file and point its rows here: the tests check every number against its file.
    ("video", True): Measurement(H200_RESULTS, "NVIDIA H200, 16 cores", 16, "clips/s", (
        Measured("pyav", 56.8, "PyAV (h264)"),  # the lower PyAV row (vp9: 61.1)
        Measured("dali-cpu", 36.6, "DALI video cpu (vp9)"),
        Measured("dali-mixed", 19.6, "DALI video mixed (h264)"))),
    ("video", False): Measurement(CPU_RESULTS, "2 AMD EPYC cores", 1, "clips per CPU-s", (
        Measured("pyav", 5.54, "megavid PyAV | vp9 shards"),
        Measured("dali-cpu", 4.95, "megavid DALI cpu, 1 thread | vp9 shards"))),
    ("frames", True): Measurement(H200_RESULTS, "NVIDIA H200, 16 cores", 16, "clips/s", (
        Measured("pyav", 182.1, "PIL frames (no-DALI fallback)"),
        Measured("dali-cpu", 130.0, "DALI frames cpu"),
        Measured("dali-mixed", 50.7, "DALI frames mixed (hw JPEG)"))),
    ("frames", False): Measurement(CPU_RESULTS, "2 AMD EPYC cores", 1, "clips per CPU-s", (
        Measured("pyav", 44.40, "megavid PIL | frames shards (JPEG, 8 fps)"),
        Measured("dali-cpu", 31.45,
                 "megavid DALI cpu, 1 thread | frames shards (JPEG, 8 fps)"))),
}

DECORD_VS_PYAV = ("the same FFmpeg decode; measured 0.95-0.97x PyAV's clips per CPU-second on "
                  f"the same H.264 shards, {CPU_RESULTS}")
"""Why ``auto`` never picks decord (``data.backend=decord`` selects it)."""

def get_unusable_reason(path: str, kind: str, codec: str, *, has_dali: bool, has_cuda: bool,
                        dali_device: str = "auto", has_decord: bool = True) -> str | None:
    """Why decode path ``path`` ('pyav', 'decord', 'dali-cpu', 'dali-mixed') cannot decode
    shards of ``kind`` and ``codec`` here, or None when it can."""
    if path == "pyav":
        return None
    if path == "decord":
        if not has_decord:
            return "decord is not installed: pip install megavid[decord]"
        # frames and image samples decode with PIL in the decord loader too: the pyav path
        return None if kind == "video" else f"{kind} shards decode as on the pyav path (PIL)"
    if not has_dali:
        return "nvidia-dali is not installed: pip install megavid[dali]"
    device = path.split("-")[1]
    if dali_device not in ("auto", device):
        return f"data.dali_device={dali_device}"
    if device == "mixed" and not has_cuda:
        return "no CUDA GPU"
    if kind == "video" and codec not in (CPU_CODECS if device == "cpu" else MIXED_CODECS):
        return f"it cannot decode {codec}"
    return None


def plan_decode(
    shard_kind: str,
    codec: str,
    *,
    backend: str = "auto",
    dali_device: str = "auto",
    has_dali: bool | None = None,
    has_cuda: bool | None = None,
    cpu_cores: int | None = None,
    num_gpus: int | None = None,
    has_decord: bool | None = None,
) -> DecodePlan:
    """The decode plan of shards of ``shard_kind`` and ``codec`` on this (or a described)
    machine.

    ``backend='auto'`` looks up :data:`AUTO_POLICY` by (shard kind, CUDA GPU visible) and
    takes the measured path with the highest rate here among those that can decode the
    shards: a CPU path's measured rate scaled by this machine's CPU cores per GPU (its rate
    grows with processes / DALI threads), a GPU path's rate per GPU as measured. decord is
    never picked (:data:`DECORD_VS_PYAV`). A named backend is taken as it is; DALI's device
    is ``dali_device`` ('auto': mixed with a CUDA GPU, else cpu).

    Args:
        shard_kind: 'video', 'frames' or 'images'.
        codec: the shards' codec ('vp9', 'h264', ..., 'jpeg', 'image').
        backend: ``data.backend``: 'auto', 'pyav', 'decord' or 'dali'.
        dali_device: ``data.dali_device``: 'auto', 'cpu' or 'mixed' (restricts auto's DALI
            paths to that device).
        has_dali: override DALI detection (None: try importing it).
        has_cuda: override CUDA detection (None: ``torch.cuda.is_available()``).
        cpu_cores: CPU cores this process may use (None: its affinity mask).
        num_gpus: GPUs sharing those cores (None: ``torch.cuda.device_count()``).
        has_decord: override decord detection (None: try importing it); only changes the
            reason of a 'pyav' choice.

    Raises:
        ConfigError: an unknown backend or shard kind.
    """
    if shard_kind not in SHARD_KINDS:
        raise ConfigError(f"shard kind {shard_kind!r} is unknown; valid: {', '.join(SHARD_KINDS)}")
    codec = codec.lower()
    has_cuda = torch.cuda.is_available() if has_cuda is None else has_cuda
    if backend in ("pyav", "decord"):
        return DecodePlan(shard_kind, codec, backend, "cpu", f"data.backend={backend} is set",
                          f"data.backend={backend}")
    if backend == "dali":
        device = dali_device if dali_device != "auto" else "mixed" if has_cuda else "cpu"
        return DecodePlan(shard_kind, codec, "dali", device,
                          f"data.backend=dali is set; data.dali_device={dali_device}"
                          + (f" -> {device} ({'a' if has_cuda else 'no'} CUDA GPU visible)"
                             if dali_device == "auto" else ""), "data.backend=dali")
    if backend != "auto":
        raise ConfigError(f"data.backend={backend!r} is unknown; valid: auto, "
                          f"{', '.join(LOADER_BACKENDS)}")

    has_dali = dali_available() if has_dali is None else has_dali
    cores = cpu_cores if cpu_cores is not None else len(os.sched_getaffinity(0))
    gpus = 1
    if has_cuda:
        gpus = max(1, num_gpus if num_gpus is not None else torch.cuda.device_count())
    per_gpu = cores / gpus
    m = AUTO_POLICY[("video" if shard_kind == "video" else "frames", has_cuda)]
    estimates: dict[str, float] = {}
    unusable: dict[str, list[str]] = {}  # why -> paths
    for row in m.rows:
        why = get_unusable_reason(row.path, shard_kind, codec, has_dali=has_dali,
                                  has_cuda=has_cuda, dali_device=dali_device)
        if why is not None:
            unusable.setdefault(why, []).append(row.path)
            continue
        # a per-GPU table: CPU paths scale with cores per GPU; a per-CPU-second one compares as is
        scale = per_gpu / m.cores if has_cuda and row.path != "dali-mixed" else 1.0
        estimates[row.path] = row.rate * scale
    best = max(estimates, key=estimates.__getitem__)  # pyav is always usable; ties: table order

    where = f"{per_gpu:g} CPU cores per GPU" if has_cuda else f"{cores} CPU cores, no CUDA GPU"
    unit = "clips/s per GPU" if has_cuda else m.unit
    others = ", ".join(f"{p} {r:.3g}" for p, r in estimates.items() if p != best)
    measured = "; ".join(f"{row.row.replace(' | ', ', ')} = {row.rate:g}" for row in m.rows)
    reason = (f"{'image' if shard_kind == 'images' else shard_kind} shards ({codec}), {where}: "
              f"{best} {estimates[best]:.3g} {unit}" + (f" vs {others}" if others else "")
              + f", from {m.source} ({m.machine}, {m.unit}: {measured}"
              + (f"; CPU paths scaled by {per_gpu:g}/{m.cores} cores)" if has_cuda else ")"))
    if has_cuda and best != "dali-mixed":
        reason += ("; the GPU path measured slower: auto follows the measurement until it is "
                   "fixed and re-measured")
    if shard_kind == "images":
        reason += ("; image shards are not measured apart: they use the frames paths' "
                   "decoders (PIL, DALI fn.decoders.image)")
    if unusable:
        reason += "; not usable here: " + "; ".join(f"{', '.join(p)} ({why})"
                                                    for why, p in unusable.items())
    if best == "pyav" and shard_kind == "video":
        if has_decord is None:
            has_decord = decord_available()
        if has_decord:
            reason += (f"; decord is installed but PyAV is preferred ({DECORD_VS_PYAV}; "
                       "data.backend=decord selects it)")
    backend, _, device = best.partition("-")
    return DecodePlan(shard_kind, codec, backend, device or "cpu", reason, m.source)


def select_backend(
    codec: str,
    *,
    has_dali: bool | None = None,
    has_cuda: bool | None = None,
    cpu_cores: int | None = None,
    num_gpus: int | None = None,
    has_decord: bool | None = None,
) -> tuple[str, str, str]:
    """What ``data.backend=auto`` picks for shards of ``codec`` ('jpeg': frames shards):
    :func:`plan_decode`'s choice as (backend, dali_device or '' for a CPU backend, reason).

    Args: as :func:`plan_decode`.
    """
    kind = "frames" if codec.lower() == FRAMES_CODEC else "video"
    plan = plan_decode(kind, codec, has_dali=has_dali, has_cuda=has_cuda, cpu_cores=cpu_cores,
                       num_gpus=num_gpus, has_decord=has_decord)
    return plan.backend, plan.device if plan.backend == "dali" else "", plan.reason


# --------------------------------------------------------------------------------------------
# One scan of the shards
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ShardScan:
    """A split's shards, listed and indexed once."""

    spec: str
    tars: list[Path]
    """The tars the spec names (``list_shards``)."""
    index: dict[Path, list[dict]]
    """``index.jsonl`` entries by resolved shard folder."""
    shard_kind: str
    """Of the first sample: 'video', 'frames' or 'images'."""
    codec: str
    """'jpeg' (frames), 'image' (images), else the video codec that constrains the backend
    (``get_shard_codec``'s rule over every entry)."""


def scan_shards(spec: str, root: str | Path | None = None) -> ShardScan:
    """List the tars of ``spec`` once and read each shard folder's ``index.jsonl`` once.

    Args:
        spec: a split's shard spec (a folder, a tar, a glob; see ``format.list_shards``).
        root: the dataset root (``data.root``) for split names.

    Raises:
        DataError: no shards, no index, or an index with no sample.
    """
    tars = list_shards(spec, root)
    index: dict[Path, list[dict]] = {}
    for t in tars:
        d = t.parent.resolve()
        if d not in index:
            index[d] = read_index(d)
    first = index[tars[0].parent.resolve()]
    if not first:
        raise DataError(f"the shards of '{spec}' hold no samples (their index.jsonl is empty); "
                        "re-create them with `megavid make-shards`")
    members = first[0].get("members", {})
    if any(x in IMAGE_EXTS for x in members):  # first: an image JSON may say codec "jpeg"
        kind, codec = "images", IMAGE_CODEC
    elif is_frames_meta(first[0]) or any(is_frame_ext(x) for x in members):
        kind, codec = "frames", FRAMES_CODEC
    else:
        entries = [e for entries in index.values() for e in entries]
        kind, codec = "video", get_shard_codec(tars[0].parent, entries=entries)
    return ShardScan(spec, tars, index, kind, codec)


def get_decode_plan(data_cfg: DataConfig, split: str, **machine: Any) -> DecodePlan:
    """The decode plan of a split (one scan of its shards), as ``build_loader`` makes it.

    Args:
        data_cfg: the ``data`` config section (backend, dali_device, shards).
        split: 'train', 'val', 'test' or a shard spec.
        machine: ``plan_decode``'s has_dali / has_cuda / cpu_cores / num_gpus overrides.
    """
    scan = scan_shards(get_split_spec(data_cfg, split), data_cfg.root)
    return plan_decode(scan.shard_kind, scan.codec, backend=data_cfg.backend,
                       dali_device=data_cfg.dali_device, **machine)


# --------------------------------------------------------------------------------------------
# The registry and the builder
# --------------------------------------------------------------------------------------------
LOADER_BACKENDS: dict[str, Callable[..., Any]] = {"pyav": build_pyav_loader,
                                                  "dali": build_dali_loader,
                                                  "decord": build_decord_loader}
"""data.backend -> builder with ``build_loader``'s signature plus the keyword ``table`` (the
sample table already read); ``build_dali_loader`` also takes ``shard_kind``, ``codec`` and
``device`` from the plan. Each returns a loader with the same contract (batches, set_epoch,
state_dict, failures); ``decord`` is the PyAV loader with
``megavid.data.decord_backend.decode_clip`` as its decode function."""


def get_backend(name: str, data_cfg: DataConfig | None = None, split: str = "train"
                ) -> Callable[..., Any]:
    """The loader builder of a decode backend ('auto': the plan's, see :func:`plan_decode`).

    Args:
        name: 'auto', 'pyav', 'dali' or 'decord'.
        data_cfg: needed for 'auto' (to scan the split's shards).
        split: the split whose shards decide 'auto'.
    """
    if name == "auto":
        name = get_decode_plan(data_cfg, split).backend if data_cfg is not None else "pyav"
    if name not in LOADER_BACKENDS:
        raise ConfigError(f"data.backend={name!r} is unknown; valid: auto, "
                          f"{', '.join(LOADER_BACKENDS)}")
    return LOADER_BACKENDS[name]


def build_loader(data_cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0) -> Any:
    """The loader of one split for one rank, from config: one scan of the shards, one
    :class:`DecodePlan` (logged at INFO for a train loader), and the backend's builder given
    the plan and the sample table so that it reads nothing again.

    Args:
        data_cfg: the ``data`` config section (backend, shards, sizes, workers, ...).
        split: 'train', 'val' or 'test' (resolved through ``data_cfg.<split>``), or a shard spec.
        train: training order and augmentation (shuffle, random frames/captions/crops,
            drop_last) or evaluation (identity order, centre frames, first caption, every
            sample once with ``batch["valid"]``).
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed (permutation and per-sample randomness).
        epoch: the epoch to start in.

    Returns:
        A loader: iterable of batches, ``__len__``, ``set_epoch``, ``state_dict``,
        ``load_state_dict``, ``failures``.
    """
    if data_cfg.name == "synthetic":
        return SyntheticLoader(data_cfg, train=train, rank=rank, world_size=world_size,
                               seed=seed, epoch=epoch)
    if data_cfg.name != "shards":
        raise ConfigError(f"data.name={data_cfg.name!r} is unknown; valid: shards, synthetic")
    if data_cfg.backend != "auto" and data_cfg.backend not in LOADER_BACKENDS:
        raise ConfigError(f"data.backend={data_cfg.backend!r} is unknown; valid: auto, "
                          f"{', '.join(LOADER_BACKENDS)}")
    spec = get_split_spec(data_cfg, split)
    scan = scan_shards(spec, data_cfg.root)
    plan = plan_decode(scan.shard_kind, scan.codec, backend=data_cfg.backend,
                       dali_device=data_cfg.dali_device)
    logger.log(logging.INFO if train else logging.DEBUG, "decode plan for %s (rank %d): %s",
               spec, rank, plan.describe())
    table = build_sample_table(spec, data_cfg.root, tars=scan.tars, index=scan.index)
    kw: dict[str, Any] = {"table": table}
    if plan.backend == "dali":
        kw.update(shard_kind=plan.shard_kind, codec=plan.codec, device=plan.device)
    builder = functools.partial(LOADER_BACKENDS[plan.backend], **kw)
    if train and split in ("train", data_cfg.train) and data_cfg.image_ratio > 0:
        return build_mixed_loader(data_cfg, builder, rank=rank, world_size=world_size,
                                  seed=seed, epoch=epoch)
    return builder(data_cfg, split, train=train, rank=rank, world_size=world_size, seed=seed,
                   epoch=epoch)
