"""Egocentric benchmarks (``megavid eval-egocentric``): Epic-Kitchens-100 multi-instance
retrieval (mAP and nDCG against a graded relevancy matrix) and EgoMCQ (one narration, five
candidate clips; inter- and intra-video accuracy), zero-shot or with a finetuned VideoLM.

Inputs, beside the shards of ``eval.split``:

- ``task.cls.relevancy``: EK-100's ``caption_relevancy_*.pkl`` layout, a [videos, texts]
  matrix; its rows follow the split's samples in shard order, its columns the queries of
  ``task.cls.relevancy_texts`` (one per line, or a CSV with a ``narration`` column, as
  ``EPIC_100_retrieval_test_sentence.csv``).
- ``task.cls.egomcq``: a JSON list of ``{"query", "choices": [5 sample keys], "answer": index,
  "type": "inter"|"intra"}`` (EgoVLP's ``egomcq.json`` converted to the split's keys).
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megavid.config import Config, to_dict
from megavid.errors import ConfigError, DataError


def load_relevancy(path: str | Path) -> torch.Tensor:
    """A [videos, texts] relevancy matrix from ``.pkl`` (EK-100), ``.npy`` or ``.pt``.

    Args:
        path: the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.cls.relevancy={str(p)!r} does not exist; point it at EK-100's "
                          "caption_relevancy_*.pkl (or a .npy/.pt matrix)")
    if p.suffix == ".pkl":
        with open(p, "rb") as f:
            obj = pickle.load(f)  # noqa: S301 - a file the user names, as EK-100's own code reads it
    elif p.suffix == ".npy":
        obj = np.load(p)
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    rel = torch.as_tensor(np.asarray(obj), dtype=torch.float64)
    if rel.ndim != 2:
        raise DataError(f"relevancy {p} has shape {tuple(rel.shape)}; expected [videos, texts]")
    return rel


