#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (pdsh over ssh). Run once, on the first host:
#
#   HOSTFILE=hostfile GPUS_PER_NODE=8 launchers/deepspeed.sh pretrain experiment=demo
#
# The hostfile ('host slots=N' lines) is validated and every host probed with a
# non-interactive ssh before anything starts. The network settings (launchers/env.sh), PATH
# and offline switches reach every rank through a generated .deepspeed_env file.
# HOSTFILE (required), NUM_NODES (all hosts), GPUS_PER_NODE (smallest slots), MASTER_ADDR (the
# first host), MASTER_PORT (29500), SSH_PORT, DS_LAUNCHER (pdsh; openmpi, slurm, ...).
# MEGAVID_SCRIPT=path.py runs that Python file (with the same arguments) instead of megavid.cli.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

args=(--hostfile "${HOSTFILE:?set HOSTFILE=path to a hostfile with lines 'host slots=N'}"
      --num-nodes "${NUM_NODES:-0}" --num-gpus "${GPUS_PER_NODE:-0}"
      --master-port "${MASTER_PORT:-29500}" --launcher "${DS_LAUNCHER:-pdsh}")
[ -z "${MASTER_ADDR:-}" ] || args+=(--master-addr "$MASTER_ADDR")
[ -z "${SSH_PORT:-}" ] || args+=(--ssh-port "$SSH_PORT")
[ -z "${MEGAVID_SCRIPT:-}" ] || args+=(--script "$MEGAVID_SCRIPT")
exec "$MEGAVID_PYTHON" -m megavid.launch deepspeed "${args[@]}" -- "$@"
