"""Two hosts on one machine (network namespaces + veth): torchrun with c10d rendezvous and the
DeepSpeed launcher over ssh/pdsh run the same training job as 1 node x 2 processes, with the
same per-step losses; over pdsh, job arguments arrive intact and secrets stay private."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from multinode_helpers import REPO, finish, job_env, run_checked

from tests.helpers.multiprocess import run_job, start_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NETWORK = dict(MEGAVID_IFNAME="mv0")  # the veth interface, same name on both hosts


def test_torchrun_two_nodes_matches_one_node(vhosts, job, reference, tmp_path):
    env = job_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT="host1:29400", RDZV_ID="twonode", **NETWORK)
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), *job.args(tmp_path)]
    # host2 first: its agent waits at the rendezvous until host1 brings the c10d store up
    jobs = {i: start_job(vhosts.cmd(i, cmd), env=env) for i in (1, 0)}
    deadline = time.monotonic() + 240
    rcs = [finish(job, tmp_path / f"host{i + 1}.log", max(1.0, deadline - time.monotonic()))
           for i, job in jobs.items()]
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
    r = run_job(vhosts.cmd(0, ["bash", str(REPO / "launchers/deepspeed.sh"), "pretrain", "experiment=demo"]),
                env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "host1 (" in err[0] and "host2 (" in err[0] and "Connection refused" in err[0]
    assert "megavid launch: deepspeed" not in r.stderr  # nothing was launched


# a run name for every layer between the launcher and a rank: DeepSpeed's pdsh runner puts it in
# double quotes ($(..) and `..` still run there), pdsh rewrites %n/%h/%%, sh ends at ' or "
NASTY_RUN_NAME = """x y$(touch "$MEGAVID_TEST_MARKER")`touch "$MEGAVID_TEST_MARKER"`'"%n %% \\ end%"""
# each rank records what reached it (its host, its arguments, a hash of the secret), then runs
# the job: the real CLI with those arguments, ended as every worker of the suite ends (the
# launcher exports its working folder, the repository, on PYTHONPATH to every node)
RANK_SCRIPT = """import hashlib, json, os, socket, sys
token = hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"host": socket.gethostname(), "argv": sys.argv[1:], "token_sha256": token}, f)
from megavid.cli import main
from tests.helpers.multiprocess import worker_main
worker_main(lambda: main(sys.argv[1:]))
"""


def _files_holding(text: str, roots: list[Path], since: float) -> dict[Path, int]:
    """Regular files under ``roots`` written since ``since`` that contain ``text``: their modes."""
    found: dict[Path, int] = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime < since or st.st_size > (8 << 20):
                        continue
                    if text.encode() in p.read_bytes():
                        found[p] = stat.S_IMODE(st.st_mode)
                except OSError:  # gone meanwhile (other tests share /tmp)
                    pass
    return found


def test_deepspeed_over_ssh_keeps_arguments_intact_and_secrets_private(ssh_cluster, vhosts, job, tmp_path):
    marker, control = tmp_path / "injected", tmp_path / "control"
    token = f"secret-{secrets.token_hex(12)}"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host1 slots=1\nhost2 slots=1\n")
    env = ssh_cluster.env(job_env(HOSTFILE=str(hostfile), MASTER_PORT="29402", TMPDIR=str(tmp_path),
                                  HF_TOKEN=token, MEGAVID_TEST_MARKER=str(marker), **NETWORK))
    since = time.time() - 1
    # the control: the run name as DeepSpeed's runner passes it without megavid's quoting runs
    # `touch` on both hosts through the same pdsh and ssh, so the check below can fail
    as_deepspeed_passes_it = '"{}"'.format(f"run.name={NASTY_RUN_NAME}".replace('"', '\\"'))
    r = run_job(vhosts.cmd(0, ["pdsh", "-S", "-w", "host1,host2", f"export MEGAVID_TEST_MARKER={control};",
                               "echo", as_deepspeed_passes_it]),
                env={**env, "PDSH_RCMD_TYPE": "ssh"}, timeout=60)
    assert r.returncode == 0 and control.exists(), r.stdout + r.stderr

    args = [a for a in job.args(tmp_path) if not a.startswith("run.name=")] + [f"run.name={NASTY_RUN_NAME}",
                                                                              "train.max_steps=2"]
    script = tmp_path / "rank script.py"  # a space: the script's path reaches the remote shell too
    script.write_text(RANK_SCRIPT)
    run_checked(vhosts.cmd(0, ["bash", str(REPO / "launchers/deepspeed.sh"), *args]),
                env={**env, "MEGAVID_SCRIPT": str(script)}, log=tmp_path / "log.txt")
    assert not marker.exists(), "the run name ran as a command on a node"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["host"] for r in ranks) == ["host1", "host2"]
    assert all(r["argv"] == args for r in ranks)
    run_dir = tmp_path / NASTY_RUN_NAME
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["name"] == NASTY_RUN_NAME
    assert json.loads((run_dir / "env.json").read_text())["world"]["world_size"] == 2
    assert (run_dir / "logs" / "rank1.log").is_file()  # host2's rank wrote to the same run directory
    log = (tmp_path / "log.txt").read_text()  # the launcher's, DeepSpeed's and both nodes' stdout + stderr
    assert "cmd = pdsh -S -f 1024 -w host1,host2" in log and "HF_TOKEN=***" in log

    # the secret reached the ranks on both hosts ...
    assert all(r["token_sha256"] == hashlib.sha256(token.encode()).hexdigest() for r in ranks)
    # ... and nowhere else: not in the run directory, not in any output, and the only files
    # holding it (the launcher's secrets file, its ssh copies) are the owner's alone
    assert not _files_holding(token, [run_dir], 0)
    assert token not in log
    holders = _files_holding(token, sorted({tmp_path, Path("/tmp"), Path(tempfile.gettempdir())}), since)
    assert holders and all(mode & 0o077 == 0 for mode in holders.values()), {str(p): oct(m) for p, m in holders.items()}
