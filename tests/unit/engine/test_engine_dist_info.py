"""Rank info from every launcher's environment (megavid.engine.dist.get_world_info)."""

import pytest
import torch

from megavid.cluster import first_slurm_host
from megavid.engine.dist import NCCL_DEFAULTS, WorldInfo, all_gather_with_grad, apply_network_env, get_world_info
from megavid.errors import LaunchError


def test_single_process_default():
    assert get_world_info({}) == WorldInfo()


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"}
    info = get_world_info(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.node_rank) == (5, 1, 8, 4, 1)
    assert (info.master_addr, info.master_port, info.launcher) == ("10.0.0.2", 1234, "torchrun")


def test_deepspeed_launcher_env_without_group_rank():
    # the DeepSpeed launcher sets RANK/WORLD_SIZE/LOCAL_RANK but no GROUP_RANK
    info = get_world_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert info.node_rank == 1 and info.local_rank == 1


def test_slurm_env_and_nodelist():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-[07-08,11],cpu1"}
    info = get_world_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (6, 8, 2, 4, 1)
    assert info.master_addr == "gpu-07" and info.launcher == "slurm"


@pytest.mark.parametrize("nodelist, first", [("node01", "node01"), ("a[3-5]", "a3"), ("x[010,2]", "x010"),
                                             ("h1,h2", "h1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_openmpi_env():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0"}
    info = get_world_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.node_rank, info.launcher) == (3, 4, 1, 1, "openmpi")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        get_world_info({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert get_world_info(env).launcher == "torchrun"


@pytest.mark.parametrize("env, match", [({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
                                        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size")])
def test_bad_env_is_a_launch_error(env, match):
    with pytest.raises(LaunchError, match=match):
        get_world_info(env)


def test_network_env_keeps_user_values():
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_SOCKET_IFNAME": "eth1"}
    applied = apply_network_env(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert applied["NCCL_SOCKET_IFNAME"] == "eth1"
    assert all(k in env for k in NCCL_DEFAULTS)


def test_all_gather_without_process_group_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
