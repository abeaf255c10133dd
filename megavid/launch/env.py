"""The environment every rank must share (.deepspeed_env) and the secrets in it.

Secrets (variables named like ``*TOKEN*``, ``*KEY*``, ``*SECRET*``, ``*PASSWORD*``:
:func:`megavid.cluster.is_secret_name`) never go on a command line or into a log: every env we
print goes through :func:`megavid.cluster.mask_env`, and the launcher hands them to other nodes
only through a file that only its owner can read (:func:`write_env_script`, created by
:func:`write_private_file`). The rank-0 start-up report is
:func:`megavid.engine.dist.gather_launch_report`.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from megavid.cluster import is_secret_name
from megavid.errors import LaunchError

# Environment a remote rank must see exactly as the launching shell does: network/NCCL settings
# (set in one place, launchers/env.sh), offline switches, and PATH/LD_LIBRARY_PATH so the same
# venv and CUDA libraries are found. DeepSpeed's pdsh runner forwards only PYTHON*/UCX*/MV2*
# by itself; the rest goes through the .deepspeed_env file written by write_deepspeed_env.
EXPORT_PREFIXES = (
    "NCCL_",
    "TORCH_NCCL_",
    "TORCH_DISTRIBUTED_",
    "GLOO_",
    "FI_",
    "MEGAVID_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
)
EXPORT_NAMES = ("PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "CUDA_HOME")


def split_secrets(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(public, secret)``: ``env`` split by :func:`is_secret_name` (order kept)."""
    public = {k: v for k, v in env.items() if not is_secret_name(k)}
    return public, {k: v for k, v in env.items() if is_secret_name(k)}


def get_export_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables every remote rank must inherit from the launching shell (sorted)."""
    env = os.environ if environ is None else environ
    keep = {
        k: v
        for k, v in env.items()
        if (k.startswith(EXPORT_PREFIXES) or k in EXPORT_NAMES) and "\n" not in v
    }
    return dict(sorted(keep.items()))


def read_user_deepspeed_env(dirs: Sequence[str | os.PathLike] = ("~", ".")) -> dict[str, str]:
    """The user's own ``.deepspeed_env`` files (home, then the working directory), merged.

    The launcher points DeepSpeed at a generated file (``DS_ENV_FILE``), which makes DeepSpeed
    skip these; their variables are carried over into the generated file instead.
    """
    out: dict[str, str] = {}
    for d in dirs:
        p = Path(d).expanduser() / ".deepspeed_env"
        if p.is_file():
            for ln in p.read_text().splitlines():
                key, sep, value = ln.partition("=")
                if sep and key.strip():
                    out[key.strip()] = value.strip()
    return out




_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_names(env: Mapping[str, str], what: str) -> None:
    bad = [k for k in env if not _NAME_RE.fullmatch(k)]
    if bad:
        raise LaunchError(
            f"{what}: {', '.join(repr(k) for k in bad)} cannot be exported by a shell; "
            f"variable names are letters, digits and '_' (fix the .deepspeed_env line or the environment)"
        )


def write_private_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path``, readable by its owner only (mode 0600), whatever was there.

    The data goes into a new file created 0600 with O_EXCL in the same folder (never a file or
    a symlink someone else prepared), which then replaces ``path`` by a rename: an existing
    world-readable file of that name ends up 0600 with the new contents, a symlink is replaced,
    not followed, and a reader never sees half a file. A missing parent folder is made 0700.

    Raises:
        LaunchError: the file cannot be written or ``path`` cannot be replaced (e.g. another
            user's file in a sticky /tmp).
    """
    p = Path(path)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise LaunchError(f"cannot write {p} ({e}); pass --env-file PATH in a folder you own") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise LaunchError(f"cannot replace {p} ({e}); remove it or pass --env-file PATH") from None
        raise
    return p


def pdsh_source_line(script: str | os.PathLike) -> str:
    """A ``.deepspeed_env`` line that makes the remote shell of DeepSpeed's pdsh runner source
    ``script`` (the secrets) before it starts the node's ranks, and fail if it cannot.

    The runner turns each line ``KEY=VALUE`` into ``export KEY=VALUE;`` in the remote command,
    quoting only VALUE; the KEY of this line carries ``. SCRIPT || exit 1``, so the remote
    command reads ``export MEGAVID_ENV_LOADED; . '/path' || exit 1; export MEGAVID_ENV_LOADED=1;``
    (POSIX sh). DeepSpeed's own hook, ``--venv_script``, is not used: it shifts the words its
    Ctrl-C handler builds ``pkill -f`` from, which then kills no remote rank.
    """
    quoted = shlex.quote(str(script)).replace("%", "%%")  # pdsh: %% -> %
    if "=" in quoted or "\n" in quoted:
        raise LaunchError(f"env file path {str(script)!r} must not contain '=' or a newline; pass --env-file PATH")
    return f"MEGAVID_ENV_LOADED; . {quoted} || exit 1; export MEGAVID_ENV_LOADED=1\n"


def write_deepspeed_env(
    path: str | os.PathLike,
    env: Mapping[str, str],
    *,
    pdsh: bool = False,
    env_script: str | os.PathLike | None = None,
) -> Path:
    """Write a ``.deepspeed_env`` file (``KEY=value`` lines, no blank line: DeepSpeed's runner
    splits every line on '=' and fails on anything else), mode 0600 (:func:`write_private_file`).

    Args:
        path: the file (``DS_ENV_FILE``).
        env: the variables; no secrets: DeepSpeed puts every one on the command line of pdsh
            (or mpirun) and logs that command line. Secrets go to :func:`write_env_script`.
        pdsh: for DeepSpeed's pdsh runner over several nodes: values escaped so that the remote
            shell gets them intact (:func:`megavid.launch.commands.pdsh_export_value`).
        env_script: with ``pdsh``: a script every node sources first (:func:`pdsh_source_line`).
    """
    from megavid.launch.commands import pdsh_export_value

    if pdsh:
        _check_names(env, f"{path}")
    lines = [f"{k}={pdsh_export_value(v) if pdsh else v}\n" for k, v in env.items()]
    if env_script is not None:
        lines.append(pdsh_source_line(env_script))
    return write_private_file(path, "".join(lines))


def write_env_script(path: str | os.PathLike, env: Mapping[str, str]) -> Path:
    """A POSIX shell script of ``export KEY='value'`` lines (values quoted with shlex.quote),
    mode 0600: how secrets reach the ranks on other nodes (sourced by the remote shell)."""
    _check_names(env, f"{path}")
    return write_private_file(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
