"""Checkpoints: DeepSpeed save/load with megavid's client state, keep-last-K, the ``latest``
pointer, per-rank RNG, universal conversion (resume on another world size) and fp32 export.

Layout under ``<run_dir>/checkpoints``: DeepSpeed tags ``step_<N>/`` (model + optimizer
shards, ``rng_rank<R>.pt``), ``latest`` (a text file naming the newest tag), and
``step_<N>_universal/`` after :func:`convert_to_universal`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavid.errors import CheckpointError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
EXPORT_NAME = "model_fp32.pt"


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        tag = latest.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
        log.warning("%s names %s, which does not exist; using the newest step_* folder", latest, tag)
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
    if any(p.glob("mp_rank_*_model_states.pt")) or any(p.glob("*model_states.pt")) or (p / "zero").is_dir():
        return p.parent, p.name
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
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, FileNotFoundError, AssertionError) as e:
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir / tag}: {e}. It may come from another model, "
                              "ZeRO stage or world size (convert it with convert_to_universal)") from e
    if path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} could not be loaded (missing files)")
    state = (client or {}).get("megavid")
    rng = None
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if is_universal(ckpt_dir, tag):
        # universal copies keep the source tag's rng files when the world layout allows it
        rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        saved = torch.load(rng_file, map_location="cpu", weights_only=False)
        rng = saved["rng"]
        state = state or saved["client_state"]
    if state is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} has no megavid state; it was not written by megavid")
    return state, rng


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
        raise CheckpointError(f"cannot convert {ckpt_dir / tag} to a universal checkpoint: {e}") from e
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
    precision); works from ZeRO-3 partitions and needs no process group or GPU.

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
    tmp = output.with_suffix(output.suffix + ".tmp")
    torch.save({"format": "megavid-fp32", "source": str(ckpt_dir / tag), "state_dict": sd}, tmp)
    os.replace(tmp, output)
    return output


def _consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint: ZeRO 1-3 via zero_to_fp32 (fp32 master
    weights), ZeRO-0 from the module state (fp32 runs keep fp32 weights there)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = ckpt_dir / tag
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (FileNotFoundError, ValueError, KeyError, AssertionError) as e:
            raise CheckpointError(f"cannot consolidate fp32 weights from {folder}: {e}") from e
    else:
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{folder} holds no DeepSpeed model states; is it a megavid checkpoint?")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in sd.items()}


def find_checkpoint(run_dir: str | Path) -> str | None:
    """The weights to evaluate for a run: its exported fp32 file if present, else the latest
    DeepSpeed checkpoint folder; None when the run has neither.

    Args:
        run_dir: the run directory.
    """
    run_dir = Path(run_dir)
    if (run_dir / EXPORT_NAME).is_file():
        return str(run_dir / EXPORT_NAME)
    tag = get_latest_tag(run_dir / "checkpoints")
    return str(run_dir / "checkpoints" / tag) if tag else None


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An fp32 model state dict from an exported file, a plain state-dict file, or a DeepSpeed
    checkpoint (run dir, checkpoints dir or ``step_<N>`` folder; consolidated in memory).

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
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == "megavid-fp32":
        return obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
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
