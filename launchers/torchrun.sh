#!/usr/bin/env bash
# Multi-node torch.distributed.run with c10d rendezvous. Run the same line on every node:
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node1:29500 RDZV_ID=exp42 \
#     launchers/torchrun.sh pretrain experiment=demo
#
# NNODES (1), NPROC_PER_NODE (1), RDZV_ENDPOINT (host:port of node 0, required), RDZV_ID
# (megavid), MAX_RESTARTS (0; restarted workers resume from the latest checkpoint),
# NODE_RANK (optional: fixes this node's rank; static rendezvous at RDZV_ENDPOINT),
# LOCAL_ADDR (optional: this node's address when its host name does not resolve to the
# inter-node interface). Network: launchers/env.sh.
# MEGAVID_SCRIPT=path.py runs that Python file (with the same arguments) instead of megavid.cli.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

args=(--nnodes "${NNODES:-1}" --nproc-per-node "${NPROC_PER_NODE:-1}"
      --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
      --rdzv-id "${RDZV_ID:-megavid}" --max-restarts "${MAX_RESTARTS:-0}")
[ -z "${NODE_RANK:-}" ] || args+=(--node-rank "$NODE_RANK")
[ -z "${LOCAL_ADDR:-}" ] || args+=(--local-addr "$LOCAL_ADDR")
[ -z "${MEGAVID_SCRIPT:-}" ] || args+=(--script "$MEGAVID_SCRIPT")
exec "$MEGAVID_PYTHON" -m megavid.launch torchrun "${args[@]}" -- "$@"
