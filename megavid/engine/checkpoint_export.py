"""fp32 export: one consolidated fp32 state dict from any ZeRO stage's shards
(:func:`export_fp32`, the ``megavid export-checkpoint`` job), and reading model weights back
from an export, a plain state-dict file or a DeepSpeed checkpoint (:func:`load_model_state`).
Nothing in the files is executed (:func:`~megavid.engine.safe_pickle.safe_load`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megavid.engine.checkpoint_paths import EXPORT_NAME, resolve_checkpoint, tag_step
from megavid.engine.safe_pickle import one_line, safe_load, verify_checkpoint_folder
from megavid.errors import CheckpointError


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
                                  f"{type(e).__name__}: {one_line(e)} (an incomplete or damaged "
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
