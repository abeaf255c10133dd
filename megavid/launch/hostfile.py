"""Hostfiles (``host slots=N``) and the ssh reachability probe, checked before any rank starts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

from megavid.errors import LaunchError

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_hostfile(text: str, *, source: str = "hostfile") -> dict[str, int]:
    """Parse DeepSpeed/MPI hostfile text into ``{host: slots}`` (file order kept).

    Accepts one ``host slots=N`` per line, ``#`` comments (whole-line or trailing) and blank
    lines. Everything DeepSpeed's own parser would silently mis-read is rejected here.

    Args:
        text: the hostfile contents.
        source: how to name the file in error messages (its path).

    Raises:
        LaunchError: naming the line number, the problem and the fix.
    """
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {lineno}"
        tokens = line.split()
        host = tokens[0]
        if "[" in host or "]" in host:
            raise LaunchError(
                f"{where}: '{host}' is a bracket range, which DeepSpeed does not expand; "
                f"write one 'host slots=N' line per node"
            )
        if host.startswith("slots=") or not _HOST_RE.match(host):
            raise LaunchError(
                f"{where}: '{raw.strip()}' does not start with a host name; "
                f"write 'hostname slots=N'"
            )
        if len(tokens) == 1:
            raise LaunchError(
                f"{where}: host '{host}' has no slot count; write '{host} slots=N' "
                f"(N = GPUs on that node)"
            )
        if len(tokens) > 2 or not tokens[1].startswith("slots="):
            raise LaunchError(
                f"{where}: expected '{host} slots=N', got '{line}'; "
                f"use exactly one 'slots=N' after the host name"
            )
        value = tokens[1][len("slots="):]
        if not value.isdigit() or int(value) < 1:
            raise LaunchError(
                f"{where}: bad slot count 'slots={value}' for host '{host}'; "
                f"slots must be a whole number >= 1 (GPUs on that node)"
            )
        if host in hosts:
            raise LaunchError(
                f"{where}: host '{host}' is already listed on line {first_line[host]}; "
                f"list each host once with its total slots"
            )
        hosts[host] = int(value)
        first_line[host] = lineno
    if not hosts:
        raise LaunchError(
            f"{source} lists no hosts; add one line per node, e.g. 'node1 slots=8'"
        )
    return hosts


def read_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Read and validate a hostfile (see :func:`parse_hostfile`).

    Args:
        path: the hostfile.

    Raises:
        LaunchError: missing/unreadable file or a malformed line.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {p} does not exist; pass --hostfile PATH to an existing file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"hostfile {p} cannot be read ({e}); check the path and permissions") from None
    return parse_hostfile(text, source=f"hostfile {p}")


def format_hostfile(hosts: Mapping[str, int]) -> str:
    """Hostfile text for ``{host: slots}`` (what :func:`parse_hostfile` reads back)."""
    return "".join(f"{h} slots={n}\n" for h, n in hosts.items())


def check_hosts_reachable(
    hosts: Iterable[str],
    *,
    ssh_port: int | None = None,
    timeout: float = 5.0,
    ssh: str = "ssh",
) -> None:
    """Probe every host with a non-interactive ``ssh HOST true``, in parallel.

    BatchMode makes ssh fail instead of prompting for a password or an unknown host key, which
    is what would happen to pdsh on that host in the middle of a launch.

    Args:
        hosts: host names as the launcher will use them.
        ssh_port: ssh port (default: ssh's own configuration).
        timeout: seconds per host (ssh ConnectTimeout; the probe is killed a bit later).
        ssh: the ssh client to run.

    Raises:
        LaunchError: naming every unreachable host and ssh's reason.
    """
    hosts = list(hosts)

    def probe(host: str) -> str | None:
        cmd = [ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
        if ssh_port is not None:
            cmd += ["-p", str(ssh_port)]
        cmd += [host, "true"]
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 5)
        except FileNotFoundError:
            return f"no '{ssh}' client installed"
        except subprocess.TimeoutExpired:
            return f"no answer within {timeout:g} s"
        if r.returncode == 0:
            return None
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else f"ssh exited with {r.returncode}"

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
        reasons = list(pool.map(probe, hosts))
    bad = [(h, why) for h, why in zip(hosts, reasons) if why is not None]
    if bad:
        names = ", ".join(f"{h} ({why})" for h, why in bad)
        raise LaunchError(
            f"unreachable host(s) by ssh: {names}; set up key-based ssh so that "
            f"'ssh -o BatchMode=yes HOST true' succeeds, or remove the host from the hostfile"
        )




def copy_private_file(
    hosts: Iterable[str],
    path: str | os.PathLike,
    *,
    ssh_port: int | None = None,
    timeout: float = 30.0,
    ssh: str = "ssh",
) -> None:
    """Copy the local file ``path`` to the same path on every host, mode 0600, in parallel.

    The contents travel on ssh's standard input, never on a command line; on each host they go
    into a new file from ``mktemp`` under ``umask 077`` that then replaces ``path`` (as
    :func:`megavid.launch.env.write_private_file` does here). Hosts sharing a filesystem just
    write the same bytes.

    Raises:
        LaunchError: naming every host the copy failed on and ssh's reason.
    """
    hosts = list(hosts)
    p = Path(path).resolve()
    data = p.read_bytes()
    q = shlex.quote
    remote = (
        f"umask 077 && mkdir -p {q(str(p.parent))} && t=$(mktemp {q(f'{p.parent}/.{p.name}.XXXXXX')}) && "
        f"{{ cat > \"$t\" && mv -f \"$t\" {q(str(p))} || {{ rm -f \"$t\"; exit 1; }}; }}"
    )

    def copy(host: str) -> str | None:
        cmd = [ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
        if ssh_port is not None:
            cmd += ["-p", str(ssh_port)]
        cmd += [host, remote]
        try:
            r = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout + 5)
        except FileNotFoundError:
            return f"no '{ssh}' client installed"
        except subprocess.TimeoutExpired:
            return f"no answer within {timeout:g} s"
        if r.returncode == 0:
            return None
        lines = [ln.strip() for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else f"ssh exited with {r.returncode}"

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
        reasons = list(pool.map(copy, hosts))
    bad = [(h, why) for h, why in zip(hosts, reasons) if why is not None]
    if bad:
        names = ", ".join(f"{h} ({why})" for h, why in bad)
        raise LaunchError(f"could not copy {p} to {names}; the ranks there would start without its variables")
