"""Safe loading of checkpoint files: checkpoints are data, never code.

Every file read from a path a user gave (``--resume``, ``eval.checkpoint``, ``model.weights``,
export input) goes through :func:`safe_load`, and every pickle of a DeepSpeed folder is checked
by :func:`verify_checkpoint_folder` before DeepSpeed's own loaders (which use
``weights_only=False``) read it. Bad files give one-line :class:`~megavid.errors.CheckpointError`
messages naming the file.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from megavid.errors import CheckpointError

# A pickle can import and call anything: ``torch.load(weights_only=False)`` on a downloaded file
# runs whatever its author put in it. :func:`safe_load` scans a file's pickle opcodes for the
# globals they would import (nothing is unpickled), refuses any outside torch's own
# ``weights_only`` allow-list and :data:`ALLOWED_GLOBALS`, then reads the file with torch's
# restricted unpickler (``weights_only=True``) with exactly those classes enabled.
#
# The classes DeepSpeed 0.19 pickles into its checkpoints, found by saving ZeRO 0/1/2/3
# checkpoints in bf16 and fp32 on CPU, converting the ZeRO 1-3 ones to universal checkpoints,
# and listing ``torch.serialization.get_unsafe_globals_in_checkpoint`` for every file:
# ``*optim_states.pt`` and ``zero/optimizer_state.pt`` hold the loss scaler and the ZeRO stage
# enum, ZeRO 1/2 optimizer states the fragment addresses of their parameters; model states,
# ``zero/<param>/*.pt`` and megavid's own files hold tensors and plain data only. fp16 (GPU
# only) pickles ``DynamicLossScaler`` where bf16/fp32 pickle ``LossScaler``
# (``deepspeed.runtime.fp16.loss_scaler.CreateLossScaler``). Each is rebuilt from plain
# attributes (``__dict__`` / the enum's value): loading one runs no code from the file.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
# numpy's RandomState tuple, as ``rng_rank*.pt`` held it before megavid stored it as plain data
# (a uint32 array): reading those keeps older runs resumable. numpy's array rebuild takes a
# shape, a dtype and bytes (torch's documentation lists these as safe to allow).
LEGACY_RNG_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)
ALLOWED_GLOBALS = frozenset(DEEPSPEED_GLOBALS + LEGACY_RNG_GLOBALS)
"""Globals a checkpoint may name beyond torch's default ``weights_only`` allow-list."""
# classes never named in a pickle but built by an allowed global (numpy.dtype('u4') is a
# UInt32DType, which torch's unpickler must also accept before it sets its state)
_IMPLIED = {"numpy.dtype": ("numpy.dtypes.UInt32DType",)}

# names of files DeepSpeed and torch loaders unpickle; other files are sniffed by content
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_REFUSAL = "megavid loads only tensors and plain data from checkpoints"


def one_line(exc: BaseException | str, limit: int = 240) -> str:
    """The first non-empty line of an error message, shortened (for one-line user errors)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torch_allowed_globals() -> frozenset[str]:
    """The globals torch's ``weights_only`` unpickler accepts by default (tensor rebuilds,
    dtypes, ``OrderedDict``, ...)."""
    try:
        from torch import _weights_only_unpickler as wo

        return frozenset(wo._get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: its restricted unpickler still guards
        return frozenset()


def _scan_pickle_globals(stream: Any, found: list[str], max_pickles: int = 1) -> None:
    """Append ``module.name`` of every global the pickle(s) in ``stream`` would import.

    Reads opcodes only (``pickletools``), executes none. ``GLOBAL``/``INST`` carry the name;
    ``STACK_GLOBAL`` takes it from the two strings pushed before it (memo lookups followed).

    Args:
        stream: binary file positioned at the first pickle.
        found: receives the names (filled as far as the scan got when it raises).
        max_pickles: pickles stored one after another (torch's legacy format has five).
    """
    import pickletools

    for _ in range(max_pickles):
        pos = stream.tell()
        if not stream.read(1):
            return
        stream.seek(pos)
        memo: dict[int, Any] = {}
        recent: list[Any] = []  # the last two values pushed (strings, else None)
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", ".", 1))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                mod, attr = recent[-2:] if len(recent) >= 2 else (None, None)
                found.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str)
                             else "<a name computed while loading>")
                recent.append(None)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name in ("PROTO", "FRAME", "STOP", "POP", "POP_MARK", "MARK"):
                pass
            elif "STRING" in name or "UNICODE" in name:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            else:
                recent.append(None)
            del recent[:-2]


class _BoundedReader:
    """A file whose reads never ask for more than what is left: a corrupted length field in a
    pickle must not make the scan allocate gigabytes."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline()

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int) -> int:
        return self._f.seek(pos)


