"""Checkpoints: DeepSpeed save/load with megavid's client state, keep-last-K, per-rank RNG,
whether a state dict fits the model, and universal conversion (resume on another world size).

Layout under ``<run_dir>/checkpoints``: DeepSpeed tags ``step_<N>/`` (model + optimizer
shards, ``rng_rank<R>.pt``), ``latest`` (a text file naming the newest tag), and
``step_<N>_universal/`` after :func:`convert_to_universal`.

Nothing here unpickles arbitrary objects: every file read from a path a user gave (``--resume``,
``eval.checkpoint``, ``model.weights``, export input) goes through :func:`safe_load`, and every
pickle of a DeepSpeed folder is checked by :func:`verify_checkpoint_folder` before DeepSpeed's
own loaders (which use ``weights_only=False``) read it. Bad files give one-line
:class:`~megavid.errors.CheckpointError` messages naming the file.

The other concerns live in sibling modules, whose public names are re-exported here (so
``megavid.engine.checkpoint:run_export_checkpoint`` and every other name keeps working):
:mod:`megavid.engine.safe_pickle` (safe loading and folder verification),
:mod:`megavid.engine.checkpoint_paths` (tags, the ``latest`` pointer, resolving a user's path),
:mod:`megavid.engine.checkpoint_export` (fp32 export, loading model weights) and
:mod:`megavid.engine.checkpoint_select` (which weights an evaluation uses).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavid.engine.checkpoint_export import (
    export_fp32,
    export_source,
    load_exported,
    load_model_state,
    run_export_checkpoint,
)
from megavid.engine.checkpoint_paths import (
    EXPORT_NAME,
    STEP_RE,
    TAG_RE,
    UNIVERSAL_SUFFIX,
    get_latest_tag,
    get_step_tags,
    is_universal,
    resolve_checkpoint,
    tag_step,
)
from megavid.engine.checkpoint_select import Selected, checkpoint_step, find_checkpoint, select_checkpoint
from megavid.engine.safe_pickle import (
    ALLOWED_GLOBALS,
    DEEPSPEED_GLOBALS,
    LEGACY_RNG_GLOBALS,
    is_pickle_file,
    one_line,
    safe_load,
    verify_checkpoint_folder,
)
from megavid.errors import CheckpointError

__all__ = [
    "ALLOWED_GLOBALS",
    "DEEPSPEED_GLOBALS",
    "EXPORT_NAME",
    "LEGACY_RNG_GLOBALS",
    "STEP_RE",
    "TAG_RE",
    "UNIVERSAL_SUFFIX",
    "Selected",
    "check_param_order",
    "check_state_fits",
    "checkpoint_step",
    "convert_to_universal",
    "describe_misfit",
    "export_fp32",
    "export_source",
    "find_checkpoint",
    "get_latest_tag",
    "get_rng_state",
    "get_step_tags",
    "is_pickle_file",
    "is_universal",
    "load_checkpoint",
    "load_exported",
    "load_model_state",
    "load_state_strict",
    "prune_checkpoints",
    "resolve_checkpoint",
    "run_export_checkpoint",
    "safe_load",
    "save_checkpoint",
    "select_checkpoint",
    "set_rng_state",
    "tag_step",
    "to_plain",
    "verify_checkpoint_folder",
]


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
        raise CheckpointError(f"cannot load checkpoint {source} into the model: {one_line(e)}") from None


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
    return f"{type(e).__name__}: {one_line(e)}"


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
                              f"{one_line(e)}") from e
    for f in (ckpt_dir / tag).glob("rng_rank*.pt"):
        shutil.copy2(f, out / f.name)
    # ds_to_universal writes `latest_universal` next to the output; keep our own `latest` as is.
    return out
