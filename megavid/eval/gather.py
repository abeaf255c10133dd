"""Gathering evaluation features (and keys) from all ranks, each sample exactly once, in order.

Distributed evaluation pads: with N samples over W ranks, a sampler gives every rank
ceil(N / W) samples, so W * ceil(N / W) - N of them are duplicates; DALI's sharded reader and
``DistributedSampler`` both behave this way. Counting a duplicate twice skews every metric
(a duplicated video is also a wrong candidate for its own captions), so each rank marks its
padding with ``valid=False`` and the gather drops it.

These functions use the process group already initialised by the engine (any backend) and
fall back to plain local operations when torch.distributed is not initialised, so evaluation
code is the same in one process and in many. No gradient flows (evaluation only; the
contrastive loss's differentiable gather lives in ``megavid.engine.dist``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megavid.errors import DataError

_MAX_DIMS = 8  # feature rank supported by the shape check (features are [N, D] or [N, T, D])


def _dist_world(group: Any = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def get_eval_shard(num_samples: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """This rank's share of an evaluation set, ``DistributedSampler`` style (no shuffle).

    Rank r takes samples r, r + W, r + 2W, ...; the list is padded by wrapping around to
    ceil(N / W) entries so that every rank runs the same number of batches (collectives must
    match), and the padding is marked invalid.

    Args:
        num_samples: N, the size of the evaluation set.
        rank: this rank.
        world_size: W, the number of ranks.

    Returns:
        (indices LongTensor [ceil(N/W)], valid BoolTensor [ceil(N/W)]).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if num_samples < 1:
        raise DataError("the evaluation split is empty; check data.root and eval.split")
    per_rank = -(-num_samples // world_size)
    positions = torch.arange(rank, per_rank * world_size, world_size)
    return positions % num_samples, positions < num_samples


def _all_gather_padded(local: Tensor, group: Any) -> tuple[list[Tensor], list[int]]:
    """all_gather of per-rank tensors whose first dimension differs between ranks."""
    world = dist.get_world_size(group)
    device = local.device
    # NCCL only moves CUDA tensors: low-resource evaluation keeps features on the CPU, so they
    # visit the GPU just for the collective.
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if local.ndim - 1 > _MAX_DIMS:
        raise ValueError(f"features with {local.ndim} dims are not supported (max {_MAX_DIMS + 1})")
    header = torch.full((2 + _MAX_DIMS,), -1, dtype=torch.long, device=device)
    header[0], header[1] = local.shape[0], local.ndim
    header[2 : 1 + local.ndim] = torch.tensor(local.shape[1:], dtype=torch.long)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    headers_cpu = [h.cpu() for h in headers]
    sizes = [int(h[0]) for h in headers_cpu]
    if any(not torch.equal(h[1:], headers_cpu[0][1:]) for h in headers_cpu):
        shapes = [tuple(int(x) for x in h[2 : 1 + int(h[1])]) for h in headers_cpu]
        raise ValueError(f"ranks hold features of different per-sample shapes: {shapes}")
    # gloo and nccl need equal shapes in all_gather: pad to the largest rank (>= 1 row so that
    # no backend sees an empty buffer).
    rows = max(max(sizes), 1)
    buf = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=device)
    buf[: local.shape[0]] = local.to(device)
    # bool is not supported by every backend's all_gather
    send = buf.view(torch.uint8) if buf.dtype == torch.bool else buf
    recv = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(recv, send, group=group)
    out = [r.view(torch.bool) if buf.dtype == torch.bool else r for r in recv]
    return [o[:n].to(local.device) for o, n in zip(out, sizes)], sizes


def _order(indices: Tensor, num_samples: int | None) -> Tensor:
    """Permutation putting samples in ascending index order, after checking each is unique."""
    sorted_idx, perm = torch.sort(indices, stable=True)
    dup = sorted_idx[1:][sorted_idx[1:] == sorted_idx[:-1]]
    if dup.numel():
        raise DataError(
            f"sample index(es) {sorted(set(dup.tolist()))[:10]} are marked valid on more than one "
            f"rank; the sampler's padding must be marked valid=False (see get_eval_shard)"
        )
    if num_samples is not None:
        if sorted_idx.numel() != num_samples or (
            num_samples and (int(sorted_idx[0]) != 0 or int(sorted_idx[-1]) != num_samples - 1)
        ):
            present = set(sorted_idx.tolist())
            missing = [i for i in range(num_samples) if i not in present][:10]
            raise DataError(
                f"gathered {sorted_idx.numel()} valid samples for an evaluation set of "
                f"{num_samples} (missing e.g. {missing}); every sample must be valid on "
                f"exactly one rank"
            )
    return perm


