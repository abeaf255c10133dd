"""SLURM: the allocation from ``SLURM_*`` (node lists expanded without scontrol by
:func:`megavid.cluster.expand_nodelist`), the sbatch generator."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from megavid.cluster import DEFAULT_MASTER_PORT, expand_nodelist
from megavid.errors import LaunchError

TEMPLATE_SBATCH = Path(__file__).resolve().parents[2] / "launchers" / "slurm.sbatch"


@dataclass(frozen=True, slots=True)
class SlurmAllocation:
    """What a launcher needs to know about the SLURM allocation it runs in."""

    job_id: str
    nodes: tuple[str, ...]
    gpus_per_node: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    submit_dir: str = "."

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    # SLURM_GPUS_PER_NODE may read "a100:8"; SLURM_TASKS_PER_NODE "8(x4)"
    m = re.match(r"^(?:[\w-]+:)?(\d+)", value)
    if not m:
        raise LaunchError(f"{key}={value!r} is not a number; unset it or fix the sbatch options")
    return int(m.group(1))


def get_slurm_allocation(
    environ: Mapping[str, str] | None = None, *, gpus_per_node: int | None = None
) -> SlurmAllocation:
    """Read the allocation from ``SLURM_*`` (no scontrol needed).

    Master address is the first node of ``SLURM_JOB_NODELIST``; the port is ``MASTER_PORT`` or
    ``29500 + job_id % 1000`` (so two jobs sharing a node do not collide); processes per node come
    from ``gpus_per_node``, else ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``, else 1.

    Args:
        environ: the environment (default: ``os.environ``).
        gpus_per_node: processes per node, overriding the SLURM variables.

    Raises:
        LaunchError: not inside an allocation, or inconsistent ``SLURM_*`` values.
    """
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "not inside a SLURM allocation (SLURM_JOB_NODELIST is unset); submit with "
            "'sbatch launchers/slurm.sbatch JOB ...' or use launchers/torchrun.sh"
        )
    nodes = expand_nodelist(nodelist)
    declared = _int_env(env, "SLURM_JOB_NUM_NODES") or _int_env(env, "SLURM_NNODES")
    if declared is not None and declared != len(nodes):
        raise LaunchError(
            f"SLURM_JOB_NUM_NODES={declared} but SLURM_JOB_NODELIST={nodelist!r} names "
            f"{len(nodes)} node(s); the environment is inconsistent (run inside the sbatch job)"
        )
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    if gpus_per_node is None:
        gpus_per_node = _int_env(env, "SLURM_GPUS_ON_NODE") or _int_env(env, "SLURM_GPUS_PER_NODE") or 1
    if gpus_per_node < 1:
        raise LaunchError(f"processes per node must be >= 1, got {gpus_per_node}")
    port = _int_env(env, "MASTER_PORT")
    if port is None:
        port = DEFAULT_MASTER_PORT + (int(job_id) % 1000 if job_id.isdigit() else 0)
    return SlurmAllocation(
        job_id=job_id,
        nodes=tuple(nodes),
        gpus_per_node=gpus_per_node,
        master_addr=nodes[0],
        master_port=port,
        restart_count=_int_env(env, "SLURM_RESTART_COUNT") or 0,
        submit_dir=env.get("SLURM_SUBMIT_DIR", "."),
    )


# --------------------------------------------------------------------------------------------
# sbatch generator
# --------------------------------------------------------------------------------------------
def build_sbatch_script(
    *,
    nodes: int,
    gpus_per_node: int,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    job_name: str = "megavid",
    cpus_per_task: int | None = None,
    launcher: str = "torchrun",
    job_args: Sequence[str] = (),
    template: str | os.PathLike = TEMPLATE_SBATCH,
) -> str:
    """A ready-to-submit sbatch script: ``launchers/slurm.sbatch`` with its ``#SBATCH`` header
    replaced and (optionally) the job baked in.

    Args:
        nodes: number of nodes.
        gpus_per_node: GPUs (= ranks) per node.
        time: wall-clock limit (``HH:MM:SS`` or ``D-HH:MM:SS``).
        partition: SLURM partition.
        account: SLURM account.
        job_name: SLURM job name.
        cpus_per_task: CPUs for the one task per node (default: SLURM's).
        launcher: 'torchrun' or 'deepspeed'.
        job_args: the megavid job and config tokens run when the script gets no arguments.
        template: the sbatch template.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    if launcher not in ("torchrun", "deepspeed"):
        raise LaunchError(f"unknown launcher '{launcher}'; use 'torchrun' or 'deepspeed'")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", time):
        raise LaunchError(f"--time={time!r} is not a SLURM time; use HH:MM:SS or D-HH:MM:SS")
    header = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
    ]
    if cpus_per_task:
        header.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    if account:
        header.append(f"#SBATCH --account={account}")
    lines = Path(template).read_text().splitlines()
    # keep the template's other #SBATCH lines (requeue, signal, output), replace the ones we set
    ours = {h.split("=", 1)[0] for h in header}
    body = [ln for ln in lines[1:] if not (ln.startswith("#SBATCH") and ln.split("=", 1)[0] in ours)]
    extra = [f'export MEGAVID_LAUNCHER="${{MEGAVID_LAUNCHER:-{launcher}}}"']
    if job_args:
        extra.append(f"[ $# -gt 0 ] || set -- {shlex.join(job_args)}")
    out: list[str] = [lines[0], *header]
    for ln in body:
        out.append(ln)
        if ln.strip() == "# @megavid-generated@":
            out += extra
    return "\n".join(out) + "\n"