def _zip_pickle(path: Path) -> bytes | None:
    """The ``data.pkl`` record of a torch zip checkpoint (None when the file is no zip)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise CheckpointError(f"cannot read checkpoint {path}: a zip archive but not a torch "
                                  "checkpoint (no single data.pkl record)")
        return zf.read(names[0])


def _corrupt(path: Path, why: BaseException | str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: the file is corrupted or not a torch "
                           f"checkpoint ({one_line(why)})")


def _refuse(path: Path, name: str) -> CheckpointError:
    return CheckpointError(f"refusing to load {path}: it would import {name}; {_REFUSAL}")


def _resolve_global(name: str) -> Any:
    import importlib
    import warnings

    module, attr = name.rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy.core: numpy 2's deprecated alias of numpy._core
        return getattr(importlib.import_module(module), attr)


def safe_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file that never executes code from the file.

    Its pickle's globals are scanned first (nothing unpickled): any outside torch's
    ``weights_only`` allow-list and :data:`ALLOWED_GLOBALS` is refused; then torch's restricted
    unpickler reads the file with just the allowed classes this file names enabled.

    Args:
        path: the file.
        mmap: map the tensors' storage instead of reading it (zip checkpoints): for checks that
            only need the pickle.

    Raises:
        CheckpointError: (one line naming the file) missing, empty, truncated, corrupted, not a
            torch checkpoint, or would import something beyond tensors and plain data.
    """
    import pickle

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist" if not p.exists()
                              else f"checkpoint {p} is a folder, not a file")
    names: list[str] = []
    scan_error: BaseException | None = None
    data = None
    try:
        if p.stat().st_size == 0:
            raise _corrupt(p, "the file is empty")
        data = _zip_pickle(p)
        if data is not None:
            _scan_pickle_globals(io.BytesIO(data), names)
        else:
            with open(p, "rb") as f:
                head = f.read(4)
                if head.startswith(b"PK\x03\x04"):
                    raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated (a zip "
                                          "archive without its end; was it copied or downloaded "
                                          "completely?)")
                if not head.startswith(b"\x80"):
                    raise _corrupt(p, f"it starts with {head!r}, neither a zip archive nor a pickle")
                f.seek(0)
                _scan_pickle_globals(_BoundedReader(f, p.stat().st_size), names,
                                     max_pickles=5)  # torch's legacy format: 5 pickles
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable bytes: a bad file, said in one line
        scan_error = e
    allowed = _torch_allowed_globals()
    # a refusal wins over corruption found later in the same pickle
    refused = list(dict.fromkeys(n for n in names if n not in allowed and n not in ALLOWED_GLOBALS))
    if refused:
        raise _refuse(p, ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else ""))
    if scan_error is not None:
        raise _corrupt(p, scan_error)
    extra = []
    needed = {n for n in names if n in ALLOWED_GLOBALS and n not in allowed}
    for name in sorted(needed | {i for n in needed for i in _IMPLIED.get(n, ())}):
        try:
            extra.append((_resolve_global(name), name))
        except (ImportError, AttributeError):
            raise CheckpointError(f"cannot load {p}: it holds a {name}, which this environment "
                                  "lacks (written by another DeepSpeed or numpy version?)") from None
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and data is not None)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m:
            raise _refuse(p, m.group(1)) from None
        if "Weights only load failed" in msg:
            detail = [ln.strip() for ln in msg.splitlines()
                      if ln.strip() and not re.search(r"weights.only|Please file|WeightsUnpickler|"
                                                       r"documentation", ln, re.I)]
            raise CheckpointError(f"refusing to load {p}: it holds more than tensors and plain data "
                                  f"({one_line(detail[0] if detail else msg)}); {_REFUSAL}") from None
        raise _corrupt(p, e) from None
    except Exception as e:  # noqa: BLE001 - truncated storage, bad zip records, ...
        raise _corrupt(p, e) from None


def is_pickle_file(path: Path) -> bool:
    """True for a file a torch/DeepSpeed loader would unpickle (by suffix or first bytes)."""
    if path.suffix in _PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK"


def verify_checkpoint_folder(folder: str | Path) -> list[Path]:
    """Check every pickle file under a checkpoint folder with :func:`safe_load` (storage mapped,
    not read) before DeepSpeed's own loaders, which unpickle with ``weights_only=False``, touch
    any of them.

    Args:
        folder: a DeepSpeed tag folder (``step_<N>``, ``step_<N>_universal``).

    Returns:
        The files checked.

    Raises:
        CheckpointError: a file is unreadable or would import something not allowed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    checked = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and is_pickle_file(f):
            safe_load(f, mmap=True)
            checked.append(f)
    return checked
