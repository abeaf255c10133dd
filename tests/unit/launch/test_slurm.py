"""SLURM: node-list expansion, allocation from SLURM_*, and launchers/slurm.sbatch run with a fake
SLURM environment and recorders in place of srun/deepspeed/scontrol."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest
from launch_recorders import REPO

from megavid.errors import LaunchError
from megavid.launch import build_sbatch_script, expand_nodelist, get_slurm_allocation, parse_hostfile

SBATCH = REPO / "launchers" / "slurm.sbatch"


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("gpu-[9-11]", ["gpu-9", "gpu-10", "gpu-11"]),
        ("a,b,a", ["a", "b"]),
        ("x[1-2],y[3],z", ["x1", "x2", "y3", "z"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("dgx[001-002].cluster", ["dgx001.cluster", "dgx002.cluster"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, problem",
    [("node[1-", "unmatched '['"), ("node]", "unmatched ']'"), ("node[a-b]", "bad range 'a-b'"),
     ("node[3-1]", "runs backwards"), ("node[1-2,]", "bad range ''"), ("", "is empty")],
)
def test_bad_nodelist(nodelist, problem):
    with pytest.raises(LaunchError) as e:
        expand_nodelist(nodelist)
    assert problem in str(e.value)


def test_allocation_from_slurm_env():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4321",
           "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_RESTART_COUNT": "2"}
    a = get_slurm_allocation(env)
    assert (a.nodes, a.master_addr, a.gpus_per_node, a.world_size) == (("gpu07", "gpu08"), "gpu07", 4, 8)
    assert a.master_port == 29500 + 321 and a.restart_count == 2 and a.job_id == "4321"
    assert get_slurm_allocation({**env, "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": "1234"}).gpus_per_node == 2
    assert get_slurm_allocation({**env, "MASTER_PORT": "1234"}).master_port == 1234
    assert get_slurm_allocation(env, gpus_per_node=1).world_size == 2
    with pytest.raises(LaunchError, match="SLURM_JOB_NUM_NODES=3 but .* names 2 node"):
        get_slurm_allocation({**env, "SLURM_JOB_NUM_NODES": "3"})
    with pytest.raises(LaunchError, match="not inside a SLURM allocation"):
        get_slurm_allocation({})


def _slurm_env(recorders, tmp_path, nodelist: str, nnodes: int, **extra: str) -> dict[str, str]:
    return recorders.env(SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nnodes), SLURM_JOB_ID="1234",
                         SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(tmp_path), **extra)


def _torchrun_line(nnodes: int, master: str) -> list[str]:
    return ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "torchrun", f"--nnodes={nnodes}", "--nproc_per_node=8", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master}:29734", "--rdzv_id=1234", "--max_restarts=0",
            "-m", "megavid.cli", "pretrain", "experiment=demo", "train.max_steps=10"]


@pytest.mark.parametrize("nodelist, nnodes, master", [("node07", 1, "node07"), ("node[01-03,07]", 4, "node01")])
def test_sbatch_torchrun_command_line(recorders, tmp_path, nodelist, nnodes, master):
    env = _slurm_env(recorders, tmp_path, nodelist, nnodes, MEGAVID_IFNAME="ib0")
    r = subprocess.run(["bash", str(SBATCH), "pretrain", "experiment=demo", "train.max_steps=10"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = recorders.calls()
    assert [c["argv"] for c in calls] == [_torchrun_line(nnodes, master)]
    # env.sh's interface choice reaches srun (and through it every node)
    assert calls[0]["env"]["NCCL_SOCKET_IFNAME"] == "ib0" == calls[0]["env"]["GLOO_SOCKET_IFNAME"]
    assert f"world size {nnodes * 8}" in r.stderr


@pytest.mark.parametrize(
    "nodelist, nnodes, hosts",
    [("node07", 1, ["node07"]), ("node[01-03,07]", 4, ["node01", "node02", "node03", "node07"])],
)
def test_sbatch_deepspeed_command_line(recorders, tmp_path, nodelist, nnodes, hosts):
    (recorders.bin / "ssh").write_text((recorders.bin / "srun").read_text())  # ssh recorder: copies "succeed"
    (recorders.bin / "ssh").chmod(0o755)
    env = _slurm_env(recorders, tmp_path, nodelist, nnodes, MEGAVID_LAUNCHER="deepspeed", NCCL_IB_HCA="mlx5",
                     HF_TOKEN="secret-in-slurm")
    r = subprocess.run(["bash", str(SBATCH), "pretrain", "experiment=demo"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "secret-in-slurm" not in r.stdout + r.stderr
    hostfile = tmp_path / ".megavid" / "hostfile-1234"
    assert parse_hostfile(hostfile.read_text()) == {h: 8 for h in hosts}
    (call,) = [c for c in recorders.calls() if c["argv"][0] == "deepspeed"]
    # the export file is the owner's alone and holds no secret; over several nodes the secret
    # goes to every node through its own 0600 file, copied by ssh (on stdin, not in argv)
    env_file = call["env"]["DS_ENV_FILE"]
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600 and "secret-in-slurm" not in open(env_file).read()
    copies = sorted(c["argv"][-2] for c in recorders.calls() if c["argv"][0] == "ssh")
    script = f"{env_file}.secrets.sh"
    if nnodes > 1:
        assert copies == hosts and stat.S_IMODE(os.stat(script).st_mode) == 0o600
        assert open(script).read() == "export HF_TOKEN=secret-in-slurm\n"
        assert not any("secret-in-slurm" in a for c in recorders.calls() for a in c["argv"])
    else:  # one node: DeepSpeed starts the ranks here, in this environment
        assert copies == [] and not os.path.exists(script)
    assert call["argv"] == [
        "deepspeed", f"--hostfile={hostfile}", f"--num_nodes={nnodes}", "--num_gpus=8",
        f"--master_addr={hosts[0]}", "--master_port=29734", "--launcher=pdsh", "--no_ssh_check",
        "--no_local_rank", "--module", "megavid.cli", "pretrain", "experiment=demo",
    ]
    # NCCL settings reach the remote ranks through the .deepspeed_env file DeepSpeed reads
    exported = dict(line.split("=", 1) for line in open(call["env"]["DS_ENV_FILE"]).read().splitlines())
    assert exported["NCCL_IB_HCA"] == "mlx5" and exported["HF_HUB_OFFLINE"] == "1"
    assert exported["PATH"].split(os.pathsep)[0] == str(recorders.bin)


def test_sbatch_outside_slurm_fails_with_one_line(recorders, tmp_path):
    r = subprocess.run(["bash", str(SBATCH), "pretrain"], env=recorders.env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("megavid launch slurm: error: not inside a SLURM allocation")
    assert recorders.calls() == []


def test_time_limit_signal_checkpoints_then_requeues(recorders, tmp_path):
    """USR1 before the time limit: the job step gets SIGTERM (the engine checkpoints on it),
    then the job is requeued."""
    env = _slurm_env(recorders, tmp_path, "node[1-2]", 2, RECORDER_WAIT="srun")
    p = subprocess.Popen(["bash", str(SBATCH), "pretrain"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    ready = recorders.file.with_name(recorders.file.name + ".ready")
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert [c["argv"][0] + (":" + c["signal"] if "signal" in c else "") for c in recorders.calls()] == [
        "srun", "srun:TERM", "scontrol"]
    assert recorders.calls()[-1]["argv"] == ["scontrol", "requeue", "1234"]


def test_make_sbatch_generates_a_working_script(recorders, tmp_path):
    text = build_sbatch_script(nodes=4, gpus_per_node=8, time="48:00:00", partition="gpu", account="vl",
                               launcher="torchrun", job_args=["pretrain", "experiment=demo", "train.max_steps=10"])
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for want in ("--nodes=4", "--gpus-per-node=8", "--time=48:00:00", "--partition=gpu", "--account=vl",
                 "--requeue", "--signal=B:USR1@300"):
        assert sum(ln.startswith(f"#SBATCH {want.split('=')[0]}") for ln in header) == 1, want
        assert f"#SBATCH {want}" in header
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    # submitted with no arguments, it runs the baked-in job exactly like slurm.sbatch would
    env = _slurm_env(recorders, tmp_path, "node[01-03,07]", 4)
    env["SLURM_SUBMIT_DIR"] = str(REPO)  # where sbatch was called: env.sh is found under launchers/
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [c["argv"] for c in recorders.calls()] == [_torchrun_line(4, "node01")]


@pytest.mark.parametrize("kw, problem", [({"nodes": 0}, "must both be >= 1"), ({"time": "2 days"}, "not a SLURM time"),
                                         ({"launcher": "mpirun"}, "unknown launcher")])
def test_make_sbatch_rejects_bad_options(kw, problem):
    with pytest.raises(LaunchError, match=problem):
        build_sbatch_script(**{"nodes": 2, "gpus_per_node": 8, **kw})
