"""gather_launch_report: two real gloo ranks; rank 0 gets every rank's host and local rank plus
the network settings, other ranks get None."""

from __future__ import annotations

import os
import socket

import pytest

from tests.helpers.multiprocess import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _rank(rank: int) -> str | None:
    from megavid.engine.dist import gather_launch_report

    # what torchrun would set (the harness sets RANK, LOCAL_RANK, WORLD_SIZE and
    # LOCAL_WORLD_SIZE): megavid reads rank info from the launcher's environment
    os.environ.update(NCCL_SOCKET_IFNAME="eth7", GLOO_SOCKET_IFNAME="lo")
    return gather_launch_report()


def test_rank0_reports_every_rank_and_the_network():
    reports = run_ranks(_rank, 2)
    host = socket.gethostname()
    lines = reports[0].splitlines()
    assert lines[:3] == [
        "launch: world_size=2 hosts=1",
        f"launch: rank 0 host {host} local_rank 0",
        f"launch: rank 1 host {host} local_rank 1",
    ]
    network = lines[3:]
    assert "launch: GLOO_SOCKET_IFNAME=lo" in network and "launch: NCCL_SOCKET_IFNAME=eth7" in network
    assert network == sorted(network)
    assert reports[1] is None
