"""Egocentric benchmarks (``megavid eval-egocentric``): Epic-Kitchens-100 multi-instance
retrieval (mAP and nDCG against a graded relevancy matrix) and EgoMCQ (one narration, five
candidate clips; inter- and intra-video accuracy), zero-shot or with a finetuned VideoLM.

Inputs, as released (relative paths are looked up under ``data.root``, then the working
directory; see ``configs/task/ek100_mir.yaml`` and ``configs/task/egomcq.yaml``):

- EK-100 MIR (``epic-kitchens-100-annotations/retrieval_annotations/``):
  ``task.ego.relevancy`` = ``relevancy/caption_relevancy_EPIC_100_retrieval_test.pkl`` (a pickled
  float numpy array [videos, texts], 9668 x 3842), ``task.ego.relevancy_texts`` =
  ``EPIC_100_retrieval_test_sentence.csv`` (``index,sentence``: the matrix's columns, in row
  order), ``task.ego.relevancy_videos`` = ``EPIC_100_retrieval_test.csv`` (``narration_id``, ...,
  ``start_timestamp``, ``stop_timestamp``, ``narration``: the matrix's rows, in row order). The
  shards of ``eval.split`` are made from that same CSV (``megavid make-shards --format
  epic_kitchens``: one sample per narration keyed by its ``narration_id``), and the rows are
  matched to samples by key, so shard order does not matter. Without ``relevancy_videos`` the
  rows must follow the split's samples in shard order.
- EgoMCQ: ``task.ego.egomcq`` = EgoVLP's ``egomcq.json`` (``{question id: {"query": clip,
  "choices": {"0".."4": clip}, "answer": int, "types": 1 (inter) | 2 (intra)}}``, a clip being an
  EgoClip row: ``video_uid``, ``clip_start``, ``clip_end``, ``clip_text``, ...). Its clips become
  shards through ``python -m megavid.tasks.egocentric egomcq-clips egomcq.json clips.jsonl`` then
  ``megavid make-shards --format jsonl --annotations clips.jsonl --videos <ego4d full_scale>``:
  each clip is a window of the full ``<video_uid>.mp4`` keyed ``make_key(video_uid, start, end)``,
  which is how the questions find their clips. Our own list format is read too: ``[{"query",
  "choices": [5 sample keys], "answer", "type": "inter"|"intra"}]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavid.config import Config, to_dict
from megavid.errors import ConfigError, DataError
from megavid.tasks.base import get_data_file
from megavid.tasks.evaluation import encode_texts, open_eval, select_eval_weights
from megavid.tasks.features import get_split_features


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: a pickle can name any callable, and an
    evaluation input must never run code (EK-100's relevancy pkl is a pickled ndarray)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a relevancy pickle")
        return super().find_class(module, name)


def load_relevancy(path: str | Path) -> torch.Tensor:
    """A [videos, texts] relevancy matrix from ``.pkl`` (EK-100's pickled ndarray), ``.npy`` or
    ``.pt``.

    Args:
        path: the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.ego.relevancy={str(p)!r} does not exist; point it at EK-100's "
                          "caption_relevancy_*.pkl (or a .npy/.pt matrix)")
    try:
        if p.suffix == ".pkl":
            obj = _ArrayUnpickler(io.BytesIO(p.read_bytes())).load()
        elif p.suffix == ".npy":
            obj = np.load(p)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise DataError(f"relevancy {p} is not a pickled matrix ({e}); give EK-100's "
                        "caption_relevancy_*.pkl, a .npy or a .pt tensor") from e
    rel = torch.as_tensor(np.asarray(obj), dtype=torch.float64)
    if rel.ndim != 2:
        raise DataError(f"relevancy {p} has shape {tuple(rel.shape)}; expected [videos, texts]")
    return rel


