"""Virtual hosts on one machine: network namespaces joined by a veth pair, sshd inside each.

Each "host" is a network namespace with its own loopback, an interface ``mv0`` on the private
subnet 10.231.0.0/24 (used only inside these namespaces), its own host name (a UTS namespace
per process tree) and its own ``/etc/hosts`` (``ip netns exec`` bind-mounts
``/etc/netns/<ns>/hosts``), so ``host1``/``host2`` resolve to the veth addresses inside them,
exactly as on two machines. Everything is torn down on close, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence

SUBNET = "10.231.0"
IFNAME = "mv0"


class MissingCapability(RuntimeError):
    """The machine cannot host the test (no iproute2, sshd, pdsh or CAP_NET_ADMIN)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def require_tools(*tools: str) -> None:
    """Raise MissingCapability naming every tool that is missing."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        raise MissingCapability(
            f"missing {', '.join(missing)}; run `make setup` (installs openssh-server, pdsh, iproute2)"
        )


class VirtualHosts:
    """``n`` hosts named host1..hostN at 10.231.0.1..N, each in its own network namespace.

    Args:
        n: number of hosts (2 here: one veth pair).
    """

    def __init__(self, n: int = 2) -> None:
        assert n == 2, "one veth pair joins exactly two namespaces"
        self.tag = f"mvl{uuid.uuid4().hex[:6]}"
        self.names = [f"host{i + 1}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.netns = [f"{self.tag}h{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._created: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "VirtualHosts":
        require_tools("ip", "unshare", "hostname")
        if os.geteuid() != 0:
            raise MissingCapability("network namespaces need root (CAP_NET_ADMIN)")
        try:
            for ns in self.netns:
                r = _run("ip", "netns", "add", ns, check=False)
                if r.returncode:
                    raise MissingCapability(f"cannot create a network namespace: {r.stderr.strip()}")
                self._created.append(ns)
            a, b = f"{self.tag}a", f"{self.tag}b"
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            for ns, end, addr in zip(self.netns, (a, b), self.addrs):
                _run("ip", "link", "set", end, "netns", ns)
                # same interface name on every host, as eth0 on a cluster: one GLOO/NCCL_SOCKET_IFNAME
                _run("ip", "-n", ns, "link", "set", end, "name", IFNAME)
                _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
                _run("ip", "-n", ns, "link", "set", IFNAME, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for ip, name in zip(self.addrs, self.names)]
                (etc / "hosts").write_text("\n".join(lines) + "\n")
        except subprocess.CalledProcessError as e:
            self.close()
            raise MissingCapability(f"{' '.join(e.cmd)} failed: {e.stderr.strip()}") from None
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process in the namespaces, delete them (the veth pair goes with them)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for ns in self._created:
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside our own namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self._created:
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._created.clear()
        try:
            Path("/etc/netns").rmdir()  # only when empty: another run may be using it
        except OSError:
            pass

    def __enter__(self) -> "VirtualHosts":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running things on a host ---------------------------------------------------------
    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host ``i`` (0-based): its netns, /etc/hosts and host name."""
        return [
            "ip", "netns", "exec", self.netns[i],
            "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.names[i], *argv,
        ]  # fmt: skip

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.cmd(i, argv), **kw)
        self.procs.append(p)
        return p


class SshCluster:
    """sshd on every virtual host, key-based root login, all keys and configs under ``root``.

    The client side is a ``bin/ssh`` wrapper (put ``bin`` first on PATH) that adds ``-F
    <root>/ssh_config``: ssh reads ~/.ssh from the passwd entry, not $HOME, so a wrapper is the
    one way to use generated keys without touching the real home directory. pdsh and DeepSpeed's
    runner both call ``ssh`` from PATH.
    """

    def __init__(self, hosts: VirtualHosts, root: Path) -> None:
        self.hosts = hosts
        self.root = Path(root)
        self.bin = self.root / "bin"

    def start(self, timeout: float = 20.0) -> "SshCluster":
        require_tools("/usr/sbin/sshd", "ssh", "ssh-keygen")
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        key, host_key = root / "id_ed25519", root / "ssh_host_ed25519_key"
        for k in (key, host_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "megavid-test", "-f", str(k))
        (root / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        (root / "ssh_config").write_text(
            f"Host {' '.join(self.hosts.names)}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
        )
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        # sshd's privilege separation directory (created by systemd-tmpfiles on a booted system)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for i, addr in enumerate(self.hosts.addrs):
            cfg = root / f"sshd_config.{i + 1}"
            cfg.write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {host_key}\n"
                f"PidFile {root}/sshd.{i + 1}.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
                "LogLevel ERROR\n"
            )
            check = _run("/usr/sbin/sshd", "-t", "-f", str(cfg), check=False)
            if check.returncode:
                raise MissingCapability(f"sshd rejects its test config: {check.stderr.strip()}")
            log = open(root / f"sshd.{i + 1}.log", "w")
            self.hosts.popen(i, ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        for i, host in enumerate(self.hosts.names):
            while True:
                r = subprocess.run(
                    self.hosts.cmd(0, [str(wrapper), "-o", "BatchMode=yes", host, "hostname"]),
                    capture_output=True, text=True,
                )  # fmt: skip
                if r.returncode == 0 and r.stdout.strip() == host:
                    break
                if time.monotonic() > deadline:
                    logs = (root / f"sshd.{i + 1}.log").read_text()
                    raise RuntimeError(f"sshd on {host} did not come up: {r.stderr.strip()} {logs}")
                time.sleep(0.2)
        return self

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose ``ssh`` is the wrapper."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env
