"""A two-node cluster in one folder for the launcher's remote-shell tests: DeepSpeed's real runner
(``deepspeed.launcher.runner.main``), with stand-ins for what lies beyond it.

- ``pdsh``: does what pdsh's ssh module does with DeepSpeed's command: joins the words after its
  options with spaces, replaces ``%n`` (node rank), ``%h``, ``%u`` and ``%%``, and hands the
  string to a shell per host, in a fresh environment as sshd would (bash on the first host,
  POSIX sh on the second).
- ``ssh``: runs its command string in ``sh -c`` (stdin passed through), fresh environment.
- ``deepspeed``: DeepSpeed's runner with ``sys.executable`` set to a recorder, so the remote
  command starts the recorder instead of ``python -u -m deepspeed.launcher.launch``.
- the recorder writes its argv and the variables in ``WATCH`` (a sha256 for secrets).

Every file here is written by the test; nothing leaves the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

WATCH = ("MEGAVID_WEIRD", "MEGAVID_ENV_LOADED", "NCCL_SOCKET_IFNAME")
SECRETS = ("HF_TOKEN", "MEGAVID_API_KEY", "WANDB_API_KEY")

PDSH = r'''#!{python}
import json, os, re, subprocess, sys
args = sys.argv[1:]
assert os.environ.get("PDSH_RCMD_TYPE") == "ssh", "DeepSpeed runs pdsh with its ssh module"
hosts = []
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt in ("-f", "-w", "-l", "-R", "-u"):
        value = args.pop(0)
        if opt == "-w":
            hosts = value.split(",")
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:]}}) + "\n")
command = " ".join(args)
rc = 0
for rank, host in enumerate(hosts):
    subs = {{"n": str(rank), "h": host, "u": "root", "%": "%"}}
    remote = re.sub(r"%(.)", lambda m: subs.get(m.group(1), m.group(0)), command)
    shell = "bash" if rank == 0 else "sh"
    env = {{"PATH": "/usr/bin:/bin", "HOME": {home!r}, "FAKE_HOST": host}}
    rc = max(rc, subprocess.run([shell, "-c", remote], env=env, cwd={home!r}).returncode)
sys.exit(rc)
'''

SSH = r'''#!{python}
import json, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": args}}) + "\n")
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt in ("-o", "-p", "-l", "-i", "-F"):
        args.pop(0)
host, command = args[0], " ".join(args[1:])
env = {{"PATH": "/usr/bin:/bin", "HOME": {home!r}, "FAKE_HOST": host}}
sys.exit(subprocess.run(["sh", "-c", command], env=env, cwd={home!r}).returncode)
'''

DEEPSPEED = """#!/bin/sh
exec {python} -c 'import sys; sys.executable = sys.argv.pop(1); from deepspeed.launcher.runner import main; main()' \\
  {recorder} "$@"
"""

RECORDER = r'''#!{python}
import hashlib, json, os, sys
def sha(v):
    return None if v is None else hashlib.sha256(v.encode()).hexdigest()
rec = {{"argv": sys.argv[1:], "host": os.environ.get("FAKE_HOST"), "cwd": os.getcwd(),
       "env": {{k: os.environ.get(k) for k in {watch!r}}},
       "secret_sha": {{k: sha(os.environ.get(k)) for k in {secrets!r}}}}}
with open({log!r}, "a") as f:
    f.write(json.dumps(rec) + "\n")
'''


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class FakeCluster:
    """Hosts ``h1`` and ``h2`` (a hostfile), the stand-ins in ``bin/``, their logs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.home = root / "home"
        self.home.mkdir()
        self.logs = {name: root / f"{name}.jsonl" for name in ("pdsh", "ssh", "ranks")}
        self.recorder = self.bin / "rank-recorder"
        scripts = {
            "pdsh": PDSH.format(python=sys.executable, log=str(self.logs["pdsh"]), home=str(self.home)),
            "ssh": SSH.format(python=sys.executable, log=str(self.logs["ssh"]), home=str(self.home)),
            "deepspeed": DEEPSPEED.format(python=sys.executable, recorder=self.recorder),
            "rank-recorder": RECORDER.format(python=sys.executable, log=str(self.logs["ranks"]), watch=WATCH,
                                             secrets=SECRETS),
        }
        for name, text in scripts.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.hostfile = root / "hostfile"
        self.hostfile.write_text("h1 slots=1\nh2 slots=1\n")

    def env(self, **extra: str) -> dict[str, str]:
        """The launching shell: stand-ins first on PATH, HOME here (no ~/.deepspeed_env of the
        user's), temporary files here, no secret or launcher variable from outside."""
        from megavid.launch import is_secret_name

        env = {k: v for k, v in os.environ.items()
               if not is_secret_name(k) and not k.startswith(("SLURM_", "MASTER_", "NCCL_", "GLOO_", "DS_"))}
        env.update(PATH=os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), env.get("PATH", "")]),
                   HOME=str(self.home), TMPDIR=str(self.root), MEGAVID_PYTHON=sys.executable)
        env.update(extra)
        return env

    def read(self, name: str) -> list[dict]:
        p = self.logs[name]
        return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []
