# megavid: the per-cluster network choices (interface, transport, debug), in one place.
# Sourced by every launcher (deepspeed.sh, torchrun.sh, slurm.sbatch); rank 0 prints the
# resulting NCCL_*/GLOO_*/TORCH_* values with every rank's host name at start. Values already
# set in the environment win.
#
#   MEGAVID_IFNAME=eth0      inter-node interface for NCCL and Gloo sockets (bootstrap + TCP
#                            transport). Unset: NCCL/Gloo pick one themselves (often docker0/lo
#                            on multi-homed nodes, the classic cause of hangs at init).
#   MEGAVID_NET=ib|efa|socket
#                            ib: InfiniBand verbs (NCCL default when HCAs exist);
#                            efa: AWS EFA through libfabric; socket: TCP only (IB off).
#   MEGAVID_NCCL_DEBUG=INFO  NCCL logging (INIT,NET subsystems) on request.
#   MEGAVID_PYTHON           interpreter with megavid installed (default: python3 on PATH).

if [ -n "${MEGAVID_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$MEGAVID_IFNAME}"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$MEGAVID_IFNAME}"
fi

case "${MEGAVID_NET:-}" in
  "") ;;
  ib) export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}" ;;
  socket) export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-1}" ;;
  efa)
    export FI_PROVIDER="${FI_PROVIDER:-efa}"
    export FI_EFA_USE_DEVICE_RDMA="${FI_EFA_USE_DEVICE_RDMA:-1}"
    export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-1}"
    ;;
  *) echo "megavid: MEGAVID_NET=$MEGAVID_NET is not one of ib, efa, socket" >&2; return 2 2>/dev/null || exit 2 ;;
esac

# NCCL defaults that need no per-cluster choice (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, heartbeat
# and IB timeouts) are set by megavid.engine.dist.apply_network_env in every rank.

if [ -n "${MEGAVID_NCCL_DEBUG:-}" ]; then
  export NCCL_DEBUG="$MEGAVID_NCCL_DEBUG"
  export NCCL_DEBUG_SUBSYS="${NCCL_DEBUG_SUBSYS:-INIT,NET}"
  export TORCH_DISTRIBUTED_DEBUG="${TORCH_DISTRIBUTED_DEBUG:-DETAIL}"
fi

# Offline by design: no model or dataset hub at run time.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

MEGAVID_PYTHON="${MEGAVID_PYTHON:-python3}"