def read_queries(path: str | Path) -> list[str]:
    """Text queries: a CSV's ``sentence`` column (EK-100's ``EPIC_100_retrieval_*_sentence.csv``,
    ``index,sentence``) or ``narration`` column, or one query per line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.ego.relevancy_texts={str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        col = next((c for c in ("sentence", "narration") if rows and c in rows[0]), None)
        if col is None:
            raise DataError(f"{p} has no 'sentence' (EK-100) or 'narration' column; fix the header "
                            "or give one query per line in a .txt file")
        return [r[col] for r in rows]
    return [line for line in text.splitlines() if line.strip()]


def read_relevancy_rows(path: str | Path) -> list[str]:
    """The sample keys of the relevancy matrix's rows: the ``narration_id`` column of EK-100's
    ``EPIC_100_retrieval_test.csv``, read by make-shards' own ``epic_kitchens`` reader (which
    keys the shards by the same id)."""
    from megavid.shards.ingest.annotations import read_annotations

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.ego.relevancy_videos={str(p)!r} does not exist; point it at "
                          "EK-100's EPIC_100_retrieval_test.csv")
    return [r.key for r in read_annotations(p, "epic_kitchens")]


def align_rows(keys: list[str], row_keys: list[str]) -> torch.Tensor:
    """Index of each matrix row's sample among ``keys`` (the split's feature rows).

    Args:
        keys: the split's sample keys.
        row_keys: the key of each relevancy row.
    """
    index = {k: i for i, k in enumerate(keys)}
    missing = [k for k in row_keys if k not in index]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(row_keys)} relevancy rows have no sample in the split "
            f"(e.g. {', '.join(missing[:3])}); make the split's shards from the same CSV "
            "(make-shards --format epic_kitchens) and check make-shards' failures")
    return torch.tensor([index[k] for k in row_keys], dtype=torch.long)


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
            "the split's samples (or name them: task.ego.relevancy_videos) and the columns "
            "task.ego.relevancy_texts")
    sim = text_feat.double() @ video_feat.double().T
    return ek100_mir_metrics(sim, relevancy_VT.T)


# EgoClip narrations start with a "#C" / "#O" marker; make-shards' egoclip reader drops it from
# the captions a model trains on, so the questions drop it as well
_NARRATION_MARKER = re.compile(r"^\s*#\w+\s*")


def egomcq_clip_key(clip: dict[str, Any]) -> str:
    """The shard key of an EgoMCQ clip (a window of ``<video_uid>``): make-shards' key of the
    same window, so a question finds the sample made from its clip."""
    from megavid.shards.ingest.options import make_key

    return make_key(str(clip["video_uid"]), float(clip["clip_start"]), float(clip["clip_end"]))


def _released_egomcq(data: dict[str, Any], p: Path) -> list[dict[str, Any]]:
    """EgoVLP's ``{qid: {"query", "choices": {"0": clip, ...}, "answer", "types"}}`` -> items."""
    items = []
    for qid in sorted(data, key=lambda q: (len(q), q)):  # "0", "1", ..., "10": numeric order
        q = data[qid]
        try:
            choices = [q["choices"][c] for c in sorted(q["choices"], key=lambda c: (len(c), c))]
            items.append({
                "id": qid,
                "query": _NARRATION_MARKER.sub("", str(q["query"]["clip_text"])),
                "choices": [egomcq_clip_key(c) for c in choices],
                "answer": int(q["answer"]),
                "type": int(q["types"]),
            })
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{p}: question {qid!r} is not in EgoVLP's egomcq.json layout "
                            f"({type(e).__name__}: {e}); see megavid.tasks.egocentric") from e
    return items


