"""``build_loader``: the loader of a split from config, and the ``data.backend`` registry with
its ``auto`` policy. It sits above every backend (they never import it): PyAV
(:mod:`megavid.data.loader`), decord (:mod:`megavid.data.decord_backend`), DALI
(:mod:`megavid.data.dali`), joint image-video batches (:mod:`megavid.data.mixing`) and
``data.name=synthetic`` (:mod:`megavid.data.synthetic_loader`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

from megavid.config import DataConfig
from megavid.data.dali.backend import build_dali_loader
from megavid.data.dali.devices import CPU_CODECS, MIXED_CODECS, dali_available, get_shard_codec
from megavid.data.decord_backend import build_decord_loader, decord_available
from megavid.data.loader import build_pyav_loader
from megavid.data.mixing import build_mixed_loader
from megavid.data.synthetic_loader import SyntheticLoader
from megavid.data.table import get_split_spec, is_image_split
from megavid.errors import ConfigError
from megavid.shards.format import FRAMES_CODEC, list_shards

logger = logging.getLogger("megavid.data")

PYAV_CLIPS_PER_CORE = 4.2
"""PyAV decode rate per CPU core (measured on an H100 machine: 65-71 clips/s with 16 processes,
H.264 456x256)."""
DALI_MIXED_CLIPS_PER_GPU = 12.0
"""DALI mixed ``fn.decoders.video`` rate per GPU from webdataset tars (measured on an H100)."""


# --------------------------------------------------------------------------------------------
# The auto policy
# --------------------------------------------------------------------------------------------
def select_backend(
    codec: str,
    *,
    has_dali: bool | None = None,
    has_cuda: bool | None = None,
    cpu_cores: int | None = None,
    num_gpus: int | None = None,
    has_decord: bool | None = None,
) -> tuple[str, str, str]:
    """What ``data.backend=auto`` picks for videos of ``codec``, and why.

    Rule, from decode measurements on an H100 machine (16 cores, H.264 456x256,
    8-frame 224^2 clips): PyAV reaches 65-71 clips/s with 16 processes (~4.2 per core) while
    DALI's mixed ``fn.decoders.video`` reaches ~12 clips/s per GPU (~85 ms per sample). So a
    GPU machine uses DALI mixed only when its CPU cores per GPU cannot beat that (fewer than
    ~3 cores per GPU); without a GPU, DALI's CPU decoder reads only VP8/VP9/MJPEG and measured
    no faster than PyAV per core (bench/loader_dali.py), so PyAV is the default there too.
    ``data.backend=dali`` forces DALI. decord, where installed, is never picked: it decodes
    with the same FFmpeg as PyAV and measured no faster per core (bench/loader.py); the reason
    says so, and ``data.backend=decord`` selects it.

    Frames shards (codec "jpeg", ``make-shards --shard-format frames``) always take DALI's
    ``fn.decoders.image``: "mixed" (hardware JPEG engines, ~2,000 clips/s measured on an H100)
    with a GPU, "cpu" without; PyAV cannot read them.

    Args:
        codec: the shards' codec ('vp9', 'h264', ...).
        has_dali: override DALI detection (None: try importing it).
        has_cuda: override CUDA detection (None: ``torch.cuda.is_available()``).
        cpu_cores: CPU cores this process may use (None: its affinity mask).
        num_gpus: GPUs on this machine sharing those cores (None: ``torch.cuda.device_count()``).
        has_decord: override decord detection (None: try importing it); only changes the
            reason of a 'pyav' choice.

    Returns:
        (backend, dali_device, reason): backend 'dali' or 'pyav'; dali_device 'mixed', 'cpu'
        or '' for pyav; reason a sentence for ``megavid info`` and logs.
    """
    backend, device, reason = _select_backend(codec, has_dali=has_dali, has_cuda=has_cuda,
                                              cpu_cores=cpu_cores, num_gpus=num_gpus)
    if backend == "pyav":
        if has_decord is None:
            has_decord = decord_available()
        if has_decord:
            reason += (f"; decord is installed but PyAV is preferred ({DECORD_VS_PYAV}; "
                       "data.backend=decord selects it)")
    return backend, device, reason


DECORD_VS_PYAV = ("the same FFmpeg decode; measured 0.95-0.97x PyAV's clips per CPU-second on "
                  "the same H.264 shards, bench/results/loader_cpu-2core.md")
"""Why ``auto`` prefers PyAV over decord (``bench/loader.py``, 2-core CPU, 2026-11-23)."""


def _select_backend(codec: str, *, has_dali: bool | None, has_cuda: bool | None,
                    cpu_cores: int | None, num_gpus: int | None) -> tuple[str, str, str]:
    """``select_backend`` without the decord note."""
    codec = codec.lower()
    has_dali = dali_available() if has_dali is None else has_dali
    has_cuda = torch.cuda.is_available() if has_cuda is None else has_cuda
    if codec == FRAMES_CODEC:
        # frames shards: only DALI's image decoder reads them; the hardware JPEG path is the
        # fastest one measured (on an H100: ~2,000 clips/s vs ~12 for fn.decoders.video)
        if not has_dali:
            return ("pyav", "", "frames (JPEG) shards without nvidia-dali: PIL decodes the "
                    "JPEGs in the loader's worker processes (pip install megavid[dali] for "
                    "DALI's JPEG decoder)")
        if has_cuda:
            return ("dali", "mixed", "frames (JPEG) shards: DALI fn.decoders.image on the GPU "
                    "(hardware JPEG decoder, ~2,000 clips/s measured on an H100 vs ~12 for "
                    "video-stream decoding)")
        return ("dali", "cpu", "frames (JPEG) shards, no CUDA GPU: DALI fn.decoders.image on "
                "the CPU (the only backend that reads frames shards)")
    if not has_dali:
        return "pyav", "", "nvidia-dali is not installed (pip install megavid[dali])"
    if has_cuda and codec in MIXED_CODECS:
        cores = cpu_cores if cpu_cores is not None else len(os.sched_getaffinity(0))
        gpus = max(1, num_gpus if num_gpus is not None else torch.cuda.device_count())
        pyav_rate = cores / gpus * PYAV_CLIPS_PER_CORE
        numbers = (f"{cores / gpus:.1f} CPU cores per GPU give PyAV ~{pyav_rate:.0f} clips/s "
                   f"per GPU vs ~{DALI_MIXED_CLIPS_PER_GPU:.0f} for DALI mixed decoding "
                   "(measured on an H100, H.264 456x256)")
        if pyav_rate < DALI_MIXED_CLIPS_PER_GPU:
            return "dali", "mixed", f"{numbers}: NVDEC ({codec}) is faster here"
        return "pyav", "", f"{numbers}: PyAV is faster here (set data.backend=dali to force it)"
    if has_cuda:
        return "pyav", "", f"DALI cannot decode {codec} on the GPU; PyAV can"
    if codec in CPU_CODECS:
        return ("pyav", "", f"no CUDA GPU: DALI CPU could decode {codec} but is no faster than "
                "PyAV per core (set data.backend=dali to force it)")
    return "pyav", "", f"no CUDA GPU and DALI's CPU decoder cannot decode {codec}"


# --------------------------------------------------------------------------------------------
# The registry and the builder
# --------------------------------------------------------------------------------------------
LOADER_BACKENDS: dict[str, Callable[..., Any]] = {"pyav": build_pyav_loader,
                                                  "dali": build_dali_loader,
                                                  "decord": build_decord_loader}
"""data.backend -> builder with ``build_loader``'s signature. ``megavid.data.dali.backend`` provides
``build_dali_loader(data_cfg, split, *, train, rank, world_size, seed, epoch)`` returning a loader
with the same contract (batches, set_epoch, state_dict, failures); ``decord`` is the PyAV loader
with ``megavid.data.decord_backend.decode_clip`` as its decode function."""


def get_backend(name: str, data_cfg: DataConfig | None = None, split: str = "train"
                ) -> Callable[..., Any]:
    """The loader builder of a decode backend.

    'auto' asks :func:`select_backend` with the split's codec: frames shards
    (codec "jpeg", ``make-shards --shard-format frames``) always take DALI's image decoder
    (hardware JPEG on a GPU, DALI CPU otherwise); video shards take DALI "mixed" on a CUDA
    machine for codecs NVDEC reads when that beats PyAV on the machine's cores, else PyAV.
    Falls back to PyAV where nvidia-dali is not installed.

    Args:
        name: 'auto', 'pyav', 'dali' or 'decord'.
        data_cfg: needed for 'auto' (to find the split's codec).
        split: the split whose codec decides 'auto'.
    """
    if name == "auto":
        name = _resolve_auto(data_cfg, split) if data_cfg is not None else "pyav"
    if name not in LOADER_BACKENDS:
        raise ConfigError(f"data.backend={name!r} is unknown; valid: auto, "
                          f"{', '.join(LOADER_BACKENDS)}")
    return LOADER_BACKENDS[name]


def _resolve_auto(data_cfg: DataConfig, split: str) -> str:
    if is_image_split(data_cfg, split):
        # a GPU decodes JPEGs in its hardware engines (~2,000 clips/s measured on an H100);
        # without one, PIL in the PyAV loader's worker processes
        backend = "dali" if dali_available() and torch.cuda.is_available() else "pyav"
        logger.info("data.backend=auto -> %s (image shards: %s)", backend,
                    "DALI fn.decoders.image on the GPU" if backend == "dali" else "PIL decode")
        return backend
    shard_dir = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0].parent
    backend, _, reason = select_backend(get_shard_codec(shard_dir))
    logger.info("data.backend=auto -> %s (%s)", backend, reason)
    return backend if backend in LOADER_BACKENDS else "pyav"


def build_loader(data_cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0) -> Any:
    """The loader of one split for one rank, from config.

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
    builder = get_backend(data_cfg.backend, data_cfg, split)
    if train and split == "train" and data_cfg.image_ratio > 0:
        return build_mixed_loader(data_cfg, builder, rank=rank, world_size=world_size,
                                  seed=seed, epoch=epoch)
    return builder(data_cfg, split, train=train, rank=rank, world_size=world_size, seed=seed,
                   epoch=epoch)
