"""Is DALI usable, which codec do the shards hold, and which DALI decoder device reads them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megavid.errors import ConfigError, DataError
from megavid.shards.format import list_shards, read_index, scan_tar

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
"""Codecs ``fn.decoders.video`` decodes on the CPU (libavcodec inside DALI)."""
MIXED_CODECS = CPU_CODECS | {"h264", "hevc", "h265", "av1", "mpeg4"}
"""Codecs the "mixed" backend decodes (NVDEC)."""


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def get_dali_version() -> str | None:
    """The installed DALI version, or None."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return str(nvidia.dali.__version__)


def get_shard_codec(shard_dir: str | Path, *, entries: list[dict] | None = None) -> str:
    """The video codec of a shard folder's samples (from ``index.jsonl``, else the first JSON).

    Args:
        shard_dir: a folder written by :func:`megavid.shards.writer.write_shards`.
        entries: the folder's ``index.jsonl`` entries, already read (None: read them).

    Returns:
        The lower-case codec name; for a folder mixing codecs, one that DALI's CPU decoder
        cannot read, if any (the one that constrains the backend).

    Raises:
        DataError: no sample of the folder records its codec.
    """
    shard_dir = Path(shard_dir)
    codecs: set[str] = set()
    if entries is None and (shard_dir / "index.jsonl").is_file():
        entries = read_index(shard_dir)
    if entries is not None:
        codecs = {str(e["codec"]).lower() for e in entries if e.get("codec")}
    if not codecs:
        tar = list_shards(str(shard_dir))[0]
        with open(tar, "rb") as f:
            for _, bundle in scan_tar(tar):
                for ext, off, size, _name in bundle:
                    if ext == "json":
                        f.seek(off)
                        codec = json.loads(f.read(size)).get("codec")
                        if codec:
                            codecs.add(str(codec).lower())
                break
    if not codecs:
        raise DataError(f"no sample in {shard_dir} records its codec; re-create the shards")
    if len(codecs) > 1 and not codecs <= CPU_CODECS:
        # mixing e.g. vp9 and h264 is fine for PyAV and mixed DALI, so report the hardest one
        return sorted(codecs - CPU_CODECS)[0]
    return sorted(codecs)[0]



def get_dali_device(codec: str, requested: str = "auto") -> str:
    """The DALI decoder backend ('cpu' or 'mixed') for ``codec``; raise when it cannot work.

    Args:
        codec: the shards' codec.
        requested: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.

    Raises:
        DataError: DALI is missing, or the codec cannot be decoded on the requested device.
    """
    device = _resolve_device(
        requested,
        missing="data.backend=dali needs nvidia-dali: pip install 'megavid[dali]', or set "
                "data.backend=pyav",
        no_gpu="DALI mixed (GPU) decoding needs a CUDA GPU; none is visible (check "
               "CUDA_VISIBLE_DEVICES) or set data.dali_device=cpu or data.backend=pyav")
    codec = codec.lower()
    if device == "cpu" and codec not in CPU_CODECS:
        raise DataError(
            f"DALI's CPU video decoder cannot decode {codec} "
            f"(only {', '.join(sorted(CPU_CODECS))}); "
            "set data.backend=pyav, run on a GPU, or re-encode the shards as VP9"
        )
    if device == "mixed" and codec not in MIXED_CODECS:
        raise DataError(f"DALI cannot decode {codec}; set data.backend=pyav")
    return device



def get_image_decoder_device(requested: str = "auto", what: str = "images") -> str:
    """The ``fn.decoders.image`` backend ('cpu' or 'mixed') of frames and image shards.

    Args:
        requested: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed'.
        what: what is decoded, for the messages.

    Raises:
        DataError: DALI is missing, or 'mixed' without a GPU.
    """
    return _resolve_device(
        requested,
        missing=f"{what} need nvidia-dali for data.backend=dali: pip install 'megavid[dali]'",
        no_gpu="DALI mixed (GPU) JPEG decoding needs a CUDA GPU; none is visible (check "
               "CUDA_VISIBLE_DEVICES) or set data.dali_device=cpu")



def _resolve_device(requested: str, *, missing: str, no_gpu: str) -> str:
    """'auto' -> 'mixed' with a CUDA GPU, else 'cpu'; ``missing`` / ``no_gpu`` are the
    messages (problem and fix) when DALI is not installed / 'mixed' has no GPU."""
    if not dali_available():
        raise DataError(missing)
    device = requested
    if device == "auto":
        device = "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI device {requested!r} must be 'auto', 'cpu' or 'mixed'")
    if device == "mixed" and not torch.cuda.is_available():
        raise DataError(no_gpu)
    return device
