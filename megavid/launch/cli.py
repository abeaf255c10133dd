"""``python -m megavid.launch MODE ...``: validate, build the launcher's command line, exec it."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from megavid.parser import Parser
from megavid.cluster import DEFAULT_MASTER_PORT, is_secret_name, mask_env
from megavid.errors import LaunchError
from megavid.launch.commands import build_deepspeed_cmd, build_slurm_cmd, build_torchrun_cmd, uses_remote_shell
from megavid.launch.env import (
    get_export_env,
    read_user_deepspeed_env,
    split_secrets,
    write_deepspeed_env,
    write_env_script,
)
from megavid.launch.hostfile import check_hosts_reachable, copy_private_file, format_hostfile, read_hostfile
from megavid.launch.slurm import build_sbatch_script, get_slurm_allocation


def _launch_env() -> dict[str, str]:
    """os.environ with this interpreter's bin folder on PATH: `torchrun`/`deepspeed` (and, through
    srun and .deepspeed_env, every remote rank) then run from the venv megavid was launched with."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bindir, env["PATH"]]) if env.get("PATH") else bindir
    return env


def _exec(cmd: list[str], *, dry_run: bool, env: Mapping[str, str] | None = None) -> int:
    print("megavid launch: " + shlex.join(cmd), file=sys.stderr, flush=True)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    # exec, not a child: srun/sbatch signals (preemption SIGTERM) must reach the launcher itself
    try:
        os.execvpe(cmd[0], cmd, dict(_launch_env() if env is None else env))
    except FileNotFoundError:
        fix = "run it inside a SLURM allocation" if cmd[0] == "srun" else "activate the venv that has megavid installed"
        raise LaunchError(f"'{cmd[0]}' is not on PATH; {fix}") from None


# DeepSpeed's runner exports variables with these prefixes from its own environment to every
# node (runner.EXPORT_ENVS + the CUDA accelerator's NCCL), onto pdsh's/mpirun's command line
DS_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
# characters DeepSpeed's pdsh runner can put unquoted into the remote command (pdsh eats '%')
_UNQUOTED_OK = re.compile(r"[\w@+=:,./-]+")


def _deepspeed_env(
    env: dict[str, str],
    env_file: Path,
    *,
    hosts: Sequence[str],
    launcher: str,
    ssh_port: int | None = None,
    timeout: float = 5.0,
    copy: bool = True,
) -> None:
    """Write the variables every node must see for DeepSpeed's launcher; point ``env`` at them.

    ``env_file`` (``DS_ENV_FILE``, mode 0600) gets the public ones: DeepSpeed puts them on the
    pdsh/mpirun command line and logs it. Secrets (:func:`is_secret_name`) never go there: with
    the pdsh runner over several nodes they go into ``<env_file>.secrets.sh`` (mode 0600),
    copied to every host by ssh and sourced by each node's shell before its ranks start; other
    multi-node backends do not get them (a note names them). One node: DeepSpeed starts the
    ranks itself, with this environment. ``copy=False`` (a dry run) writes the files only.
    """
    multi_node = len(hosts) > 1
    exports = {**get_export_env(env), **read_user_deepspeed_env()}
    if multi_node:
        # the secrets DeepSpeed would export from its environment: out of it, into our file
        for k in [k for k in env if k.startswith(DS_EXPORT_PREFIXES) and is_secret_name(k)]:
            exports.setdefault(k, env.pop(k))
    public, secret = split_secrets(exports)
    pdsh = uses_remote_shell(launcher, len(hosts))
    script = None
    if pdsh:
        for what, path in (("working directory", os.getcwd()), ("python", sys.executable)):
            if not _UNQUOTED_OK.fullmatch(path):
                raise LaunchError(
                    f"the {what} {path!r} has characters DeepSpeed's pdsh runner passes unquoted to a "
                    f"shell on every node; use a path of letters, digits and _.-/+@=:,"
                )
        if secret:
            script = Path(f"{env_file}.secrets.sh")
            write_env_script(script, secret)
            if copy:
                copy_private_file(hosts, script, ssh_port=ssh_port, timeout=max(timeout, 10.0))
            shown = " ".join(f"{k}={v}" for k, v in mask_env(secret).items())
            print(f"megavid launch: {shown} reach every node through {script} (mode 0600)", file=sys.stderr)
    elif multi_node and secret:
        print(
            f"megavid launch: not forwarded by --launcher={launcher}: {' '.join(sorted(secret))} (secrets stay "
            f"off its command line and log); set them on the nodes or use --launcher=pdsh",
            file=sys.stderr,
        )
    write_deepspeed_env(env_file, public, pdsh=pdsh, env_script=script)
    # DeepSpeed reads DS_ENV_FILE relative to ~ and '.', an absolute path wins in os.path.join
    env["DS_ENV_FILE"] = str(env_file.resolve())


