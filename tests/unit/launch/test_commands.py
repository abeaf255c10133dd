"""The shell launchers (torchrun.sh, deepspeed.sh) build exactly the documented command lines;
recorders stand in for torchrun/deepspeed/ssh so no job starts."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from launch_recorders import REPO

from megavid.launch import format_launch_report, get_export_env, get_network_env


def _run(script: str, env: dict[str, str], *job: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launchers" / script), *job], env=env, capture_output=True,
                          text=True, timeout=60)


def test_torchrun_sh_readme_example(recorders):
    env = recorders.env(NNODES="2", NPROC_PER_NODE="8", RDZV_ENDPOINT="node1:29500", RDZV_ID="exp42",
                        MAX_RESTARTS="3", MEGAVID_IFNAME="eth0", MEGAVID_NET="socket")
    r = _run("torchrun.sh", env, "pretrain", "experiment=demo")
    assert r.returncode == 0, r.stderr
    (call,) = recorders.calls()
    assert call["argv"] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node1:29500",
        "--rdzv_id=exp42", "--max_restarts=3", "-m", "megavid.cli", "pretrain", "experiment=demo",
    ]
    assert call["env"] == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}


def test_torchrun_sh_static_rank_and_errors(recorders):
    env = recorders.env(NNODES="2", RDZV_ENDPOINT="10.0.0.1:29500", NODE_RANK="1", LOCAL_ADDR="10.0.0.2")
    assert _run("torchrun.sh", env, "pretrain").returncode == 0
    assert recorders.calls()[0]["argv"] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=static", "--rdzv_endpoint=10.0.0.1:29500",
        "--rdzv_id=megavid", "--max_restarts=0", "--node_rank=1", "--local_addr=10.0.0.2", "-m", "megavid.cli",
        "pretrain"]
    r = _run("torchrun.sh", recorders.env(RDZV_ENDPOINT="node1"), "pretrain")
    assert r.returncode == 2 and "needs a port: HOST:PORT" in r.stderr
    r = _run("torchrun.sh", recorders.env(), "pretrain")
    assert r.returncode != 0 and "set RDZV_ENDPOINT=host:port" in r.stderr
    r = _run("torchrun.sh", recorders.env(MEGAVID_NET="myrinet", RDZV_ENDPOINT="a:1"), "pretrain")
    assert r.returncode == 2 and "MEGAVID_NET=myrinet is not one of ib, efa, socket" in r.stderr
    assert len(recorders.calls()) == 1


def test_any_script_instead_of_the_cli(recorders, tmp_path):
    # MEGAVID_SCRIPT: the same launch for a Python file (a benchmark, a tool) instead of megavid.cli
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = recorders.env(RDZV_ENDPOINT="n1:1", HOSTFILE=str(tmp_path / "hostfile"), MEGAVID_SCRIPT="bench/x.py")
    assert _run("torchrun.sh", env, "--steps", "3").returncode == 0
    assert _run("deepspeed.sh", env, "--steps", "3").returncode == 0
    assert [c["argv"][-4:] for c in recorders.calls()] == [["--max_restarts=0", "bench/x.py", "--steps", "3"],
                                                          ["--no_local_rank", "bench/x.py", "--steps", "3"]]


def test_deepspeed_sh_probes_every_host_then_launches(recorders, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    (recorders.bin / "ssh").write_text((recorders.bin / "srun").read_text())  # ssh recorder: always "reachable"
    (recorders.bin / "ssh").chmod(0o755)
    env = recorders.env(HOSTFILE=str(hostfile), GPUS_PER_NODE="8", MEGAVID_IFNAME="eth0")
    r = _run("deepspeed.sh", env, "pretrain", "experiment=demo")
    assert r.returncode == 0, r.stderr
    calls = recorders.calls()
    probes = sorted(c["argv"] for c in calls if c["argv"][0] == "ssh")
    assert probes == [["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", h, "true"] for h in ("node1", "node2")]
    assert calls[-1]["argv"] == [
        "deepspeed", f"--hostfile={hostfile}", "--num_nodes=2", "--num_gpus=8", "--master_addr=node1",
        "--master_port=29500", "--launcher=pdsh", "--no_ssh_check", "--no_local_rank", "--module", "megavid.cli",
        "pretrain", "experiment=demo",
    ]
    exported = dict(ln.split("=", 1) for ln in open(calls[-1]["env"]["DS_ENV_FILE"]).read().splitlines())
    assert exported["GLOO_SOCKET_IFNAME"] == exported["NCCL_SOCKET_IFNAME"] == "eth0"


@pytest.mark.parametrize(
    "hosts, extra, problem",
    [
        ("node1 slots=8\nnode2 slots=x\n", {}, "line 2: bad slot count 'slots=x'"),
        ("node1 slots=8\nnode2 slots=4\n", {"GPUS_PER_NODE": "8"}, "--num-gpus=8 but node2 has slots=4"),
        ("node1 slots=8\n", {"NUM_NODES": "2"}, "--num-nodes=2 but hostfile"),
    ],
)
def test_deepspeed_sh_rejects_before_launching(recorders, tmp_path, hosts, extra, problem):
    (tmp_path / "hostfile").write_text(hosts)
    r = _run("deepspeed.sh", recorders.env(HOSTFILE=str(tmp_path / "hostfile"), **extra), "pretrain")
    assert r.returncode == 2
    assert problem in r.stderr.strip().splitlines()[-1]
    assert recorders.calls() == []


def test_single_host_needs_no_ssh(recorders, tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    r = _run("deepspeed.sh", recorders.env(HOSTFILE=str(tmp_path / "hostfile")), "pretrain")
    assert r.returncode == 0, r.stderr
    assert [c["argv"][:4] for c in recorders.calls()] == [
        ["deepspeed", f"--hostfile={tmp_path / 'hostfile'}", "--num_nodes=1", "--num_gpus=2"]]


def test_export_and_network_env_selection():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0", "PATH": "/bin", "HOME": "/root",
           "MASTER_ADDR": "n1", "HF_HUB_OFFLINE": "1", "SECRET": "x", "NCCL_X": "a\nb"}
    assert get_export_env(env) == {"GLOO_SOCKET_IFNAME": "ib0", "HF_HUB_OFFLINE": "1", "NCCL_SOCKET_IFNAME": "ib0",
                                   "PATH": "/bin"}
    assert list(get_network_env(env)) == ["GLOO_SOCKET_IFNAME", "MASTER_ADDR", "NCCL_SOCKET_IFNAME", "NCCL_X"]
    report = format_launch_report([{"rank": 1, "host": "b", "local_rank": 0}, {"rank": 0, "host": "a", "local_rank": 0}],
                                  {"NCCL_SOCKET_IFNAME": "ib0"})
    assert report.splitlines() == ["launch: world_size=2 hosts=2", "launch: rank 0 host a local_rank 0",
                                   "launch: rank 1 host b local_rank 0", "launch: NCCL_SOCKET_IFNAME=ib0"]


def test_users_deepspeed_env_file_is_carried_over(recorders, tmp_path):
    # DS_ENV_FILE makes DeepSpeed skip ./.deepspeed_env, so its variables must be in ours
    (tmp_path / "hostfile").write_text("localhost slots=1\n")
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=42\nNCCL_ALGO=Ring\n")
    r = subprocess.run(["bash", str(REPO / "launchers" / "deepspeed.sh"), "pretrain"], cwd=tmp_path,
                       env=recorders.env(HOSTFILE="hostfile", NCCL_ALGO="Tree"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (call,) = recorders.calls()
    exported = dict(ln.split("=", 1) for ln in open(call["env"]["DS_ENV_FILE"]).read().splitlines())
    assert exported["MY_SETTING"] == "42" and exported["NCCL_ALGO"] == "Ring"  # the file wins over the shell
    assert call["argv"][1] == f"--hostfile={tmp_path / 'hostfile'}"


def test_dry_run_prints_the_command_and_a_missing_job_is_an_error():
    base = [sys.executable, "-m", "megavid.launch", "torchrun", "--nnodes", "2", "--rdzv-endpoint", "n1:29500"]
    r = subprocess.run(base + ["--dry-run", "--", "pretrain", "run.name=a b"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29500",
        "--rdzv_id=megavid", "--max_restarts=0", "-m", "megavid.cli", "pretrain", "run.name=a b"]
    r = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "no job given; append '-- JOB [config tokens]'" in r.stderr
