"""What the launcher (``megavid.launch``) and the engine (``megavid.engine``) both know about a
cluster: the default rendezvous port, SLURM node lists, which variables hold secrets, and the
text of the rank-0 start-up report.

It imports nothing of either side (standard library and ``megavid.errors`` only), so the engine
reads it without importing the launcher and the launcher without importing torch.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

from megavid.errors import LaunchError

DEFAULT_MASTER_PORT = 29500
"""torch.distributed's usual rendezvous port, used when ``MASTER_PORT`` is not set."""


# --------------------------------------------------------------------------------------------
# SLURM node lists
# --------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"node list '{text}' has an unmatched ']'; check SLURM_JOB_NODELIST")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"node list '{text}' has an unmatched '['; check SLURM_JOB_NODELIST")
    parts.append("".join(cur))
    return parts


def _expand_item(item: str, whole: str) -> list[str]:
    start = item.find("[")
    if start < 0:
        return [item]
    end = item.index("]", start)
    prefix, body, rest = item[:start], item[start + 1 : end], item[end + 1 :]
    values: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(
                f"node list '{whole}': bad range '{part}' in '[{body}]'; "
                f"expected numbers like node[01-04,07]"
            )
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"node list '{whole}': range '{part}' runs backwards; write it low-high")
        # SLURM pads every number in a range to the width of its first bound: n[08-10] -> n08 n09 n10
        values += [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    tails = _expand_item(rest, whole)
    return [prefix + v + t for v in values for t in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression (``scontrol show hostnames`` without scontrol).

    ``"node[01-04,07],gpu-a,rack[1-2]-n[1-2]"`` -> node01 node02 node03 node04 node07 gpu-a
    rack1-n1 rack1-n2 rack2-n1 rack2-n2 (order kept, duplicates dropped).

    Args:
        nodelist: the expression, e.g. ``$SLURM_JOB_NODELIST``.

    Raises:
        LaunchError: unbalanced brackets, a bad range or an empty list.
    """
    nodes: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        item = item.strip()
        if not item:
            continue
        for node in _expand_item(item, nodelist):
            if node not in nodes:
                nodes.append(node)
    if not nodes:
        raise LaunchError(f"node list '{nodelist}' is empty; check SLURM_JOB_NODELIST")
    return nodes


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04,07],other`` -> ``node01``): the rendezvous
    host of a SLURM job (:func:`expand_nodelist`'s first node)."""
    return expand_nodelist(nodelist)[0]


# --------------------------------------------------------------------------------------------
# Secrets and the start-up report
# --------------------------------------------------------------------------------------------
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD")
"""A variable whose name contains one of these (any case) holds a secret (HF_TOKEN,
WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...), except TOKENIZER (Hugging
Face's TOKENIZERS_PARALLELISM, which every launcher sets). A substring match: it also masks a
few harmless names (NCCL_IB_PKEY), which costs nothing."""
MASK = "***"
_SECRET_RE = re.compile("|".join(w + ("(?!IZER)" if w == "TOKEN" else "") for w in SECRET_WORDS), re.IGNORECASE)

NETWORK_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "GLOO_", "FI_", "MASTER_")
"""The variables the start-up report prints: what decides how ranks talk to each other."""


def is_secret_name(name: str) -> bool:
    """Whether the variable ``name`` holds a secret (see :data:`SECRET_WORDS`)."""
    return bool(_SECRET_RE.search(name))


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the value of every secret variable replaced by ``***``: the one way any
    environment is printed or logged (order kept)."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in env.items()}


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
    for k, v in mask_env(network_env).items():
        lines.append(f"launch: {k}={v}")
    return "\n".join(lines)
