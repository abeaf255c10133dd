"""Secrets and shells in the DeepSpeed launcher: the export files are private (mode 0600), secret
values are masked wherever an environment is printed and never reach a command line or a log,
and every job argument reaches the shell on each node intact (DeepSpeed's pdsh runner builds one
shell command per node). The command lines go through DeepSpeed's real runner; pdsh, ssh and the
per-node launcher are stand-ins (fake_cluster.py)."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fake_cluster import FakeCluster, sha256

from megavid.launch import (
    format_launch_report,
    is_secret_name,
    mask_env,
    pdsh_quote_arg,
    split_secrets,
    write_deepspeed_env,
    write_env_script,
)
from megavid.launch.env import pdsh_source_line

# every character a shell treats specially, DeepSpeed's and pdsh's rewrites included
NASTY_ARGS = [
    "run.name=x y$(touch {marker})",
    "a'b", 'a"b', 'a b"c', "back\\slash", 'back\\ slash \\"', "$HOME", "`touch {marker}`", "'$(touch {marker})'",
    '"$(touch {marker})"', "%n", "%h", "%%", "end%", "100% done %", "tab\there", "semi;colon", "&&", "|", ">x",
    "*", "~", "#hash", "", " lead", "trail ", "two  spaces", "new\nline", "!bang", "{a,b}", "data.root=/a b/c",
]
SECRET_NAMES = ["HF_TOKEN", "hf_token", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                "DB_PASSWD", "GITHUB_TOKEN", "my_Secret", "HUGGING_FACE_HUB_TOKEN", "NCCL_IB_PKEY"]
PUBLIC_NAMES = ["PATH", "NCCL_SOCKET_IFNAME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MASTER_ADDR",
                "OMP_NUM_THREADS", "HF_HOME"]


def _mode(path: Path) -> int:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
    return stat.S_IMODE(st.st_mode)


def _launch(cluster: FakeCluster, job: list[str], *extra: str, env: dict[str, str], cwd: Path):
    cmd = [sys.executable, "-m", "megavid.launch", "deepspeed", "--hostfile", str(cluster.hostfile), "--no-check",
           *extra, "--", *job]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------
def test_secret_names_are_masked_and_nothing_else():
    assert all(is_secret_name(n) for n in SECRET_NAMES)
    assert not any(is_secret_name(n) for n in PUBLIC_NAMES)
    env = {"NCCL_SOCKET_IFNAME": "ib0", "HF_TOKEN": "hf_abc", "wandb_api_key": "k", "PATH": "/bin",
           "DB_PASSWORD": "p", "MY_SECRET": "s"}
    assert mask_env(env) == {"NCCL_SOCKET_IFNAME": "ib0", "HF_TOKEN": "***", "wandb_api_key": "***", "PATH": "/bin",
                             "DB_PASSWORD": "***", "MY_SECRET": "***"}
    assert split_secrets(env) == ({"NCCL_SOCKET_IFNAME": "ib0", "PATH": "/bin"},
                                  {"HF_TOKEN": "hf_abc", "wandb_api_key": "k", "DB_PASSWORD": "p", "MY_SECRET": "s"})
    report = format_launch_report([{"rank": 0, "host": "a", "local_rank": 0}],
                                  {"NCCL_IB_PKEY": "0x8001", "NCCL_SOCKET_IFNAME": "ib0"})
    assert report.splitlines()[2:] == ["launch: NCCL_IB_PKEY=***", "launch: NCCL_SOCKET_IFNAME=ib0"]


# --------------------------------------------------------------------------------------------
# private files
# --------------------------------------------------------------------------------------------
def test_env_files_are_0600_whatever_the_umask_and_whatever_was_there(tmp_path):
    path, script = tmp_path / "old.deepspeed_env", tmp_path / "old.secrets.sh"
    path.write_text("OLD=1\n")
    path.chmod(0o644)  # left world-readable by an earlier launcher
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    victim.chmod(0o644)
    script.symlink_to(victim)  # a link planted where the secrets go
    old = os.umask(0)
    try:
        write_deepspeed_env(path, {"NCCL_SOCKET_IFNAME": "ib0"})
        write_env_script(script, {"HF_TOKEN": "it's $secret"})
        fresh = write_env_script(tmp_path / "new" / "secrets.sh", {"HF_TOKEN": "x"})
    finally:
        os.umask(old)
    assert (_mode(path), _mode(script), _mode(fresh)) == (0o600, 0o600, 0o600)
    assert stat.S_IMODE(os.stat(fresh.parent).st_mode) == 0o700
    assert path.read_text() == "NCCL_SOCKET_IFNAME=ib0\n"
    assert victim.read_text() == "keep\n" and _mode(victim) == 0o644  # replaced the link, did not follow it
    # the script is POSIX sh: sourcing it gives the value back byte for byte
    r = subprocess.run(["sh", "-c", f'. {shlex.quote(str(script))} && printf %s "$HF_TOKEN"'], capture_output=True,
                       text=True)
    assert r.stdout == "it's $secret"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_launcher_writes_private_env_files_and_keeps_secrets_out_of_deepspeed_env(tmp_path):
    cluster = FakeCluster(tmp_path)
    token = f"secret-{secrets.token_hex(8)}"
    env_file = tmp_path / "run.deepspeed_env"
    env_file.write_text(f"HF_TOKEN={token}\n")
    env_file.chmod(0o666)
    env = cluster.env(HF_TOKEN=token, NCCL_SOCKET_IFNAME="eth0")
    r = _launch(cluster, ["pretrain"], "--dry-run", "--env-file", str(env_file), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = Path(f"{env_file}.secrets.sh")
    assert (_mode(env_file), _mode(script)) == (0o600, 0o600)
    assert token not in env_file.read_text() and f"export HF_TOKEN={token}\n" in script.read_text()
    assert "NCCL_SOCKET_IFNAME=eth0\n" in env_file.read_text()
    assert token not in r.stdout + r.stderr and "HF_TOKEN=***" in r.stderr
    # one node: DeepSpeed starts the ranks itself with this environment, no secrets file
    (tmp_path / "one").write_text("localhost slots=1\n")
    r = subprocess.run([sys.executable, "-m", "megavid.launch", "deepspeed", "--hostfile", "one", "--dry-run", "--",
                        "pretrain"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.glob("megavid-*") if p.is_file()]
    assert len(written) == 1 and _mode(written[0]) == 0o600 and token not in written[0].read_text()


# --------------------------------------------------------------------------------------------
# the remote shell
# --------------------------------------------------------------------------------------------
def test_pdsh_quoting_against_deepspeed_transform_and_real_shells():
    """pdsh_quote_arg, then DeepSpeed's rewrite (an argument with a space goes in double quotes,
    its '"' escaped) and pdsh's (%% -> %): bash and sh give every argument back. shlex.split is
    no judge of the double-quoted ones: unlike sh it keeps the backslash of \\$ and \\` there.
    (The rewrite is PDSHRunner.parse_user_args of DeepSpeed 0.19; the fake-cluster tests below
    run the real one.)"""
    ds = [('"{}"'.format(a.replace('"', '\\"')) if " " in a else a) for a in map(pdsh_quote_arg, NASTY_ARGS)]
    remote = " ".join(ds).replace("%%", "%")
    echo_argv = f"{sys.executable} -c 'import json,sys; print(json.dumps(sys.argv[1:]))'"
    for shell in ("sh", "bash"):
        r = subprocess.run([shell, "-c", f"{echo_argv} {remote}"], capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == NASTY_ARGS, shell
    plain = [a for a in NASTY_ARGS if " " not in a]  # not rewritten by DeepSpeed: shlex.quote as it is
    assert shlex.split(" ".join(pdsh_quote_arg(a) for a in plain).replace("%%", "%")) == plain


def test_the_fake_cluster_runs_injected_commands_without_megavid(tmp_path):
    """The control: DeepSpeed's runner given the job as it is runs `touch` on every node, so the
    next test would see an injection."""
    cluster = FakeCluster(tmp_path)
    marker = tmp_path / "marker"
    job = ["pretrain", f"run.name=x y$(touch {marker})"]
    env = cluster.env()
    r = subprocess.run(["deepspeed", f"--hostfile={cluster.hostfile}", "--num_nodes=2", "--num_gpus=1",
                        "--master_addr=h1", "--launcher=pdsh", "--no_ssh_check", "--module", "megavid.cli", *job],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker.exists()
    assert [rec["argv"][-1] for rec in cluster.read("ranks")] == ["run.name=x y"] * 2


def test_job_arguments_and_secrets_reach_every_node_intact(tmp_path):
    cluster = FakeCluster(tmp_path)
    marker = tmp_path / "marker"
    token = f"secret-{secrets.token_hex(8)}"
    nasty_token = f"{token}'\"$(touch {marker})%n\\"
    weird = f'a $(touch {marker}) "q" `touch {marker}` \\ %n %% end%'
    job = ["pretrain", "experiment=demo", *[a.replace("{marker}", str(marker)) for a in NASTY_ARGS]]
    env = cluster.env(HF_TOKEN=token, MEGAVID_API_KEY=nasty_token, MEGAVID_WEIRD=weird, NCCL_SOCKET_IFNAME="mv0")
    (cluster.home / ".deepspeed_env").write_text("WANDB_API_KEY=from-file\n")  # the user's own file, carried over
    r = _launch(cluster, job, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert not marker.exists(), "a job argument or variable ran as a command on a node"
    ranks = cluster.read("ranks")
    assert sorted(rec["host"] for rec in ranks) == ["h1", "h2"]
    for rec in ranks:
        argv = rec["argv"]
        assert argv[:3] == ["-u", "-m", "deepspeed.launcher.launch"]
        assert argv[argv.index("megavid.cli") + 1:] == job
        assert rec["cwd"] == str(tmp_path)
        assert rec["env"] == {"MEGAVID_WEIRD": weird, "MEGAVID_ENV_LOADED": "1", "NCCL_SOCKET_IFNAME": "mv0"}
        assert rec["secret_sha"] == {"HF_TOKEN": sha256(token), "MEGAVID_API_KEY": sha256(nasty_token),
                                     "WANDB_API_KEY": sha256("from-file")}
    # DeepSpeed logged the command it gave pdsh; no secret in it, nor anywhere on a command line
    assert "cmd = pdsh -S -f 1024 -w h1,h2" in out
    assert token not in out and "from-file" not in out and "HF_TOKEN=*** MEGAVID_API_KEY=*** WANDB_API_KEY=***" in out
    for name in ("pdsh", "ssh"):
        calls = cluster.read(name)
        assert calls and not any(token in a or "from-file" in a for c in calls for a in c["argv"])
    # the secrets reached the nodes by ssh's stdin, into files only their owner can read
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert holders and all(_mode(p) == 0o600 for p in holders), [(p, oct(_mode(p))) for p in holders]


def test_a_node_without_the_secrets_file_fails_instead_of_running_without_it(tmp_path):
    line = pdsh_source_line(tmp_path / "missing 100%.sh")
    key, _, value = line.partition("=")
    remote = f"export {key}={value.strip()}; echo started".replace("%%", "%")
    for shell in ("bash", "sh"):
        r = subprocess.run([shell, "-c", remote], capture_output=True, text=True)
        assert r.returncode != 0 and "started" not in r.stdout and "missing 100%.sh" in r.stderr
    (tmp_path / "missing 100%.sh").write_text("export X='a b'\n")
    r = subprocess.run(["sh", "-c", remote + ' "$X" "$MEGAVID_ENV_LOADED"'], capture_output=True, text=True)
    assert r.stdout == "started a b 1\n"


@pytest.mark.parametrize("addr", ["h1;id", "$(id)", "a b", ""])
def test_master_addr_must_be_an_address(tmp_path, addr):
    cluster = FakeCluster(tmp_path)
    r = _launch(cluster, ["pretrain"], "--dry-run", "--master-addr", addr, env=cluster.env(), cwd=tmp_path)
    if addr == "":  # empty: the first host
        assert r.returncode == 0 and "--master_addr=h1" in r.stdout
    else:
        assert r.returncode == 2 and "is not a host name or an IP address" in r.stderr
