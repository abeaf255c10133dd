"""Multi-node launch helpers: hostfiles, ssh reachability, SLURM node lists, command builders.

The shell launchers in ``launchers/`` only set the environment and call
``python -m megavid.launch <mode> -- <job> <config tokens>``; this module validates what a user
can get wrong (hostfile, allocation, ssh) *before* any rank starts, builds the one command line
of each launcher (``deepspeed --hostfile``, ``torchrun`` with c10d rendezvous, ``srun`` +
``torchrun`` under SLURM) and execs it. Every launcher ends in the same ``megavid.cli`` job, which
reads its rank from :func:`megavid.engine.dist.get_world_info`. What the launcher shares with
the engine (node lists, secret masking, the start-up report's text) lives in
:mod:`megavid.cluster`, which imports neither side.

Modes (``python -m megavid.launch MODE --help``):

- ``check-hostfile HOSTFILE``: parse and probe every host by ssh.
- ``deepspeed --hostfile HOSTFILE -- JOB ...``: DeepSpeed launcher (pdsh runner) + ``.deepspeed_env``.
- ``torchrun --nnodes N --rdzv-endpoint HOST:PORT -- JOB ...``: one node's torchrun.
- ``slurm --launcher torchrun|deepspeed -- JOB ...``: inside an allocation (``launchers/slurm.sbatch``).
- ``make-sbatch --nodes N --gpus-per-node G ... -- JOB ...``: write a ready-to-submit sbatch file.
"""

from megavid.cluster import (
    DEFAULT_MASTER_PORT,
    expand_nodelist,
    format_launch_report,
    get_network_env,
    is_secret_name,
    mask_env,
)
from megavid.launch.cli import build_parser, main
from megavid.launch.commands import (
    DEFAULT_MODULE,
    build_deepspeed_cmd,
    build_slurm_cmd,
    build_srun_cmd,
    build_torchrun_cmd,
    pdsh_export_value,
    pdsh_quote_arg,
)
from megavid.launch.env import (
    get_export_env,
    read_user_deepspeed_env,
    split_secrets,
    write_deepspeed_env,
    write_env_script,
    write_private_file,
)
from megavid.launch.hostfile import (
    check_hosts_reachable,
    copy_private_file,
    format_hostfile,
    parse_hostfile,
    read_hostfile,
)
from megavid.launch.slurm import SlurmAllocation, build_sbatch_script, get_slurm_allocation

__all__ = [
    "DEFAULT_MASTER_PORT", "DEFAULT_MODULE", "SlurmAllocation", "build_deepspeed_cmd", "build_parser",
    "build_sbatch_script", "build_slurm_cmd", "build_srun_cmd", "build_torchrun_cmd", "check_hosts_reachable",
    "copy_private_file", "expand_nodelist", "format_hostfile", "format_launch_report",
    "get_export_env", "get_network_env", "get_slurm_allocation", "is_secret_name", "main", "mask_env",
    "parse_hostfile", "pdsh_export_value", "pdsh_quote_arg", "read_hostfile", "read_user_deepspeed_env",
    "split_secrets", "write_deepspeed_env", "write_env_script", "write_private_file",
]
