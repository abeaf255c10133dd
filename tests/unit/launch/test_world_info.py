"""What each launcher puts in the environment reaches megavid.engine.dist.get_world_info."""

from __future__ import annotations

import pytest

from megavid.engine.dist import get_world_info


def _deepspeed_launch_env(node_rank: int, nnodes: int, slots: int, local_rank: int) -> dict[str, str]:
    # the variables deepspeed/launcher/launch.py sets for each process it spawns
    from deepspeed.constants import CROSS_RANK, CROSS_SIZE

    return {"RANK": str(node_rank * slots + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(nnodes * slots), "LOCAL_SIZE": str(slots), CROSS_RANK: str(node_rank),
            CROSS_SIZE: str(nnodes), "MASTER_ADDR": "host1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("node_rank, nnodes, slots, local_rank", [(1, 2, 1, 0), (0, 2, 1, 0), (3, 4, 8, 5)])
def test_deepspeed_launcher_layout(node_rank, nnodes, slots, local_rank):
    info = get_world_info(_deepspeed_launch_env(node_rank, nnodes, slots, local_rank))
    assert (info.rank, info.world_size) == (node_rank * slots + local_rank, nnodes * slots)
    assert (info.local_rank, info.local_world_size, info.node_rank) == (local_rank, slots, node_rank)
    assert (info.master_addr, info.master_port) == ("host1", 29500)


def test_torchrun_layout():
    # torchrun (elastic agent) sets GROUP_RANK and LOCAL_WORLD_SIZE
    env = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
           "MASTER_ADDR": "node01", "MASTER_PORT": "29734"}
    info = get_world_info(env)
    assert (info.rank, info.local_rank, info.local_world_size, info.node_rank) == (9, 1, 8, 1)
