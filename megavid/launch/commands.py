"""The one command line of each launcher: ``deepspeed --hostfile``, ``torchrun`` (c10d or
static rendezvous), ``srun`` + ``torchrun`` or the DeepSpeed launcher under SLURM."""

from __future__ import annotations

import re
import shlex
from typing import Sequence

from megavid.cluster import DEFAULT_MASTER_PORT
from megavid.errors import LaunchError
from megavid.launch.slurm import SlurmAllocation

DEFAULT_MODULE = "megavid.cli"
"""The Python module every launcher runs: the same CLI a single-process run uses."""


# DeepSpeed's MultiNodeRunner.add_export leaves a value with only these characters unquoted
_DS_EXPORT_SAFE = re.compile(r"[\w@%+=:,./-]*")
# a host name, IPv4 or IPv6 address: what --master_addr may hold (it reaches a remote shell unquoted)
_ADDR_RE = re.compile(r"[A-Za-z0-9_.:-]+")


def _dq_escape(text: str) -> str:
    """Backslash the characters that stay special inside double quotes, except '"' itself."""
    return re.sub(r"([\\$`])", r"\\\1", text)


def pdsh_quote_arg(arg: str, *, runner_quotes_spaces: bool = True) -> str:
    """``arg`` as DeepSpeed's pdsh runner must get it for every node's shell to get ``arg`` back.

    The runner (``PDSHRunner``) puts the job into one command string that pdsh runs in a remote
    shell on every node: an argument with a space goes in double quotes with its '"' escaped
    (``$(...)``, backquotes and backslashes inside still act), any other argument goes in as it
    is. So an argument with a space gets a backslash before each backslash, dollar and backquote
    (the runner adds the quotes and escapes '"'); any other argument, and the script (``runner_
    quotes_spaces=False``: the runner never touches it), is quoted with :func:`shlex.quote`.
    Last, ``%`` is doubled: pdsh replaces ``%n``, ``%h``, ``%u`` in the remote command, ``%%``
    by ``%``. (Wrapping every argument in :func:`shlex.quote` alone would not do: inside the
    runner's double quotes the single quotes are plain characters and ``$(...)`` still runs.)
    """
    quoted = _dq_escape(arg) if runner_quotes_spaces and " " in arg else shlex.quote(arg)
    return quoted.replace("%", "%%")


def pdsh_export_value(value: str) -> str:
    """``value`` as a ``.deepspeed_env`` value that DeepSpeed's pdsh runner hands to every
    node's shell intact.

    The runner writes ``export KEY=VALUE;`` into the remote command and puts double quotes
    around a value with any character but letters, digits and ``_@%+=:,./-``, escaping nothing
    (``$(...)`` in it would run on every node, a '"' would end it): escaped here for the inside
    of double quotes, the value comes out as it went in. ``%`` is doubled for pdsh. DeepSpeed
    strips the value: leading and trailing blanks are lost.
    """
    value = value.strip()
    if not _DS_EXPORT_SAFE.fullmatch(value):
        value = _dq_escape(value).replace('"', '\\"')
    return value.replace("%", "%%")


def uses_remote_shell(launcher: str, num_nodes: int) -> bool:
    """Whether DeepSpeed runs the job through a remote shell: its pdsh runner over more than
    one node (one node: a local process; mpirun/srun backends: argument vectors, no shell)."""
    return launcher.lower() == "pdsh" and num_nodes > 1


def _entry(job_args: Sequence[str], script: str | None, module: str, *, module_flag: str) -> list[str]:
    return ([script] if script else [module_flag, module]) + list(job_args)


def build_deepspeed_cmd(
    job_args: Sequence[str],
    *,
    hostfile: str,
    num_nodes: int,
    num_gpus: int,
    master_addr: str,
    master_port: int = DEFAULT_MASTER_PORT,
    launcher: str = "pdsh",
    ssh_port: int | None = None,
    script: str | None = None,
    module: str = DEFAULT_MODULE,
) -> list[str]:
    """``deepspeed --hostfile ...`` running ``python -m megavid.cli JOB ...`` on every slot.

    Over several nodes with the pdsh runner, the job arguments and the script reach a shell on
    every node: they are quoted (:func:`pdsh_quote_arg`) so that each node gets them intact,
    ``run.name='a b$(cmd)'`` included.

    ``--no_local_rank``: megavid reads LOCAL_RANK from the environment, so the CLI never sees
    a stray ``--local_rank`` argument. ``--no_ssh_check``: :func:`check_hosts_reachable` has
    already probed every host non-interactively (DeepSpeed's own check probes only the first
    one and may hang on a password prompt).

    Args:
        job_args: the megavid job and its config tokens (``["pretrain", "experiment=demo"]``).
        hostfile: validated hostfile path.
        num_nodes: first N hosts of the hostfile.
        num_gpus: processes per node.
        master_addr: rendezvous address (node 0).
        master_port: rendezvous port.
        launcher: DeepSpeed multi-node backend (pdsh, openmpi, slurm, ...).
        ssh_port: ssh port for pdsh.
        script: run this Python file instead of ``-m module`` (tests).
        module: the module to run.

    Raises:
        LaunchError: ``master_addr`` is not a host name or address.
    """
    if not _ADDR_RE.fullmatch(master_addr):
        raise LaunchError(f"--master-addr={master_addr!r} is not a host name or an IP address")
    if uses_remote_shell(launcher, num_nodes):
        job_args = [pdsh_quote_arg(a) for a in job_args]
        script = None if script is None else pdsh_quote_arg(script, runner_quotes_spaces=False)
        module = pdsh_quote_arg(module, runner_quotes_spaces=False)
    cmd = [
        "deepspeed",
        f"--hostfile={hostfile}",
        f"--num_nodes={num_nodes}",
        f"--num_gpus={num_gpus}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        f"--launcher={launcher}",
    ]
    if ssh_port is not None:
        cmd.append(f"--ssh_port={ssh_port}")
    cmd += ["--no_ssh_check", "--no_local_rank"]
    return cmd + _entry(job_args, script, module, module_flag="--module")