def read_queries(path: str | Path) -> list[str]:
    """Text queries: one per line, or a CSV's ``narration`` column (EK-100 sentence CSV)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.cls.relevancy_texts={str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "narration" not in rows[0]:
            raise DataError(f"{p} has no 'narration' column; give one query per line instead")
        return [r["narration"] for r in rows]
    return [line for line in text.splitlines() if line.strip()]


@torch.no_grad()
def encode_texts(model: nn.Module, task: Any, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """[n, P] normalised text features of ``texts`` (CPU, float32)."""
    from megavid.data.text import tokenize

    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize(task.tokenizer, texts[s:s + batch_size], task.cfg.data.max_text_len)
        out.append(model.encode_text(ids.to(task.device), mask.to(task.device))[1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def ek100_mir(video_feat: torch.Tensor, text_feat: torch.Tensor, relevancy_VT: torch.Tensor) -> dict[str, float]:
    """EK-100 MIR metrics of features: sim = text @ video.T against the [V, T] relevancy.

    Args:
        video_feat: [V, P] normalised video features (the matrix's row order).
        text_feat: [T, P] normalised query features (the matrix's column order).
        relevancy_VT: [V, T] graded relevance (EK-100's layout).
    """
    from megavid.eval import ek100_mir_metrics

    if relevancy_VT.shape != (video_feat.shape[0], text_feat.shape[0]):
        raise DataError(
            f"relevancy matrix is {tuple(relevancy_VT.shape)} but the split has "
            f"{video_feat.shape[0]} videos and {text_feat.shape[0]} queries; the rows must follow "
            "the split's samples and the columns task.cls.relevancy_texts")
    sim = text_feat.double() @ video_feat.double().T
    return ek100_mir_metrics(sim, relevancy_VT.T)


def load_egomcq(path: str | Path) -> list[dict[str, Any]]:
    """EgoMCQ items ({"query", "choices", "answer", "type"}), checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.cls.egomcq={str(p)!r} does not exist")
    try:
        items = json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(items, list) or not items:
        raise DataError(f"{p} must hold a non-empty JSON list of questions")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not {"query", "choices", "answer", "type"} <= set(it):
            raise DataError(f"{p}[{i}] needs 'query', 'choices', 'answer' and 'type'")
    return items


def egomcq(video_feat: torch.Tensor, keys: list[str], text_feat: torch.Tensor,
           items: list[dict[str, Any]]) -> dict[str, float]:
    """EgoMCQ accuracy: each query's text feature scored against its candidate clips.

    Args:
        video_feat: [N, P] normalised features of the split's clips.
        keys: the clips' keys (row order of ``video_feat``).
        text_feat: [Q, P] normalised features of the items' queries.
        items: the questions (``choices`` are keys of the split).
    """
    from megavid.eval import egomcq_accuracy

    row = {k: i for i, k in enumerate(keys)}
    missing = sorted({c for it in items for c in it["choices"] if c not in row})
    if missing:
        raise DataError(f"EgoMCQ choices {missing[:5]} are not samples of the split; the choices "
                        "must be shard keys")
    width = {len(it["choices"]) for it in items}
    if len(width) != 1:
        raise DataError(f"EgoMCQ questions have different numbers of choices: {sorted(width)}")
    idx = torch.tensor([[row[c] for c in it["choices"]] for it in items])
    scores = torch.einsum("qp,qcp->qc", text_feat.double(), video_feat.double()[idx])
    correct = torch.tensor([int(it["answer"]) for it in items])
    return egomcq_accuracy(scores, correct, [it["type"] for it in items])


def run_eval_egocentric(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid eval-egocentric`: EK-100 MIR (``task.cls.relevancy``) and/or EgoMCQ
    (``task.cls.egomcq``) on ``eval.split``; writes ``<run_dir>/eval/egocentric_<split>.json``.

    Args:
        cfg: the resolved config.
        overwrite: re-extract the split's features even when the cache matches.
        resume: the checkpoint (default: eval.checkpoint or the run's latest).
    """
    from megavid.eval.results import write_results
    from megavid.tasks.base import VideoTextTask
    from megavid.tasks.classification import _setup, load_videolm, resolve_eval_checkpoint
    from megavid.tasks.features import get_split_features

    c = cfg.task.cls
    if not (c.relevancy or c.egomcq):
        raise ConfigError("nothing to evaluate: set task.cls.relevancy (+ relevancy_texts) for "
                          "EK-100 MIR and/or task.cls.egomcq for EgoMCQ")
    if c.relevancy and not c.relevancy_texts:
        raise ConfigError("task.cls.relevancy needs task.cls.relevancy_texts (the query sentences)")
    ckpt = resolve_eval_checkpoint(cfg, resume)
    task = VideoTextTask(cfg)
    _setup(task)
    model = load_videolm(cfg, task, ckpt)
    feats = get_split_features(cfg, task, model, cfg.eval.split, ckpt, cache=not overwrite)
    result: dict[str, Any] = {"split": cfg.eval.split, "num_samples": len(feats["keys"])}
    if c.relevancy:
        queries = read_queries(c.relevancy_texts)
        result["ek100_mir"] = ek100_mir(feats["video"], encode_texts(model, task, queries),
                                        load_relevancy(c.relevancy))
    if c.egomcq:
        items = load_egomcq(c.egomcq)
        result["egomcq"] = egomcq(feats["video"], feats["keys"],
                                  encode_texts(model, task, [it["query"] for it in items]), items)
        result["egomcq"]["chance"] = 100.0 / len(items[0]["choices"])
    if task.rank == 0:
        out = Path(cfg.run_dir) / "eval" / f"egocentric_{cfg.eval.split}.json"
        write_results(out, result, to_dict(cfg), ckpt)
        for name in ("ek100_mir", "egomcq"):
            if name in result:
                print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result[name].items()))
        print(f"results: {out}")
    return result


__all__ = ["egomcq", "ek100_mir", "encode_texts", "load_egomcq", "load_relevancy", "read_queries",
           "run_eval_egocentric"]
