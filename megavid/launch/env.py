"""The environment every rank must share (.deepspeed_env) and the rank-0 start-up report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

# Environment a remote rank must see exactly as the launching shell does: network/NCCL settings
# (set in one place, launchers/env.sh), offline switches, and PATH/LD_LIBRARY_PATH so the same
# venv and CUDA libraries are found. DeepSpeed's pdsh runner forwards only PYTHON*/UCX*/MV2*
# by itself; the rest goes through the .deepspeed_env file written by write_deepspeed_env.
EXPORT_PREFIXES = (
    "NCCL_",
    "TORCH_NCCL_",
    "TORCH_DISTRIBUTED_",
    "GLOO_",
    "FI_",
    "MEGAVID_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
)
EXPORT_NAMES = ("PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "CUDA_HOME")
# The subset printed at start-up: what decides how ranks talk to each other.
NETWORK_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "GLOO_", "FI_", "MASTER_")


def get_export_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables every remote rank must inherit from the launching shell (sorted)."""
    env = os.environ if environ is None else environ
    keep = {
        k: v
        for k, v in env.items()
        if (k.startswith(EXPORT_PREFIXES) or k in EXPORT_NAMES) and "\n" not in v
    }
    return dict(sorted(keep.items()))


def get_network_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """NCCL / Gloo / rendezvous settings in effect (what rank 0 prints at start)."""
    env = os.environ if environ is None else environ
    return dict(sorted((k, v) for k, v in env.items() if k.startswith(NETWORK_PREFIXES)))


def format_launch_report(ranks: Sequence[Mapping[str, object]], network_env: Mapping[str, str]) -> str:
    """Multi-line start-up report: one line per rank (rank, host, local rank) + network settings.

    Args:
        ranks: one mapping per rank with at least ``rank``, ``host`` and ``local_rank``
            (gathered from every rank by the caller, e.g. ``all_gather_object``).
        network_env: from :func:`get_network_env` on rank 0.
    """
    lines = [f"launch: world_size={len(ranks)} hosts={len({r['host'] for r in ranks})}"]
    for r in sorted(ranks, key=lambda r: int(r["rank"])):  # type: ignore[arg-type]
        lines.append(f"launch: rank {r['rank']} host {r['host']} local_rank {r['local_rank']}")
    for k, v in network_env.items():
        lines.append(f"launch: {k}={v}")
    return "\n".join(lines)


def gather_launch_report() -> str | None:
    """Collect every rank's host name and local rank; rank 0 gets the start-up report.

    A collective: every rank must call it after the process group is up (the engine does, right
    after ``init_distributed``). Rank info comes from :func:`megavid.engine.dist.get_world_info`.

    Returns:
        The report on rank 0 (see :func:`format_launch_report`), None on other ranks.
    """
    import socket

    import torch.distributed as tdist

    from megavid.engine.dist import get_world_info

    info = get_world_info()
    row = {"rank": info.rank, "host": socket.gethostname(), "local_rank": info.local_rank}
    rows: list = [row]
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        rows = [None] * tdist.get_world_size()
        tdist.all_gather_object(rows, row)
    return format_launch_report(rows, get_network_env()) if info.rank == 0 else None


def read_user_deepspeed_env(dirs: Sequence[str | os.PathLike] = ("~", ".")) -> dict[str, str]:
    """The user's own ``.deepspeed_env`` files (home, then the working directory), merged.

    The launcher points DeepSpeed at a generated file (``DS_ENV_FILE``), which makes DeepSpeed
    skip these; their variables are carried over into the generated file instead.
    """
    out: dict[str, str] = {}
    for d in dirs:
        p = Path(d).expanduser() / ".deepspeed_env"
        if p.is_file():
            for ln in p.read_text().splitlines():
                key, sep, value = ln.partition("=")
                if sep and key.strip():
                    out[key.strip()] = value.strip()
    return out


def write_deepspeed_env(path: str | os.PathLike, env: Mapping[str, str]) -> Path:
    """Write a ``.deepspeed_env`` file (``KEY=value`` lines, no blank line: DeepSpeed's runner
    splits every line on '=' and fails on anything else)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return p


