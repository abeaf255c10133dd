"""``data.backend=dali``: :func:`build_dali_loader` picks the DALI loader of the shards."""

from __future__ import annotations

from pathlib import Path

from megavid.data.dali.image_loaders import FramesDaliLoader, ImageDaliLoader
from megavid.data.dali.loader import DaliLoader
from megavid.data.dali.quarantine import Quarantine
from megavid.data.table import SampleTable, get_split_spec, is_image_split
from megavid.shards.format import is_frames_shard_dir, list_shards


def build_dali_loader(
    data_cfg,
    split: str,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    device: str | None = None,
    quarantine: Quarantine | str | Path | None = None,
    table: SampleTable | None = None,
    shard_kind: str | None = None,
    codec: str | None = None,
) -> "DaliLoader":
    """The DALI loader of a split: ``build_loader``'s signature plus DALI options.

    Frames shards (``make-shards --shard-format frames``) get a :class:`FramesDaliLoader`
    (``fn.decoders.image``), image shards (``{key}.jpg|.png``) an :class:`ImageDaliLoader`
    (``fn.decoders.image``, 1-frame clips), video shards a :class:`DaliLoader`
    (``fn.decoders.video``).

    Args:
        data_cfg: the ``data`` config section.
        split: 'train', 'val', 'test' or a shard spec.
        train: training mode (random sampling, shuffling, drop_last).
        rank: this process's rank.
        world_size: number of ranks.
        seed: run seed.
        epoch: first epoch.
        device: 'auto' (mixed with a GPU, else cpu), 'cpu' or 'mixed' (None:
            ``data_cfg.dali_device``).
        quarantine: a :class:`Quarantine` or its JSON path (None: ``data_cfg.quarantine``).
        table: the split's sample table, already built (None: read the split's index).
        shard_kind: 'video', 'frames' or 'images', already known (None: look at the shards).
        codec: the shards' codec, already known (None: read it from the index).
        (``megavid.data.build`` scans a split once and passes the last three.)
    """
    device = device or data_cfg.dali_device

    if shard_kind is None:
        first = list_shards(get_split_spec(data_cfg, split), data_cfg.root)[0]
        shard_kind = ("images" if is_image_split(data_cfg, split)
                      else "frames" if is_frames_shard_dir(first.parent) else "video")
    cls = {"images": ImageDaliLoader, "frames": FramesDaliLoader, "video": DaliLoader}[shard_kind]
    return cls(data_cfg, split, train=train, rank=rank, world_size=world_size,
               seed=seed, epoch=epoch, device=device, quarantine=quarantine, table=table,
               codec=codec)
