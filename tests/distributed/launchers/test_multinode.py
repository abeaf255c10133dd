"""Two hosts on one machine (network namespaces + veth): torchrun with c10d rendezvous and the
DeepSpeed launcher over ssh/pdsh run the same training job as 1 node x 2 processes, with the
same per-step losses."""

from __future__ import annotations

import re
import subprocess

import pytest
from multinode_helpers import REPO, job_env, run_checked

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NETWORK = dict(MEGAVID_IFNAME="mv0")  # the veth interface, same name on both hosts


def test_torchrun_two_nodes_matches_one_node(vhosts, job, reference, tmp_path):
    env = job_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT="host1:29400", RDZV_ID="twonode", **NETWORK)
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), *job.args(tmp_path)]
    # host2 first: its agent waits at the rendezvous until host1 brings the c10d store up
    logs = [open(tmp_path / f"host{i + 1}.log", "w") for i in range(2)]
    procs = [vhosts.popen(i, cmd, cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in (1, 0)]
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        rcs = ["timeout"]
    finally:
        for f in logs:
            f.close()
    tails = "\n".join(f"--- host{i + 1}\n" + (tmp_path / f"host{i + 1}.log").read_text()[-3000:] for i in range(2))
    assert rcs == [0, 0], tails
    result = job.result(tmp_path)
    assert result["world_size"] == 2
    assert result["losses"] == reference["losses"], tails
    assert result["local_world_size"] == 1  # 2 nodes x 1 process, as the engine sees it


def test_deepspeed_hostfile_over_ssh_matches_one_node(ssh_cluster, vhosts, job, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two virtual hosts\nhost1 slots=1\n\nhost2 slots=1  # second node\n")
    env = ssh_cluster.env(job_env(HOSTFILE=str(hostfile), MASTER_PORT="29401", TMPDIR=str(tmp_path), **NETWORK))
    # the launcher runs on host1 and reaches both hosts (itself included) by ssh through pdsh
    run_checked(vhosts.cmd(0, ["bash", str(REPO / "launchers/deepspeed.sh"), *job.args(tmp_path)]),
                env=env, log=tmp_path / "log.txt")
    result = job.result(tmp_path)
    assert result["world_size"] == 2
    assert result["losses"] == reference["losses"]
    # the DeepSpeed launcher's LOCAL_SIZE/CROSS_RANK reach megavid.engine.dist.get_world_info
    assert result["local_world_size"] == 1
    log = (tmp_path / "log.txt").read_text()
    assert "cmd = pdsh -S -f 1024 -w host1,host2" in log  # DeepSpeed's pdsh runner, over ssh
    # pdsh prefixes each remote line with its host; DeepSpeed's per-node launcher prints the NCCL
    # settings it got, which reach host2 only through the generated .deepspeed_env export
    assert re.search(r"^host2: .*NCCL_SOCKET_IFNAME=mv0$", log, re.M), log[-3000:]
    assert re.search(r"^host1: .*NCCL_SOCKET_IFNAME=mv0$", log, re.M)


def test_deepspeed_launcher_names_unreachable_hosts(ssh_cluster, vhosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host1 slots=1\nhost2 slots=1\n")
    # nothing listens on port 2222: every host is unreachable, and the job must not start
    env = ssh_cluster.env(job_env(HOSTFILE=str(hostfile), SSH_PORT="2222"))
    r = subprocess.run(vhosts.cmd(0, ["bash", str(REPO / "launchers/deepspeed.sh"), "pretrain", "experiment=demo"]),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "host1 (" in err[0] and "host2 (" in err[0] and "Connection refused" in err[0]
    assert "megavid launch: deepspeed" not in r.stderr  # nothing was launched
