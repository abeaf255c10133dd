"""Checkpoints: DeepSpeed save/load with megavid's client state, keep-last-K, the ``latest``
pointer, per-rank RNG, universal conversion (resume on another world size) and fp32 export.

Layout under ``<run_dir>/checkpoints``: DeepSpeed tags ``step_<N>/`` (model + optimizer
shards, ``rng_rank<R>.pt``), ``latest`` (a text file naming the newest tag), and
``step_<N>_universal/`` after :func:`convert_to_universal`.

Nothing here unpickles arbitrary objects: every file read from a path a user gave (``--resume``,
``eval.checkpoint``, ``model.weights``, export input) goes through :func:`safe_load`, and every
pickle of a DeepSpeed folder is checked by :func:`verify_checkpoint_folder` before DeepSpeed's
own loaders (which use ``weights_only=False``) read it. Bad files give one-line
:class:`~megavid.errors.CheckpointError` messages naming the file.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavid.errors import CheckpointError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")
STEP_RE = re.compile(r"^step_(\d+)(?:_universal)?$")
UNIVERSAL_SUFFIX = "_universal"
EXPORT_NAME = "model_fp32.pt"


# --------------------------------------------------------------------------------------------
# Safe loading: checkpoints are data, never code
# --------------------------------------------------------------------------------------------
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


def _one_line(exc: BaseException | str, limit: int = 240) -> str:
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
                           f"checkpoint ({_one_line(why)})")


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
                                  f"({_one_line(detail[0] if detail else msg)}); {_REFUSAL}") from None
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


# --------------------------------------------------------------------------------------------
# Does a state dict fit a model?
# --------------------------------------------------------------------------------------------
def _keys(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def describe_misfit(found: Mapping[str, Any], expected: Mapping[str, Any], *, n: int = 3,
                    check_missing: bool = True, check_unexpected: bool = True) -> str | None:
    """One-line description of how checkpoint shapes differ from a model's (None: they fit).

    Args:
        found: checkpoint key -> shape (or tensor).
        expected: model key -> shape (or tensor).
        n: keys named per kind of difference (the rest are counted).
        check_missing: count model keys the checkpoint lacks.
        check_unexpected: count checkpoint keys the model lacks.
    """
    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    parts = []
    other = [f"{k}: checkpoint {shape(found[k])} vs model {shape(v)}"
             for k, v in expected.items() if k in found and shape(found[k]) != shape(v)]
    if other:
        parts.append(f"{len(other)} tensors have other shapes ({'; '.join(other[:n])}"
                     + (f"; and {len(other) - n} more" if len(other) > n else "") + ")")
    missing = [k for k in expected if k not in found] if check_missing else []
    if missing:
        parts.append(f"{len(missing)} model tensors are missing ({_keys(missing, n)})")
    unexpected = [k for k in found if k not in expected] if check_unexpected else []
    if unexpected:
        parts.append(f"{len(unexpected)} tensors are not in the model ({_keys(unexpected, n)})")
    return ", ".join(parts) or None


def check_state_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any) -> None:
    """Raise a one-line :class:`CheckpointError` when ``state`` does not fit ``model`` exactly.

    Args:
        model: the model built from the config.
        state: the checkpoint's state dict.
        source: the checkpoint, for the message.
    """
    misfit = describe_misfit(state, model.state_dict())
    if misfit:
        raise CheckpointError(f"checkpoint {source} does not fit the model: {misfit}; it was "
                              "trained with another model config (e.g. another depth or width): "
                              "set the model config to the checkpoint's sizes")


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error when it does not fit."""
    check_state_fits(model, state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load checkpoint {source} into the model: {_one_line(e)}") from None


def _engine_shapes(engine: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(parameter name -> full shape, buffer names) of a DeepSpeed engine's module (ZeRO-3
    parameters are partitioned: their full shape is ``ds_shape``)."""
    module = engine.module
    params = {n: tuple(getattr(p, "ds_shape", p.shape))
              for n, p in module.named_parameters(remove_duplicate=False)}  # tied names too
    return params, {n for n, _ in module.named_buffers()}


def _check_engine_fits(engine: Any, folder: Path) -> None:
    """Refuse (one line) a DeepSpeed checkpoint written by another model before DeepSpeed's
    own strict load dumps every key: shapes from the model states' ``module`` and
    ``param_shapes`` (ZeRO-3 keeps only the latter) against the engine's module."""
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not files or not hasattr(engine, "module"):
        return
    sd = safe_load(files[0], mmap=True)
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), Mapping):
        return
    found = {k: tuple(v.shape) for k, v in sd["module"].items() if hasattr(v, "shape")}
    for group in [*(sd.get("param_shapes") or []), sd.get("frozen_param_shapes") or {}]:
        found.update({k: tuple(s) for k, s in group.items()})
    params, buffers = _engine_shapes(engine)
    expected = {**{k: v for k, v in found.items() if k in buffers}, **params}
    misfit = describe_misfit(found, expected)
    if misfit:
        raise CheckpointError(f"checkpoint {folder} does not fit the model: {misfit}; it was "
                              "trained with another model config (e.g. another depth or width): "
                              "resume with the checkpoint's model config")


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states of this process, as plain data and tensors
    (``torch.load(weights_only=True)`` reads them back: no numpy objects in the file)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`get_rng_state` (or by megavid before it stored numpy's
    state as plain data: numpy's own tuple)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    if isinstance(npy, Mapping):
        keys = npy["keys"].numpy() if isinstance(npy["keys"], torch.Tensor) else np.asarray(npy["keys"])
        npy = (npy["kind"], keys.astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy values turned into Python numbers / tensors and paths into strings,
    so that a checkpoint holding it loads with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------
def get_step_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every ``step_<N>`` checkpoint in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def get_latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (None when there is no checkpoint)."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_bytes()[:256].decode("utf-8", errors="replace").strip()
        if tag and "\x00" not in tag and "\n" not in tag and (ckpt_dir / tag).is_dir():
            return tag
        log.warning("%s names %r, which does not exist; using the newest step_* folder", latest, tag)
    tags = get_step_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) from a run dir, a checkpoints dir, or a tag folder.

    Args:
        path: ``runs/x``, ``runs/x/checkpoints`` or ``runs/x/checkpoints/step_100``.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory or a step_<N> folder")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (any(p.glob("*model_states.pt")) or any(p.glob("*optim_states.pt")) or (p / "zero").is_dir()
            or (STEP_RE.match(p.name) and any(p.glob("rng_rank*.pt")))):
        return p.parent, p.name  # a tag folder (its missing files are reported by the loader)
    tag = get_latest_tag(p)
    if tag is None:
        raise CheckpointError(f"no checkpoint found in {p} (no 'latest' file and no step_<N> folders)")
    return p, tag


