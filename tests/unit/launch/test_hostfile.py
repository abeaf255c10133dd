"""Hostfile validation and the ssh reachability probe (megavid.launch)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from deepspeed.launcher.runner import _parse_hostfile

from megavid.errors import LaunchError
from megavid.launch import check_hosts_reachable, format_hostfile, parse_hostfile, read_hostfile

GOOD = """# cluster A
node1 slots=8

node2  slots=4   # half a node
   # indented comment
gpu-3.example.com slots=1
root@node4 slots=2
"""


def test_valid_hostfile_matches_deepspeeds_own_parser():
    hosts = parse_hostfile(GOOD)
    assert hosts == {"node1": 8, "node2": 4, "gpu-3.example.com": 1, "root@node4": 2}
    assert list(hosts) == ["node1", "node2", "gpu-3.example.com", "root@node4"]  # file order = rank order
    # the DeepSpeed launcher reads the same file: what we accept it must read identically
    assert dict(_parse_hostfile(GOOD.splitlines())) == hosts
    assert parse_hostfile(format_hostfile(hosts)) == hosts


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("node1 slots=2\nnode2 slots=x\n", 2, "bad slot count 'slots=x'"),
        ("node1 slots=0\n", 1, "bad slot count 'slots=0'"),
        ("# c\nnode1 slots=-1\n", 2, "bad slot count 'slots=-1'"),
        ("node1 slots=\n", 1, "bad slot count 'slots='"),
        ("node1 slots=2\n\n# again\nnode1 slots=4\n", 4, "'node1' is already listed on line 1"),
        ("node1\n", 1, "has no slot count"),
        ("node1 gpus=4\n", 1, "expected 'node1 slots=N'"),
        ("node1 slots=2 max_slots=4\n", 1, "expected 'node1 slots=N'"),
        ("node[01-04] slots=8\n", 1, "bracket range"),
        ("slots=4\n", 1, "does not start with a host name"),
        ("node1 slots=1\n:: slots=1\n", 2, "does not start with a host name"),
    ],
)
def test_malformed_line_is_rejected_with_its_number(text, line, problem):
    with pytest.raises(LaunchError) as e:
        parse_hostfile(text, source="hostfile hf")
    msg = str(e.value)
    assert msg.startswith(f"hostfile hf line {line}: ")
    assert problem in msg
    assert "\n" not in msg and ";" in msg  # one line: the problem; the fix


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n"])
def test_empty_hostfile_is_rejected(text):
    with pytest.raises(LaunchError, match="lists no hosts; add one line per node"):
        parse_hostfile(text)


def test_deepspeed_alone_would_accept_what_we_reject():
    # why the launcher validates first: DeepSpeed reads these without complaint (a trailing
    # key is ignored, a bracket range becomes one bogus host name)
    for text in ("node1 slots=2 max_slots=4", "node[01-04] slots=8"):
        assert _parse_hostfile([text])
        with pytest.raises(LaunchError):
            parse_hostfile(text)


def test_read_hostfile(tmp_path):
    (tmp_path / "hf").write_text("a slots=2\nb slots=2\n")
    assert read_hostfile(tmp_path / "hf") == {"a": 2, "b": 2}
    (tmp_path / "bad").write_text("a slots=2\na slots=2\n")
    with pytest.raises(LaunchError, match=rf"hostfile {tmp_path / 'bad'} line 2: "):
        read_hostfile(tmp_path / "bad")
    with pytest.raises(LaunchError, match="does not exist; pass --hostfile"):
        read_hostfile(tmp_path / "missing")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_hosts_are_named_by_the_real_ssh_probe():
    port = _closed_port()
    with pytest.raises(LaunchError) as e:
        check_hosts_reachable(["127.0.0.1", "no-such-host.invalid"], ssh_port=port, timeout=2)
    msg = str(e.value)
    assert "127.0.0.1 (" in msg and "Connection refused" in msg
    assert "no-such-host.invalid (" in msg
    assert "ssh -o BatchMode=yes HOST true" in msg


def test_probe_reports_a_missing_ssh_client():
    with pytest.raises(LaunchError, match=r"node1 \(no 'no-ssh-here' client installed\)"):
        check_hosts_reachable(["node1"], ssh="no-ssh-here")


def test_check_hostfile_cli(tmp_path):
    (tmp_path / "hf").write_text("a slots=2\na slots=3\n")
    r = subprocess.run([sys.executable, "-m", "megavid.launch", "check-hostfile", "--no-probe", str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"megavid launch check-hostfile: error: hostfile {tmp_path / 'hf'} line 2: host 'a' is already "
        "listed on line 1; list each host once with its total slots"
    )