def gather_features(
    local: Tensor,
    valid: Tensor | None = None,
    *,
    indices: Tensor | None = None,
    num_samples: int | None = None,
    group: Any = None,
) -> Tensor:
    """Concatenate every rank's valid rows, each sample once, in dataset order.

    Args:
        local: [n_local, ...] this rank's features (n_local may differ between ranks).
        valid: BoolTensor [n_local], False for padding rows (duplicates from the sampler);
            None: every row is valid.
        indices: optional LongTensor [n_local], each row's dataset index: the result is then
            sorted by index, and an index valid on two ranks raises ``DataError``. Without it
            the order is rank 0's valid rows, then rank 1's, ... (contiguous sharding).
        num_samples: optional dataset size: checks that indices 0..N-1 are all present.
        group: process group (default: the world).

    Returns:
        [num_valid_total, ...] on ``local``'s device, identical on every rank.
    """
    if valid is None:
        valid = torch.ones(local.shape[0], dtype=torch.bool, device=local.device)
    valid = torch.as_tensor(valid, device=local.device)
    if valid.dtype != torch.bool or valid.shape != (local.shape[0],):
        raise ValueError(
            f"valid must be a BoolTensor of shape ({local.shape[0]},), got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    if indices is not None:
        indices = torch.as_tensor(indices, device=local.device).long()
        if indices.shape != (local.shape[0],):
            raise ValueError(
                f"indices has shape {tuple(indices.shape)}, expected ({local.shape[0]},)"
            )
    if _dist_world(group) == 1:
        feats = local[valid]
        idx = indices[valid] if indices is not None else None
    else:
        # one collective for the bookkeeping: column 0 = valid, column 1 = index
        idx_col = indices if indices is not None else torch.zeros_like(valid, dtype=torch.long)
        meta = torch.stack([valid.long(), idx_col], dim=1)
        metas, _ = _all_gather_padded(meta, group)
        feats_all, _ = _all_gather_padded(local, group)
        keep = [m[:, 0].bool() for m in metas]
        feats = torch.cat([f[k] for f, k in zip(feats_all, keep)])
        idx = torch.cat([m[k, 1] for m, k in zip(metas, keep)]) if indices is not None else None
    if idx is not None:
        feats = feats[_order(idx, num_samples).to(feats.device)]
    elif num_samples is not None and feats.shape[0] != num_samples:
        raise DataError(
            f"gathered {feats.shape[0]} valid samples for an evaluation set of {num_samples}"
        )
    return feats


def gather_objects(
    local: list[Any],
    valid: Tensor | list[bool] | None = None,
    *,
    indices: Tensor | list[int] | None = None,
    num_samples: int | None = None,
    group: Any = None,
) -> list[Any]:
    """:func:`gather_features` for picklable Python objects (sample keys, captions, metadata).

    Args:
        local: this rank's objects, one per sample.
        valid: per object, False for padding (None: all valid).
        indices: optional dataset index per object (result sorted by it).
        num_samples: optional dataset size to check coverage.
        group: process group (default: the world).

    Returns:
        The valid objects of all ranks, each once, in dataset order, on every rank.
    """
    if valid is None:
        valid = [True] * len(local)
    valid_l = [bool(v) for v in (valid.tolist() if isinstance(valid, Tensor) else valid)]
    if len(valid_l) != len(local):
        raise ValueError(f"{len(valid_l)} valid flags for {len(local)} objects")
    idx_l = None
    if indices is not None:
        idx_l = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if len(idx_l) != len(local):
            raise ValueError(f"{len(idx_l)} indices for {len(local)} objects")
    mine = [
        (obj, idx_l[i] if idx_l is not None else 0) for i, obj in enumerate(local) if valid_l[i]
    ]
    world = _dist_world(group)
    if world == 1:
        pairs = mine
    else:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine, group=group)
        pairs = [p for part in parts for p in part]
    if idx_l is not None:
        perm = _order(torch.tensor([i for _, i in pairs], dtype=torch.long), num_samples)
        return [pairs[i][0] for i in perm.tolist()]
    if num_samples is not None and len(pairs) != num_samples:
        raise DataError(
            f"gathered {len(pairs)} valid samples for an evaluation set of {num_samples}"
        )
    return [obj for obj, _ in pairs]