def _job(ns: argparse.Namespace) -> list[str]:
    job = list(ns.job)
    if job[:1] == ["--"]:
        job = job[1:]
    if not job:
        raise LaunchError("no job given; append '-- JOB [config tokens]', e.g. '-- pretrain experiment=demo'")
    return job


def _cmd_check_hostfile(ns: argparse.Namespace) -> int:
    hosts = read_hostfile(ns.hostfile)
    if not ns.no_probe:
        check_hosts_reachable(hosts, ssh_port=ns.ssh_port, timeout=ns.probe_timeout)
    for h, n in hosts.items():
        print(f"{h} slots={n}")
    return 0


def _cmd_deepspeed(ns: argparse.Namespace) -> int:
    job = _job(ns)
    hosts = read_hostfile(ns.hostfile)
    names = list(hosts)
    num_nodes = ns.num_nodes or len(names)
    if num_nodes > len(names):
        raise LaunchError(
            f"--num-nodes={num_nodes} but hostfile {ns.hostfile} lists {len(names)} host(s); "
            f"add hosts or lower --num-nodes"
        )
    used = names[:num_nodes]
    num_gpus = ns.num_gpus or min(hosts[h] for h in used)
    short = [h for h in used if hosts[h] < num_gpus]
    if short:
        raise LaunchError(
            f"--num-gpus={num_gpus} but {', '.join(f'{h} has slots={hosts[h]}' for h in short)}; "
            f"lower --num-gpus or fix the hostfile"
        )
    if not ns.no_check and (num_nodes > 1):
        check_hosts_reachable(used, ssh_port=ns.ssh_port, timeout=ns.probe_timeout)
    env = _launch_env()
    master_addr = ns.master_addr or used[0].split("@")[-1]
    if ns.env_file:
        env_file = Path(ns.env_file)
    else:
        # named by content (secret values masked: a name says nothing about them), so repeated
        # launches reuse one file instead of piling up temp files
        exports = mask_env({**get_export_env(env), **read_user_deepspeed_env()})
        digest = hashlib.sha1(repr(sorted(exports.items())).encode()).hexdigest()[:12]
        env_file = Path(tempfile.gettempdir()) / f"megavid-{os.getuid()}-{digest}.deepspeed_env"
    cmd = build_deepspeed_cmd(
        job,
        hostfile=str(Path(ns.hostfile).resolve()),
        num_nodes=num_nodes,
        num_gpus=num_gpus,
        master_addr=master_addr,
        master_port=ns.master_port,
        launcher=ns.launcher,
        ssh_port=ns.ssh_port,
        script=ns.script,
    )
    _deepspeed_env(env, env_file, hosts=used, launcher=ns.launcher, ssh_port=ns.ssh_port, timeout=ns.probe_timeout,
                   copy=not ns.dry_run)
    return _exec(cmd, dry_run=ns.dry_run, env=env)


