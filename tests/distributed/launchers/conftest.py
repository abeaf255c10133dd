"""Fixtures of the multi-node launcher tests: virtual hosts (network namespaces), sshd in them,
and the reference run (the same job as 1 node x 2 processes).

Under CI=true a missing capability (no `ip`, no sshd/pdsh, no CAP_NET_ADMIN) fails the tests:
CI must exercise them. Elsewhere it skips them with the reason.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from multinode_helpers import REPO, PretrainJob, job_env, missing_capability, run_checked
from vhosts import MissingCapability, SshCluster, VirtualHosts

from tests.helpers.multiprocess import free_port


@pytest.fixture(scope="module")
def vhosts():
    """Two virtual hosts, host1 (10.231.0.1) and host2 (10.231.0.2), torn down afterwards."""
    hosts = VirtualHosts(2)
    try:
        hosts.start()
    except MissingCapability as e:
        missing_capability(str(e))
    try:
        yield hosts
    finally:
        hosts.close()


@pytest.fixture(scope="module")
def ssh_cluster(vhosts, tmp_path_factory):
    """sshd on both virtual hosts with a generated root key; ``.env()`` puts its ssh first."""
    try:
        if subprocess.run(["sh", "-c", "command -v pdsh"], capture_output=True).returncode:
            raise MissingCapability("pdsh is not installed; run `make setup`")
        return SshCluster(vhosts, tmp_path_factory.mktemp("ssh")).start()
    except MissingCapability as e:
        missing_capability(str(e))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The training job every launcher runs: the real `megavid pretrain` at test size."""
    root = tmp_path_factory.mktemp("synthetic")
    run_checked([sys.executable, "-m", "megavid.cli", "make-synthetic", "experiment=demo", f"data.root={root}",
                 "data.synthetic.num_train=16", "data.synthetic.num_val=4", "data.synthetic.num_test=4"],
                env=job_env(), log=root / "make-synthetic.log")
    return PretrainJob(root)


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> dict:
    """The job as 1 node x 2 processes (torchrun, c10d on localhost): the oracle."""
    out = tmp_path_factory.mktemp("reference")
    env = job_env(NNODES="1", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="reference")
    run_checked(["bash", str(REPO / "launchers/torchrun.sh"), *job.args(out)], env=env, log=out / "log.txt")
    result = job.result(out)
    assert result["world_size"] == 2 and len(result["losses"]) >= 4
    return result