def is_universal(ckpt_dir: Path, tag: str) -> bool:
    """True for a folder written by DeepSpeed's ds_to_universal (``zero/<param>/fp32.pt``)."""
    return (ckpt_dir / tag / "zero").is_dir()


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, client_state: dict, *, keep_last: int = 0,
                    keep: tuple[str, ...] = ()) -> str:
    """Save a DeepSpeed checkpoint ``step_<step>`` with client and per-rank RNG state.

    Collective: every rank must call it. Writes ``latest`` last (DeepSpeed does it after every
    rank's shards are written), so a run killed mid-save resumes from the previous tag.

    Args:
        engine: the DeepSpeed engine.
        ckpt_dir: ``<run_dir>/checkpoints``.
        step: optimizer steps done.
        client_state: megavid state (step, epoch, loader state, counters, ...).
        keep_last: keep this many newest ``step_*`` tags (0: keep all).
        keep: tags never pruned (e.g. the best one).
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag = f"step_{step}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # RNG first into the tag folder: DeepSpeed writes `latest` only after its own files.
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    client_state = to_plain(client_state)  # loads with weights_only=True, like the RNG state
    torch.save({"rng": get_rng_state(), "client_state": client_state}, ckpt_dir / tag / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"megavid": client_state}, save_latest=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0 and keep_last > 0:
        prune_checkpoints(ckpt_dir, keep_last, keep=(tag, *keep))
    return tag


def check_param_order(saved: dict | None, current: dict, model_order: dict, where: Path | str) -> None:
    """Refuse a checkpoint whose optimizer state is in another parameter order.

    DeepSpeed restores optimizer state (ZeRO's flat fp32 partitions, Adam moments) by position,
    not by name: loaded in another order, every value lands in the wrong parameter, silently.

    Args:
        saved: the checkpoint's ``param_order`` (group -> names); None in checkpoints written
            before megavid recorded it, whose groups were in model order.
        current: this run's order (``megavid.engine.optim.get_param_order``).
        model_order: ``current``'s groups in model order (``get_model_order``).
        where: the checkpoint, for the message.

    Raises:
        CheckpointError: the orders differ.
    """
    if (saved if saved is not None else model_order) != current:
        raise CheckpointError(
            f"checkpoint {where} holds its optimizer state in another parameter order (written "
            "by another model, or by a megavid that kept model order before odd-sized parameters "
            "were moved last for alignment); convert it (megavid.engine.checkpoint."
            "convert_to_universal: universal checkpoints map state by name) and --resume the "
            "step_<N>_universal folder")


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete all but the ``keep_last`` newest ``step_*`` tags (and their universal copies)."""
    tags = get_step_tags(ckpt_dir)
    removed = []
    for _, tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag in keep:
            continue
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        removed.append(tag)
    return removed


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> tuple[dict, dict | None]:
    """Load a DeepSpeed checkpoint; returns (megavid client state, this rank's RNG state or None).

    Args:
        engine: an engine built with the same model and config (for a universal tag, with
            ``checkpoint.load_universal`` set in its DeepSpeed config).
        ckpt_dir: the checkpoints folder.
        tag: ``step_<N>`` or ``step_<N>_universal``.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    folder = ckpt_dir / tag
    # DeepSpeed unpickles with weights_only=False: every file is checked before it reads any
    verify_checkpoint_folder(folder)
    _check_engine_fits(engine, folder)
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, FileNotFoundError, AssertionError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot load checkpoint {folder}: {_describe_load_error(e)}; it may come "
                              "from another model, ZeRO stage or world size (convert it with "
                              "convert_to_universal)") from None
    if path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} could not be loaded (missing files)")
    state = (client or {}).get("megavid")
    rng = None
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if is_universal(ckpt_dir, tag):
        # universal copies keep the source tag's rng files when the world layout allows it
        rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        saved = safe_load(rng_file)
        if not isinstance(saved, dict) or "rng" not in saved:
            raise CheckpointError(f"{rng_file} is not a megavid RNG file (no 'rng' entry)")
        rng = saved["rng"]
        state = state or saved.get("client_state")
    if state is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} has no megavid state; it was not written by megavid")
    return state, rng


def _describe_load_error(e: BaseException) -> str:
    """One line for a DeepSpeed load failure (a strict ``load_state_dict`` lists every key)."""
    msg = str(e)
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                       r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))", msg)
    if sizes:
        def shape(s: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", s))

        first = "; ".join(f"{k}: checkpoint {shape(a)} vs model {shape(b)}" for k, a, b in sizes[:3])
        more = f"; and {len(sizes) - 3} more" if len(sizes) > 3 else ""
        return f"{len(sizes)} tensors have other shapes ({first}{more})"
    for what in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(re.escape(what) + r" in state_dict: (.*?)\.\s*$", msg, re.M)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            return f"{what.replace('(s)', 's').lower()}: {_keys(keys)}"
    return f"{type(e).__name__}: {_one_line(e)}"


# --------------------------------------------------------------------------------------------
# Universal checkpoints (resume on a different world size)
# --------------------------------------------------------------------------------------------
def convert_to_universal(path: str | Path, output: str | Path | None = None, *, num_workers: int = 1) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (world-size independent).

    Runs DeepSpeed's ``ds_to_universal`` on one process; megavid's per-rank RNG files are
    copied along. Resume from it with ``--resume <output>`` on any world size whose global
    batch (micro x accum x world) matches.

    Args:
        path: run dir, checkpoints dir or tag folder (``step_<N>``).
        output: destination folder (default: ``<ckpt_dir>/step_<N>_universal``).
        num_workers: extraction processes.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ckpt_dir, tag = resolve_checkpoint(path)
    if tag.endswith(UNIVERSAL_SUFFIX):
        return ckpt_dir / tag
    verify_checkpoint_folder(ckpt_dir / tag)  # ds_to_universal unpickles with weights_only=False
    out = Path(output) if output else ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if out.exists():
        shutil.rmtree(out)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir / tag), output_folder=str(out), num_extract_workers=num_workers,
        num_merge_workers=num_workers, keep_temp_folder=False, strict=True, no_strict=False,
        inject_missing_state=True,
    )
    try:
        ds_to_universal.main(args)
    except (AssertionError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"cannot convert {ckpt_dir / tag} to a universal checkpoint: "
                              f"{_one_line(e)}") from e
    for f in (ckpt_dir / tag).glob("rng_rank*.pt"):
        shutil.copy2(f, out / f.name)
    # ds_to_universal writes `latest_universal` next to the output; keep our own `latest` as is.
    return out


# --------------------------------------------------------------------------------------------
# fp32 export
# --------------------------------------------------------------------------------------------
def export_fp32(path: str | Path, output: str | Path | None = None) -> Path:
    """Write a consolidated fp32 ``state_dict`` (``torch.save``) from any ZeRO stage's shards.

    Uses DeepSpeed's ``zero_to_fp32`` (the fp32 master weights, so bf16 runs export full
    precision); works from ZeRO-3 partitions and needs no process group or GPU. The file
    records its source tag (``source``, ``step``): evaluation re-exports a stale one.

    Args:
        path: run dir, checkpoints dir or tag folder.
        output: file to write (default ``<run_dir>/model_fp32.pt`` next to ``checkpoints/``).
    """
    ckpt_dir, tag = resolve_checkpoint(path)
    if output is None:
        base = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
        output = base / EXPORT_NAME
    output = Path(output)
    sd = _consolidated_state_dict(ckpt_dir, tag)
    output.parent.mkdir(parents=True, exist_ok=True)
    # per-process temporary name: ranks of a multi-process evaluation may re-export at once
    tmp = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    torch.save({"format": "megavid-fp32", "source": str(ckpt_dir / tag), "step": tag_step(tag),
                "state_dict": sd}, tmp)
    os.replace(tmp, output)
    return output


def _consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint: ZeRO 1-3 via zero_to_fp32 (fp32 master
    weights), ZeRO-0 from the module state (fp32 runs keep fp32 weights there)."""
    folder = ckpt_dir / tag
    verify_checkpoint_folder(folder)  # zero_to_fp32 unpickles with weights_only=False
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (FileNotFoundError, ValueError, KeyError, AssertionError, IndexError, RuntimeError,
                TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot consolidate fp32 weights from {folder}: "
                                  f"{type(e).__name__}: {_one_line(e)} (an incomplete or damaged "
                                  "checkpoint folder?)") from None
    else:
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{folder} holds no DeepSpeed model states; is it a megavid checkpoint?")
        obj = safe_load(files[0])
        if not isinstance(obj, dict) or not isinstance(obj.get("module"), Mapping):
            raise CheckpointError(f"{files[0]} holds no 'module' state dict; is it a DeepSpeed checkpoint?")
        sd = obj["module"]
    return {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Which weights to evaluate
# --------------------------------------------------------------------------------------------
def tag_step(tag: str | Path) -> int | None:
    """The step of a ``step_<N>`` / ``step_<N>_universal`` tag or folder (None otherwise)."""
    m = STEP_RE.match(Path(tag).name)
    return int(m.group(1)) if m else None


def export_source(path: str | Path) -> tuple[str | None, int | None]:
    """(source tag folder, step) recorded in an exported file; (None, None) for a plain state
    dict or an export without them."""
    obj = safe_load(path, mmap=True)
    if not isinstance(obj, dict) or obj.get("format") != "megavid-fp32":
        return None, None
    source = obj.get("source")
    step = obj.get("step")
    if not isinstance(step, int):
        step = tag_step(source) if isinstance(source, str) else None
    return (source if isinstance(source, str) else None), step


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of the weights at ``path`` (a tag folder, run dir or exported file);
    None when it is not recorded."""
    p = Path(path)
    if p.is_file():
        return export_source(p)[1]
    if p.is_dir() and (p / EXPORT_NAME).is_file() and not (p / "checkpoints").is_dir():
        return export_source(p / EXPORT_NAME)[1]
    return tag_step(resolve_checkpoint(p)[1])


def _newest_mtime(folder: Path) -> float:
    times = [f.stat().st_mtime for f in folder.rglob("*") if f.is_file()]
    return max(times, default=folder.stat().st_mtime)


@dataclass
class Selected:
    """The weights an evaluation uses.

    Attributes:
        path: exported file or DeepSpeed tag folder.
        step: its training step (None: not recorded).
        note: what was done to get there (e.g. a stale export re-exported), or "".
    """

    path: str
    step: int | None
    note: str = ""


def _select_in_run(run_dir: Path, refresh_export: bool = True) -> Selected | None:
    ckpt_dir = run_dir / "checkpoints"
    tag = get_latest_tag(ckpt_dir)
    export = run_dir / EXPORT_NAME
    if not export.is_file():
        return Selected(str(ckpt_dir / tag), tag_step(tag)) if tag else None
    source, step = export_source(export)
    if tag is None:
        return Selected(str(export), step)
    newest = tag_step(tag)
    if step is not None and newest is not None:  # the source step the export records
        stale = step < newest
        was = f"step {step}"
    else:  # unknown source: the files' times decide
        stale = export.stat().st_mtime < _newest_mtime(ckpt_dir / tag)
        was = "an unknown step"
    if not stale:
        return Selected(str(export), step)
    note = f"{export} was exported from {was} but {tag} is newer"
    if refresh_export:
        try:
            export_fp32(ckpt_dir / tag, export)
            log.warning("%s: re-exported it from %s", note, tag)
            return Selected(str(export), newest, f"{note}: re-exported it from {tag}")
        except OSError as e:  # e.g. a read-only run dir: evaluate the folder itself
            log.warning("%s; cannot rewrite it (%s): using %s directly", note, _one_line(e), tag)
    return Selected(str(ckpt_dir / tag), newest, f"{note}: using {tag}")


def find_checkpoint(run_dir: str | Path, *, refresh_export: bool = True) -> str | None:
    """The weights to evaluate for a run: the newest. Its exported fp32 file when that is
    current; when a newer ``step_<N>`` checkpoint exists (compared by the export's recorded
    source step, or by file times when unknown) the export is rewritten from it first (or, with
    ``refresh_export=False`` or a read-only run dir, the folder itself is returned); else the
    latest DeepSpeed checkpoint folder; None when the run has neither.

    Args:
        run_dir: the run directory.
        refresh_export: re-export a stale ``model_fp32.pt``.
    """
    sel = _select_in_run(Path(run_dir), refresh_export)
    return sel.path if sel else None


def select_checkpoint(path: str | Path, *, refresh_export: bool = True) -> Selected:
    """The concrete weights named by a user's path: a file as it is, a tag folder as it is, a
    checkpoints dir's latest tag, a run directory's newest weights (:func:`find_checkpoint`).

    Raises:
        CheckpointError: nothing there to evaluate.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass eval.checkpoint=<run dir, "
                              "step_<N> folder or exported file>")
    if p.is_file():
        return Selected(str(p), export_source(p)[1])
    if (p / "checkpoints").is_dir() or (p / EXPORT_NAME).is_file():
        sel = _select_in_run(p, refresh_export)
        if sel is None:
            raise CheckpointError(f"no checkpoint found in run directory {p}")
        return sel
    ckpt_dir, tag = resolve_checkpoint(p)
    return Selected(str(ckpt_dir / tag), tag_step(tag))


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An fp32 model state dict from an exported file, a plain state-dict file, or a DeepSpeed
    checkpoint (run dir, checkpoints dir or ``step_<N>`` folder; consolidated in memory).
    Nothing in the files is executed (:func:`safe_load`).

    Args:
        path: where the weights are.
    """
    p = Path(path)
    if p.is_file():
        return load_exported(p)
    if p.is_dir() and (p / EXPORT_NAME).is_file() and not (p / "checkpoints").is_dir():
        return load_exported(p)
    ckpt_dir, tag = resolve_checkpoint(p)
    return _consolidated_state_dict(ckpt_dir, tag)


def load_exported(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict written by :func:`export_fp32` (or a plain state dict file).

    Args:
        path: the exported file, or a run directory holding ``model_fp32.pt``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / EXPORT_NAME
    if not p.is_file():
        raise CheckpointError(f"exported weights {p} not found; run `megavid export-checkpoint` for the run first")
    obj = safe_load(p)
    if isinstance(obj, dict) and obj.get("format") == "megavid-fp32" and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{p} is not a state dict (expected megavid's export or a name -> tensor mapping)")


def run_export_checkpoint(cfg: Any, overwrite: bool = False, resume: str | None = None) -> Path:
    """`megavid export-checkpoint`: the run's latest (or ``resume``) checkpoint -> fp32 file.

    Args:
        cfg: resolved config (its run_dir is used).
        overwrite: replace an existing export.
        resume: a specific checkpoint (run dir, checkpoints dir or tag folder).
    """
    src = Path(resume) if resume else cfg.run_dir
    out = cfg.run_dir / EXPORT_NAME
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    path = export_fp32(src, out)
    print(f"exported fp32 weights to {path}")
    return path