def _cmd_torchrun(ns: argparse.Namespace) -> int:
    job = _job(ns)
    if ":" not in ns.rdzv_endpoint:
        raise LaunchError(f"--rdzv-endpoint={ns.rdzv_endpoint!r} needs a port: HOST:PORT (node 0's address)")
    cmd = build_torchrun_cmd(
        job,
        nnodes=ns.nnodes,
        nproc_per_node=ns.nproc_per_node,
        rdzv_endpoint=ns.rdzv_endpoint,
        rdzv_id=ns.rdzv_id,
        max_restarts=ns.max_restarts,
        node_rank=ns.node_rank,
        local_addr=ns.local_addr,
        script=ns.script,
    )
    return _exec(cmd, dry_run=ns.dry_run)


def _cmd_slurm(ns: argparse.Namespace) -> int:
    job = _job(ns)
    alloc = get_slurm_allocation(gpus_per_node=ns.nproc_per_node)
    hostfile = None
    if ns.launcher == "deepspeed":
        hostfile = ns.hostfile or str(Path(alloc.submit_dir) / ".megavid" / f"hostfile-{alloc.job_id}")
        Path(hostfile).parent.mkdir(parents=True, exist_ok=True)
        Path(hostfile).write_text(format_hostfile({n: alloc.gpus_per_node for n in alloc.nodes}))
    cmd = build_slurm_cmd(
        alloc, job, launcher=ns.launcher, hostfile=hostfile, max_restarts=ns.max_restarts, script=ns.script
    )
    print(
        f"megavid launch: SLURM job {alloc.job_id}: {alloc.num_nodes} node(s) x {alloc.gpus_per_node} "
        f"= world size {alloc.world_size}, master {alloc.master_addr}:{alloc.master_port}, "
        f"restart {alloc.restart_count}",
        file=sys.stderr,
    )
    if ns.launcher == "deepspeed":
        env = _launch_env()
        env_file = Path(hostfile).with_name(f"deepspeed_env-{alloc.job_id}")
        _deepspeed_env(env, env_file, hosts=alloc.nodes, launcher="pdsh", copy=not ns.dry_run)
        return _exec(cmd, dry_run=ns.dry_run, env=env)
    return _exec(cmd, dry_run=ns.dry_run)


def _cmd_make_sbatch(ns: argparse.Namespace) -> int:
    job = list(ns.job[1:] if ns.job[:1] == ["--"] else ns.job)
    text = build_sbatch_script(
        nodes=ns.nodes,
        gpus_per_node=ns.gpus_per_node,
        time=ns.time,
        partition=ns.partition,
        account=ns.account,
        job_name=ns.job_name,
        cpus_per_task=ns.cpus_per_task,
        launcher=ns.launcher,
        job_args=job,
    )
    if ns.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(ns.output).write_text(text)
        os.chmod(ns.output, 0o755)
        print(f"wrote {ns.output}; submit with: sbatch {ns.output}", file=sys.stderr)
    return 0


