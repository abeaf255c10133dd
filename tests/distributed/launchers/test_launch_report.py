"""gather_launch_report: two real gloo ranks; rank 0 gets every rank's host and local rank plus
the network settings, other ranks get None."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _rank(rank: int, store: str, out: str) -> None:
    from megavid.launch import gather_launch_report

    # what torchrun would set: megavid reads rank info from the launcher's environment
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      NCCL_SOCKET_IFNAME="eth7", GLOO_SOCKET_IFNAME="lo")
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        report = gather_launch_report()
        with open(f"{out}.{rank}", "w") as f:
            json.dump(report, f)
    finally:
        tdist.destroy_process_group()


def test_rank0_reports_every_rank_and_the_network(tmp_path):
    out = str(tmp_path / "report")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    host = socket.gethostname()
    lines = json.load(open(f"{out}.0")).splitlines()
    assert lines[:3] == [
        "launch: world_size=2 hosts=1",
        f"launch: rank 0 host {host} local_rank 0",
        f"launch: rank 1 host {host} local_rank 1",
    ]
    network = lines[3:]
    assert "launch: GLOO_SOCKET_IFNAME=lo" in network and "launch: NCCL_SOCKET_IFNAME=eth7" in network
    assert network == sorted(network)
    assert json.load(open(f"{out}.1")) is None