def load_egomcq(path: str | Path) -> list[dict[str, Any]]:
    """EgoMCQ items ``{"query", "choices": [sample keys], "answer", "type"}``, checked; reads
    EgoVLP's released ``egomcq.json`` (choices become shard keys) or our list format.

    Args:
        path: the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.ego.egomcq={str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"{p} is not valid JSON ({e})") from e
    if isinstance(data, dict) and data:
        return _released_egomcq(data, p)
    if not isinstance(data, list) or not data:
        raise DataError(f"{p} must hold EgoVLP's egomcq.json mapping or a non-empty JSON list of "
                        "questions")
    for i, it in enumerate(data):
        if not isinstance(it, dict) or not {"query", "choices", "answer", "type"} <= set(it):
            raise DataError(f"{p}[{i}] needs 'query', 'choices', 'answer' and 'type'")
    return data


def egomcq_clip_annotations(path: str | Path) -> list[dict[str, Any]]:
    """The distinct clips of a released ``egomcq.json`` as make-shards ``jsonl`` records
    (``video``, ``start``, ``end``, ``key``, ``caption``), in first-use order.

    Args:
        path: EgoVLP's ``egomcq.json``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist; give EgoVLP's egomcq.json")
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise DataError(f"{p} is not EgoVLP's egomcq.json (a mapping of question ids)")
    load_egomcq(p)  # the same layout checks as evaluation
    out: dict[str, dict[str, Any]] = {}
    for qid in sorted(data, key=lambda q: (len(q), q)):
        for c in data[qid]["choices"].values():
            key = egomcq_clip_key(c)
            out.setdefault(key, {"video": str(c["video_uid"]), "start": float(c["clip_start"]),
                                 "end": float(c["clip_end"]), "key": key,
                                 "caption": _NARRATION_MARKER.sub("", str(c.get("clip_text", "")))
                                 or "a clip"})
    return list(out.values())


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
    """`megavid eval-egocentric`: EK-100 MIR (``task.ego.relevancy``) and/or EgoMCQ
    (``task.ego.egomcq``) on ``eval.split``; writes
    ``<run_dir>/eval/egocentric_<split>_step<N>.json`` (without a recorded step: named by the
    weights file's stem, or ``_imported``; :func:`megavid.eval.results.results_path`).

    Args:
        cfg: the resolved config.
        overwrite: replace an existing results file (else it is refused before evaluating),
            and re-extract the split's features even when the cache matches.
        resume: the checkpoint (default: eval.checkpoint, the run's latest, or the model
            config's imported weights in a run folder without weights).
    """
    from megavid.eval.results import results_path, write_results

    c = cfg.task.ego
    if not (c.relevancy or c.egomcq):
        raise ConfigError("nothing to evaluate: set task.ego.relevancy (+ relevancy_texts) for "
                          "EK-100 MIR and/or task.ego.egomcq for EgoMCQ")
    if c.relevancy and not c.relevancy_texts:
        raise ConfigError("task.ego.relevancy needs task.ego.relevancy_texts (the query sentences)")
    # the benchmark files are read first: a wrong path fails before any video is decoded
    if c.relevancy:
        queries = read_queries(get_data_file(cfg, c.relevancy_texts, "task.ego.relevancy_texts"))
        relevancy = load_relevancy(get_data_file(cfg, c.relevancy, "task.ego.relevancy"))
        rows = (read_relevancy_rows(get_data_file(cfg, c.relevancy_videos, "task.ego.relevancy_videos"))
                if c.relevancy_videos else None)
    if c.egomcq:
        items = load_egomcq(get_data_file(cfg, c.egomcq, "task.ego.egomcq"))
    weights = select_eval_weights(cfg, resume)
    out = results_path(cfg.run_dir, "egocentric", cfg.eval.split, step=weights.step, weights=weights.name,
                       overwrite=overwrite)
    task, model = open_eval(cfg, weights)
    feats = get_split_features(cfg, task, model, cfg.eval.split, weights.path, cache=not overwrite)
    result: dict[str, Any] = {"split": cfg.eval.split, "num_samples": len(feats["keys"])}
    if c.relevancy:
        video = feats["video"] if rows is None else feats["video"][align_rows(feats["keys"], rows)]
        result["ek100_mir"] = ek100_mir(video, encode_texts(model, queries, task)[0], relevancy)
    if c.egomcq:
        result["egomcq"] = egomcq(feats["video"], feats["keys"],
                                  encode_texts(model, [it["query"] for it in items], task)[0], items)
        result["egomcq"]["chance"] = 100.0 / len(items[0]["choices"])
    if task.rank == 0:
        write_results(out, result, to_dict(cfg), weights.path, step=weights.step, imported=weights.imported)
        for name in ("ek100_mir", "egomcq"):
            if name in result:
                print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result[name].items()))
        print(f"results: {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m megavid.tasks.egocentric egomcq-clips EGOMCQ_JSON OUT_JSONL``: the clips of
    EgoVLP's egomcq.json as a make-shards annotation (then ``megavid make-shards --format jsonl
    --annotations OUT_JSONL --videos <folder of <video_uid>.mp4> --out <root>/shards/egomcq``)."""
    ap = argparse.ArgumentParser(prog="python -m megavid.tasks.egocentric",
                                 description="turn released egocentric benchmark files into make-shards inputs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("egomcq-clips", help="egomcq.json -> make-shards jsonl of its clips")
    p.add_argument("egomcq", help="EgoVLP's egomcq.json")
    p.add_argument("out", help="the jsonl to write")
    args = ap.parse_args(argv)
    try:
        clips = egomcq_clip_annotations(args.egomcq)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text("".join(json.dumps(c, sort_keys=True) + "\n" for c in clips))
    print(f"{len(clips)} clips -> {args.out}")
    return 0


__all__ = ["align_rows", "egomcq", "egomcq_clip_annotations", "egomcq_clip_key", "ek100_mir",
           "load_egomcq", "load_relevancy", "main", "read_queries", "read_relevancy_rows",
           "run_eval_egocentric"]


if __name__ == "__main__":
    sys.exit(main())
