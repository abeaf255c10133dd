"""Feature extraction (``megavid extract-features``): the video and text features of a split
written to files, for heads trained elsewhere (EgoMQ-style) and for the linear probe's cache.

Layout of ``<run_dir>/features/<split>/``::

    <key>.pt                    {"video": [P], "video_pooled": [Dv], "text": [P]} (float32)
      or <key>_video.npy, <key>_video_pooled.npy, <key>_text.npy   (task.cls.features_format=npy)
    index.jsonl                 one line per sample: key, files, caption, sample JSON
    extract.json                results JSON: counts and dims, the checkpoint's sha256, config

``video`` is the model's projected, L2-normalised clip feature (``encode_video``), ``text`` the
same for the first caption (``encode_text``), ``video_pooled`` the video tower's pooled token
before projection (the feature linear probes and finetuning heads use).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megavid.config import Config, to_dict
from megavid.errors import DataError
from megavid.tasks.base import VideoTextTask, get_eval_num_frames
from megavid.tasks.evaluation import encode_split, open_eval, select_eval_weights

log = logging.getLogger(__name__)

FEATURE_NAMES = ("video", "video_pooled", "text")


@torch.no_grad()
def extract_split_features(model: nn.Module, loader: Any, task: VideoTextTask) -> dict[str, Any]:
    """Features of every sample of a loader's split, in dataset order, each sample once
    (:func:`megavid.tasks.evaluation.encode_split`).

    Args:
        model: a VideoLM (eval mode).
        loader: an eval loader (``task.build_eval_loader``).
        task: gives ``to_device`` (normalisation on the device).

    Returns:
        {"keys", "meta", "captions", "video" [N, P], "video_pooled" [N, Dv], "text" [N, P]}
        (float32, CPU).
    """

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = task.to_device(batch)
        # encode_video = vision_proj(pooled) normalised: one tower pass gives both features
        _, pooled = model.video_encoder(b["video"])
        return {"video": F.normalize(model.vision_proj(pooled), dim=-1).float(),
                "video_pooled": pooled.float(),
                "text": model.encode_text(b["input_ids"], b["attention_mask"])[1].float()}

    model.eval()
    return encode_split(loader, encode)


def write_features(feats: dict[str, Any], out_dir: str | Path, fmt: str = "pt") -> Path:
    """One file per video plus ``index.jsonl`` (the folder is replaced).

    Args:
        feats: the output of :func:`extract_split_features`.
        out_dir: the folder.
        fmt: 'pt' (one dict per video) or 'npy' (one array per feature and video).
    """
    if fmt not in ("pt", "npy"):
        raise DataError(f"task.cls.features_format={fmt!r} must be 'pt' or 'npy'")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = []
    for i, key in enumerate(feats["keys"]):
        row = {k: feats[k][i].clone() for k in FEATURE_NAMES}  # clone: save the row, not the storage
        if fmt == "pt":
            torch.save(row, out / f"{key}.pt")
            files = {k: f"{key}.pt" for k in FEATURE_NAMES}
        else:
            files = {}
            for k, v in row.items():
                np.save(out / f"{key}_{k}.npy", v.numpy())
                files[k] = f"{key}_{k}.npy"
        lines.append(json.dumps({"key": key, "files": files, "caption": feats["captions"][i],
                                 "meta": feats["meta"][i]}, sort_keys=True) + "\n")
    (out / "index.jsonl").write_text("".join(lines))
    return out


def load_features(folder: str | Path) -> dict[str, Any]:
    """Reload a folder written by :func:`write_features`.

    Args:
        folder: ``<run_dir>/features/<split>``.

    Returns:
        {"keys", "meta", "captions", "video", "video_pooled", "text"} (stacked tensors).
    """
    folder = Path(folder)
    index = folder / "index.jsonl"
    if not index.is_file():
        raise DataError(f"{folder} holds no index.jsonl; run `megavid extract-features` first")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {"keys": [r["key"] for r in rows], "meta": [r["meta"] for r in rows],
                           "captions": [r["caption"] for r in rows]}
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_NAMES}
    for r in rows:
        files = r["files"]
        if files["video"].endswith(".pt"):
            d = torch.load(folder / files["video"], map_location="cpu", weights_only=True)
            for k in FEATURE_NAMES:
                cols[k].append(d[k])
        else:
            for k in FEATURE_NAMES:
                cols[k].append(torch.from_numpy(np.load(folder / files[k])))
    for k, v in cols.items():
        out[k] = torch.stack(v) if v else torch.zeros(0)
    return out


def _cache_signature(cfg: Config, split: str) -> dict[str, Any]:
    """What the features of a split depend on besides the checkpoint (and the weights the
    model config imports, when it does: tower weights alone have no checkpoint hash)."""
    from megavid.data.table import get_split_spec

    sig = {"split": split, "shards": str(get_split_spec(cfg.data, split)), "root": cfg.data.root,
           "num_frames": get_eval_num_frames(cfg), "img_size": cfg.data.img_size,
           "max_text_len": cfg.data.max_text_len, "tokenizer": cfg.data.tokenizer}
    imported = {k: getattr(cfg.model, k) for k in ("weights", "text_weights", "video_weights")
                if getattr(cfg.model, k)}
    return {**sig, "imported": imported} if imported else sig


def get_split_features(cfg: Config, task: VideoTextTask, model: nn.Module, split: str, ckpt: str | None,
                       *, fmt: str | None = None, cache: bool = True) -> dict[str, Any]:
    """Features of a split, extracted once and cached under ``<run_dir>/features/<split>``.

    The cache is reused when its ``extract.json`` records the same checkpoint sha256 (null for a
    random-init model) and the same data settings; otherwise the split is re-extracted.

    Args:
        cfg: the resolved config.
        task: the task (device, loaders).
        model: the VideoLM holding ``ckpt``'s weights.
        split: split name or shard spec.
        ckpt: the checkpoint path (None: random init).
        fmt: file format (default ``task.cls.features_format``).
        cache: reuse a matching cache.
    """
    from megavid.eval.results import file_sha256, write_results

    folder = Path(cfg.run_dir) / "features" / split
    manifest = folder / "extract.json"
    sha = file_sha256(ckpt) if ckpt is not None else None
    sig = _cache_signature(cfg, split)
    if cache and manifest.is_file():
        try:
            doc = json.loads(manifest.read_text())
            have_sha = doc["checkpoint"]["sha256"] if doc["checkpoint"] else None
            if have_sha == sha and doc["metrics"].get("signature") == sig:
                log.info("reusing cached features in %s", folder)
                return load_features(folder)
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache is re-extracted
    loader = task.build_eval_loader(split, task.rank, task.world_size)
    feats = extract_split_features(model, loader, task)
    if task.rank == 0:
        manifest.unlink(missing_ok=True)  # the cache is only valid once everything is written
        write_features(feats, folder, fmt or cfg.task.cls.features_format)
        info = {"num_samples": len(feats["keys"]), "signature": sig,
                "dims": {k: int(feats[k].shape[-1]) for k in FEATURE_NAMES if feats[k].ndim == 2},
                "failures": dict(getattr(loader, "failures", {}))}
        write_results(manifest, info, to_dict(cfg), ckpt)
    return feats


def run_extract_features(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid extract-features`: features of ``eval.split`` to ``<run_dir>/features/<split>``.

    Args:
        cfg: the resolved config (``eval.checkpoint``, ``task.cls.features_format``).
        overwrite: re-extract even when a matching cache exists.
        resume: the checkpoint to use (default: eval.checkpoint, the run's latest, or the
            model config's imported weights in a run folder without weights; ``random`` for a
            random-init model).
    """
    weights = select_eval_weights(cfg, resume, allow_random=True)
    task, model = open_eval(cfg, weights)
    feats = get_split_features(cfg, task, model, cfg.eval.split, weights.path, cache=not overwrite)
    folder = Path(cfg.run_dir) / "features" / cfg.eval.split
    if task.rank == 0:
        print(f"extract-features: {len(feats['keys'])} clips of '{cfg.eval.split}' -> {folder}")
    return {"folder": str(folder), "num_samples": len(feats["keys"])}