def build_parser() -> Parser:
    """``megavid launch``'s parser (also ``python -m megavid.launch``, as launchers/ call it)."""
    p = Parser(
        prog="megavid launch",
        description="Multi-node launch: check a hostfile, run the DeepSpeed launcher, torchrun or SLURM, "
        "or write an sbatch file. Every rank of a launched job runs the same `megavid JOB`.",
        epilog="Run `megavid launch MODE --help` for a mode's options; launchers/README.md has a recipe "
        "for each, e.g. `megavid launch torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint "
        "node1:29500 -- pretrain experiment=demo` on each node.",
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE", help="the launcher to use")

    def job_arg(s: argparse.ArgumentParser) -> None:
        s.add_argument("--script", help="run this Python file instead of 'python -m megavid.cli' (tests)")
        s.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
        s.add_argument("job", nargs=argparse.REMAINDER, help="-- JOB [config tokens]")

    def probe_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--ssh-port", type=int, help="ssh port (default: ssh's own configuration)")
        s.add_argument("--probe-timeout", type=float, default=5.0, help="seconds per host of the ssh probe")

    s = sub.add_parser("check-hostfile", help="validate a hostfile and probe its hosts by ssh",
                       description="Validate a hostfile ('host slots=N' lines) and probe every host with "
                       "a non-interactive ssh.")
    s.add_argument("hostfile", help="the hostfile to check")
    s.add_argument("--no-probe", action="store_true", help="only parse, do not ssh")
    probe_args(s)
    s.set_defaults(fn=_cmd_check_hostfile)

    s = sub.add_parser("deepspeed", help="DeepSpeed launcher over a hostfile (pdsh/ssh)",
                       description="Run the job on the hosts of a hostfile with DeepSpeed's launcher, "
                       "after checking that every host answers ssh.")
    s.add_argument("--hostfile", required=True, help="'host slots=N' lines, one per node")
    s.add_argument("--num-nodes", type=int, default=0, help="first N hosts (default: all)")
    s.add_argument("--num-gpus", type=int, default=0, help="processes per node (default: min slots)")
    s.add_argument("--master-addr", default="", help="default: the first host")
    s.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help="rendezvous port on the master")
    s.add_argument("--launcher", default="pdsh", help="DeepSpeed backend: pdsh, openmpi, slurm, ...")
    s.add_argument("--no-check", action="store_true", help="skip the ssh probe of every host")
    probe_args(s)
    s.add_argument("--env-file", help="where to write the .deepspeed_env export file")
    job_arg(s)
    s.set_defaults(fn=_cmd_deepspeed)

    s = sub.add_parser("torchrun", help="this node's torchrun (c10d rendezvous)",
                       description="Start this node's ranks with torchrun; run the same command on "
                       "every node.")
    s.add_argument("--nnodes", type=int, required=True, help="number of nodes")
    s.add_argument("--nproc-per-node", type=int, default=1, help="ranks (GPUs) on this node")
    s.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of node 0")
    s.add_argument("--rdzv-id", default="megavid", help="job id shared by all nodes")
    s.add_argument("--max-restarts", type=int, default=0, help="restarts of all workers after a failure")
    s.add_argument("--node-rank", type=int, help="fix this node's rank (static rendezvous)")
    s.add_argument("--local-addr", help="address other nodes reach this node by")
    job_arg(s)
    s.set_defaults(fn=_cmd_torchrun)

    s = sub.add_parser("slurm", help="inside an sbatch allocation: srun+torchrun or deepspeed",
                       description="Inside an sbatch allocation: start the job on all its nodes with "
                       "srun + torchrun, or with DeepSpeed's launcher.")
    s.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun",
                   help="how ranks are started")
    s.add_argument("--nproc-per-node", type=int, help="default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE")
    s.add_argument("--max-restarts", type=int, default=0, help="torchrun: restarts of all workers after a failure")
    s.add_argument("--hostfile", help="deepspeed: where to write the hostfile")
    job_arg(s)
    s.set_defaults(fn=_cmd_slurm)

    s = sub.add_parser("make-sbatch", help="write an sbatch script for N nodes x G GPUs",
                       description="Write a ready-to-submit sbatch script (launchers/slurm.sbatch with "
                       "its #SBATCH header filled in), the job baked in.")
    s.add_argument("--nodes", type=int, required=True, help="number of nodes")
    s.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    s.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account")
    s.add_argument("--job-name", default="megavid", help="SLURM job name")
    s.add_argument("--cpus-per-task", type=int, help="CPUs of each node's task (default: SLURM's)")
    s.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun",
                   help="how the script starts ranks")
    s.add_argument("-o", "--output", help="file to write (default: stdout)")
    s.add_argument("job", nargs=argparse.REMAINDER, help="-- JOB [config tokens] baked into the script")
    s.set_defaults(fn=_cmd_make_sbatch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``megavid launch`` and ``python -m megavid.launch``; user errors (usage
    mistakes too) print one line and exit 2."""
    ns = build_parser().parse_args(None if argv is None else list(argv))
    try:
        return int(ns.fn(ns) or 0)
    except LaunchError as e:
        print(f"megavid launch {ns.mode}: error: {e}", file=sys.stderr)
        return 2

