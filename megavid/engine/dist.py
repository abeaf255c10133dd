"""Distributed plumbing: the one source of rank info, process-group init, network settings.

``get_world_info()`` reads whichever launcher started us (torchrun / DeepSpeed launcher,
SLURM, OpenMPI) and every other module asks it, never the environment directly. The engine
initialises torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) even for a single
process, so the same code path runs everywhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

from megavid.cluster import DEFAULT_MASTER_PORT, first_slurm_host, format_launch_report, get_network_env
from megavid.errors import LaunchError

log = logging.getLogger(__name__)

# NCCL / network settings applied in one place (only when the user has not set them). The
# values follow what large multi-node jobs need: async error handling so a dead peer raises
# instead of hanging, and a finite heartbeat timeout.
NCCL_DEFAULTS: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    "NCCL_IB_TIMEOUT": "22",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "600",
}
# Variables worth logging at start-up (set by the user or by us).
_NETWORK_VARS = (
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
    "NCCL_DEBUG",
    "NCCL_P2P_DISABLE",
    *NCCL_DEFAULTS,
)


@dataclass(frozen=True)
class WorldInfo:
    """Rank layout of this process, whatever launcher started it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "none"
    """'torchrun' (also the DeepSpeed launcher), 'slurm', 'openmpi' or 'none'."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def to_dict(self) -> dict:
        return asdict(self)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer; fix the launcher") from None


def get_world_info(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank info from the launcher's environment; the single source of truth for the engine.

    Precedence: torchrun / DeepSpeed launcher (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) >
    SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``) > OpenMPI (``OMPI_COMM_WORLD_*``) > a single
    process.

    Args:
        env: the environment to read (default ``os.environ``; tests pass dicts).
    """
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        # the DeepSpeed launcher names them LOCAL_SIZE / CROSS_RANK
        local_key = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in env), None)
        local_world = _int(env, local_key) if local_key else world
        node_key = next((k for k in ("GROUP_RANK", "NODE_RANK", "CROSS_RANK") if k in env), None)
        node_rank = _int(env, node_key) if node_key else rank // max(local_world, 1)
        info = WorldInfo(rank, local_rank, world, local_world, node_rank,
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        ntasks_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(ntasks_node) if ntasks_node.isdigit() else max(world // max(
            _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1, 1), 1)
        node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else rank // local_world
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if world > 1 else "127.0.0.1")
        info = WorldInfo(rank, local_rank, world, local_world, node_rank, addr, port, "slurm")
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        local_world = (_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
                       if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world)
        node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK") if "OMPI_COMM_WORLD_NODE_RANK" in env else (
            rank // max(local_world, 1))
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError("OpenMPI launch without MASTER_ADDR: export MASTER_ADDR=<first host> "
                              "(mpirun -x MASTER_ADDR) so the ranks can rendezvous")
        info = WorldInfo(rank, local_rank, world, local_world, node_rank,
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "openmpi")
    else:
        info = WorldInfo(master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port)
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside world size {info.world_size}; check the launcher")
    if not 0 <= info.local_rank < max(info.local_world_size, 1):
        raise LaunchError(f"local rank {info.local_rank} is outside local world size "
                          f"{info.local_world_size}; check the launcher")
    return info


def apply_network_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the NCCL/network defaults (without overriding the user's) and return the settings.

    Args:
        env: the mapping to update (default ``os.environ``).
    """
    env = os.environ if env is None else env
    for key, value in NCCL_DEFAULTS.items():
        env.setdefault(key, value)
    return {k: env[k] for k in _NETWORK_VARS if k in env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build() -> None:
    # DeepSpeed's TorchBackend JIT-compiles a shared-memory C++ op on CPU at init (~50 s and a
    # compiler on a fresh machine). It only serves inference_all_reduce, which training never
    # calls, so training on CPU skips the build and uses gloo collectives.
    import importlib

    # import_module, not `import deepspeed.comm.torch as m`: the latter resolves the attribute
    # `deepspeed.comm.torch`, which is the torch package re-exported by deepspeed.comm.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def init_distributed(timeout_s: float = 1800.0, device_type: str | None = None) -> WorldInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    Works for one process too (world size 1, no launcher): the engine always runs with a
    process group so ZeRO code paths are the same everywhere.

    Args:
        timeout_s: collective timeout in seconds.
        device_type: 'cpu' or 'cuda' (default: cuda when available).
    """
    import deepspeed

    info = get_world_info()
    if info.world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process needs a rendezvous port too; a free one avoids clashing with another
        # single-process run (or test session) on the same machine using the default 29500.
        info = dataclasses.replace(info, master_port=_free_port())
    # DeepSpeed (env://) reads these; fill them from whichever launcher we found.
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return info
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    settings = apply_network_env()
    if device_type == "cpu":
        _skip_shm_comm_build()
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    log.info("init_distributed: backend=%s %s network=%s", backend, info, settings)
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # rendezvous failures are user-fixable
        raise LaunchError(f"cannot join the process group at {info.master_addr}:{info.master_port} "
                          f"as rank {info.rank}/{info.world_size} ({e}); check MASTER_ADDR/MASTER_PORT "
                          "and that every rank was started") from e
    return info


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice.

    The backward sums the incoming gradients over ranks (all_reduce) before slicing, because
    every rank's loss depends on every rank's features (contrastive losses).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = torch.distributed.get_world_size()
        out = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = torch.distributed.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0, with gradients to each rank's slice.

    Every rank must pass the same batch size. With one process (or no process group) this is
    the identity, so single-process runs need no special case.

    Args:
        x: this rank's tensor.
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a float tensor (returned as a new tensor)."""
    values = values.detach().clone()
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(values)
        values /= get_world_size()
    return values


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums over ranks of a small ``name -> count`` dict (collective; every rank gets
    the same answer, keys sorted)."""
    total: dict[str, int] = {}
    rows = [counts]
    if is_initialized() and get_world_size() > 1:
        rows = [None] * get_world_size()
        torch.distributed.all_gather_object(rows, dict(counts))
    for row in rows:
        for k, v in (row or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def gather_launch_report() -> str | None:
    """Collect every rank's host name and local rank; rank 0 gets the start-up report.

    A collective: every rank must call it after the process group is up (the trainer does,
    right after ``init_distributed``).

    Returns:
        The report on rank 0 (:func:`megavid.cluster.format_launch_report`: one line per rank,
        then the network settings, secrets masked), None on other ranks.
    """
    info = get_world_info()
    row = {"rank": info.rank, "host": socket.gethostname(), "local_rank": info.local_rank}
    rows: list = [row]
    if is_initialized() and get_world_size() > 1:
        rows = [None] * get_world_size()
        torch.distributed.all_gather_object(rows, row)
    return format_launch_report(rows, get_network_env()) if info.rank == 0 else None


def any_across_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on any rank (every rank gets the same answer)."""
    if not is_initialized() or get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


GatherFn = Callable[[torch.Tensor], torch.Tensor]