def build_torchrun_cmd(
    job_args: Sequence[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    rdzv_endpoint: str,
    rdzv_id: str = "megavid",
    max_restarts: int = 0,
    node_rank: int | None = None,
    local_addr: str | None = None,
    script: str | None = None,
    module: str = DEFAULT_MODULE,
) -> list[str]:
    """``torchrun`` with c10d (or, given ``node_rank``, static) rendezvous running
    ``python -m megavid.cli JOB ...``.

    With ``max_restarts > 0`` torchrun restarts all workers after a failure; the restarted job
    resumes from the run directory's latest checkpoint (the engine's default).

    Args:
        job_args: the megavid job and its config tokens.
        nnodes: number of nodes.
        nproc_per_node: processes (GPUs) per node.
        rdzv_endpoint: ``host:port`` of the c10d store (node 0).
        rdzv_id: job id shared by all nodes (SLURM_JOB_ID under SLURM).
        max_restarts: elastic restarts before giving up.
        node_rank: fixes this node's rank with static rendezvous (otherwise c10d assigns node
            ranks in arrival order).
        local_addr: address other nodes reach this node by (when the hostname does not resolve
            to the inter-node interface).
        script: run this Python file instead of ``-m module`` (tests).
        module: the module to run.
    """
    cmd = [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc_per_node}",
        # torchrun ignores --node_rank under c10d (ranks go by arrival); a fixed rank needs static
        f"--rdzv_backend={'c10d' if node_rank is None else 'static'}",
        f"--rdzv_endpoint={rdzv_endpoint}",
        f"--rdzv_id={rdzv_id}",
        f"--max_restarts={max_restarts}",
    ]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    if local_addr:
        cmd.append(f"--local_addr={local_addr}")
    return cmd + _entry(job_args, script, module, module_flag="-m")


def build_srun_cmd(inner: Sequence[str], *, num_nodes: int) -> list[str]:
    """``srun`` starting ``inner`` once per node (torchrun then starts the per-GPU ranks).

    ``--kill-on-bad-exit``: one failed node ends the step instead of leaving the others waiting
    in a collective until the NCCL timeout.
    """
    return [
        "srun",
        f"--nodes={num_nodes}",
        f"--ntasks={num_nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        *inner,
    ]


def build_slurm_cmd(
    alloc: SlurmAllocation,
    job_args: Sequence[str],
    *,
    launcher: str = "torchrun",
    hostfile: str | None = None,
    max_restarts: int = 0,
    script: str | None = None,
    module: str = DEFAULT_MODULE,
) -> list[str]:
    """The command an sbatch script runs on the first node of ``alloc``.

    ``torchrun``: ``srun`` one torchrun per node, c10d rendezvous on the first node with the
    job id as rendezvous id. ``deepspeed``: the DeepSpeed launcher on this node with a hostfile
    written from the node list (it reaches the other nodes by ssh/pdsh).

    Args:
        alloc: from :func:`get_slurm_allocation`.
        job_args: the megavid job and its config tokens.
        launcher: 'torchrun' or 'deepspeed'.
        hostfile: where the deepspeed hostfile is (required for 'deepspeed').
        max_restarts: torchrun elastic restarts.
        script: run this Python file instead of ``-m module`` (tests).
        module: the module to run.
    """
    if launcher == "torchrun":
        inner = build_torchrun_cmd(
            job_args,
            nnodes=alloc.num_nodes,
            nproc_per_node=alloc.gpus_per_node,
            rdzv_endpoint=f"{alloc.master_addr}:{alloc.master_port}",
            rdzv_id=alloc.job_id,
            max_restarts=max_restarts,
            script=script,
            module=module,
        )
        return build_srun_cmd(inner, num_nodes=alloc.num_nodes)
    if launcher == "deepspeed":
        if hostfile is None:
            raise LaunchError("the deepspeed launcher needs a hostfile path; pass hostfile=")
        return build_deepspeed_cmd(
            job_args,
            hostfile=hostfile,
            num_nodes=alloc.num_nodes,
            num_gpus=alloc.gpus_per_node,
            master_addr=alloc.master_addr,
            master_port=alloc.master_port,
            script=script,
            module=module,
        )
    raise LaunchError(f"unknown launcher '{launcher}'; use 'torchrun' or 'deepspeed'")


