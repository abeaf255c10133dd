"""Zero-shot evaluation: text-video retrieval (VTC, optionally re-ranked by VTM), a temporal
check (retrieval among clips that differ only in motion direction), and multiple-choice QA.

The metrics themselves are pure tensor functions in ``megavid.eval``; this module encodes a
split with a model, arranges the tensors, and writes the results JSON. Retrieval queries come
from each sample's captions as ``eval.captions`` says (:func:`build_queries`): its first
caption, every caption (several queries per video), or all of them as one paragraph.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megavid.config import Config, to_dict
from megavid.errors import ConfigError
from megavid.eval.retrieval import retrieval_chance
from megavid.tasks.base import VideoTextTask, check_data, get_frame_counts
from megavid.tasks.evaluation import encode_split, encode_texts, open_eval, select_eval_weights
from megavid.tasks.registry import get_task

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """Features of one split in dataset order: each video once, and the text queries built
    from the videos' captions (one or several per video, :func:`build_queries`)."""

    video_feat: torch.Tensor  # [N, P]
    text_feat: torch.Tensor  # [Q, P], one row per query
    keys: list[str]  # [N]
    meta: list[dict]  # [N]
    text_to_video: torch.Tensor  # LongTensor [Q]: the video (row of video_feat) of each query
    texts: list[str]  # [Q], the queries
    video_tokens: torch.Tensor | None = None  # [N, S, Dv] (for VTM re-ranking)
    text_hidden: torch.Tensor | None = None  # [Q, L, Dt]
    text_mask: torch.Tensor | None = None  # [Q, L]


def build_queries(captions: list[list[str]], mode: str) -> tuple[list[str], torch.Tensor]:
    """The retrieval queries of a split and the video each one describes (``eval.captions``).

    Args:
        captions: per video, its non-empty captions in order.
        mode: 'first' (its first caption), 'all' (every caption, a query each) or 'paragraph'
            (its captions joined with spaces, one query).

    Returns:
        (queries, text_to_video LongTensor [Q]).
    """
    if mode == "first":
        pairs = [(caps[0], v) for v, caps in enumerate(captions)]
    elif mode == "all":
        pairs = [(c, v) for v, caps in enumerate(captions) for c in caps]
    elif mode == "paragraph":
        pairs = [(" ".join(c.strip() for c in caps), v) for v, caps in enumerate(captions)]
    else:
        raise ConfigError(f"eval.captions={mode!r} is not one of 'first', 'all', 'paragraph'")
    return [t for t, _ in pairs], torch.tensor([v for _, v in pairs], dtype=torch.long)


def encode_retrieval(model: nn.Module, loader, task: VideoTextTask, *, captions: str = "first",
                     keep_tokens: bool = False, on_device: bool = False) -> EncodedSplit:
    """Encodes every clip once across ranks, in dataset order (:func:`encode_split`), then the
    split's text queries (:func:`build_queries` over each sample's captions,
    :func:`encode_texts`).

    Args:
        model: the model (or a DeepSpeed engine wrapping it).
        loader: an evaluation loader (``task.build_eval_loader``).
        task: the task (device, dtype, tokenizer).
        captions: the queries, as ``eval.captions``: 'first', 'all' or 'paragraph'. A sample
            JSON without captions (``data.name=synthetic``) has the loader's caption.
        keep_tokens: also keep the video tokens and text states (for VTM re-ranking).
        on_device: keep everything on ``task.device`` (the dense path); otherwise on the CPU
            (low-resource: a 96-frame clip of a ViT-B has 18,817 tokens, 29 MB in bf16, so a
            test set's tokens belong in host memory).
    """
    from megavid.data.order import sample_captions

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokens, v = model.encode_video(task.to_device(batch)["video"])
        return {"video": v.float(), **({"tokens": tokens} if keep_tokens else {})}

    model.eval()
    store = task.device if on_device else torch.device("cpu")
    split = encode_split(loader, encode, store=store)
    texts, text_to_video = build_queries(
        [sample_captions(meta) or [caption] for meta, caption in zip(split["meta"], split["captions"])],
        captions)
    text_feat, hidden, mask = encode_texts(model, texts, task, keep_tokens=keep_tokens, store=store)
    return EncodedSplit(
        video_feat=split["video"],
        text_feat=text_feat,
        keys=split["keys"],
        meta=split["meta"],
        text_to_video=text_to_video,
        texts=texts,
        video_tokens=split.get("tokens"),
        text_hidden=hidden,
        text_mask=mask,
    )


def _vtm_score_fn(model: nn.Module, enc: EncodedSplit, device, dtype):
    """score(query_text_idx [n], cand_video_idx [n]) -> VTM positive logit [n]."""

    @torch.no_grad()
    def score(ti: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        logits = model.vtm_logits(
            enc.text_hidden[ti].to(device, dtype),
            enc.text_mask[ti].to(device),
            enc.video_tokens[vi].to(device, dtype),
        )
        return logits[:, 1].float().cpu()

    return score


def evaluate_retrieval(model: nn.Module, loader, task, *, k_test: int = 0) -> dict[str, Any]:
    """Retrieval on a split: VTC similarities, optionally VTM re-ranking of each query's top-k
    (both directions, each text-video pair scored once; :func:`megavid.eval.score_retrieval`).
    The queries are ``eval.captions``'s (:func:`build_queries`); a video with several ranks in
    v2t by its best caption.

    ``eval.low_resource`` keeps features and tokens on the CPU and computes similarities and
    ranks in blocks of ``eval.chunk_size`` rows; the metrics are the same as the dense path's.

    Args:
        model: the model (or a DeepSpeed engine wrapping it).
        loader: an evaluation loader (clips of ``eval.num_frames`` frames).
        task: the task (device, dtype, config).
        k_test: candidates re-scored by the VTM head per query (0: VTC only).

    Returns:
        {"metrics": {"vtc/...", "vtm/..."}, "encoded": EncodedSplit, "sim": [Q, N] CPU} for
        the Q queries of ``eval.captions`` over the N clips.
    """
    from megavid.eval.retrieval import compute_similarity, score_retrieval

    low = task.cfg.eval.low_resource
    chunk = task.cfg.eval.chunk_size if low else None
    enc = encode_retrieval(model, loader, task, captions=task.cfg.eval.captions,
                           keep_tokens=k_test > 0, on_device=not low)
    sim = compute_similarity(enc.text_feat, enc.video_feat, chunk_size=chunk, device=task.device)
    # (rerank_topk clamps k to each direction's candidates: videos for t2v, queries for v2t)
    metrics = score_retrieval(
        sim, enc.text_to_video, k_test=k_test, chunk_size=chunk,
        pair_score_fn=_vtm_score_fn(model, enc, task.device, task.dtype) if k_test > 0 else None,
    )
    return {"metrics": metrics, "encoded": enc, "sim": sim}


def temporal_check(enc: EncodedSplit, sim: torch.Tensor) -> dict[str, float] | None:
    """t2v R@1 among clips that share every attribute but the motion direction: each query of
    a clip of such a group ranks the group's clips.

    Args:
        enc: the encoded split (its meta and queries).
        sim: [Q, N] similarity of its queries and clips.

    Returns None when the split has no such groups (not the synthetic dataset)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(enc.meta):
        a = m.get("attributes")
        if not a or "direction" not in a:
            return None
        groups[tuple(sorted((k, str(v)) for k, v in a.items() if k != "direction"))].append(i)
    queries_of: dict[int, list[int]] = defaultdict(list)
    for q, v in enumerate(enc.text_to_video.tolist()):
        queries_of[v].append(q)
    hits, total, chance = 0, 0, 0.0
    for idx in groups.values():
        if len(idx) < 2:
            continue
        rows = [q for v in idx for q in queries_of[v]]
        target = torch.tensor([j for j, v in enumerate(idx) for _ in queries_of[v]], dtype=torch.long)
        sub = sim[rows][:, idx]
        hits += int((sub.argmax(dim=1) == target).sum())
        total += len(rows)
        chance += len(rows) / len(idx)  # sum over queries of 1/len(group)
    if total == 0:
        return None
    return {"R@1": 100.0 * hits / total, "chance": 100.0 * chance / total, "queries": total}


@torch.no_grad()
def multiple_choice_qa(model: nn.Module, enc: EncodedSplit, task: VideoTextTask) -> dict[str, Any] | None:
    """Zero-shot QA as multiple choice: each candidate answer, phrased as "question answer", is
    scored against the clip by VTC similarity; accuracy overall and per question type."""
    from megavid.eval.qa import multiple_choice_accuracy

    items = [(i, qa) for i, m in enumerate(enc.meta) for qa in m.get("qa", []) if qa.get("choices")]
    if not items:
        return None
    by_type: dict[str, list] = defaultdict(list)
    for vi, qa in items:
        by_type[qa.get("type", "all")].append((vi, qa))
    groups = sorted(by_type.items())
    # every candidate of every question encoded at once, in question order
    texts = [f"{qa['question']} {c}" for _, group in groups for _, qa in group for c in qa["choices"]]
    text_feat = encode_texts(model, texts, task)[0]
    results: dict[str, Any] = {}
    all_scores, all_correct, chance_sum, row = [], [], 0.0, 0
    for qtype, group in groups:
        scores, correct = [], []
        for vi, qa in group:
            n = len(qa["choices"])
            scores.append((text_feat[row:row + n] @ enc.video_feat[vi].cpu()).tolist())
            row += n
            correct.append(qa["choices"].index(qa["answer"]))
            chance_sum += 1.0 / n
        acc = multiple_choice_accuracy(scores, correct)
        results[qtype] = {"accuracy": acc, "chance": 100.0 / len(group[0][1]["choices"]), "n": len(group)}
        all_scores += scores
        all_correct += correct
    results["overall"] = {
        "accuracy": multiple_choice_accuracy(all_scores, all_correct),
        "chance": 100.0 * chance_sum / len(all_correct),
        "n": len(all_correct),
    }
    return results


def format_report(result: dict[str, Any]) -> str:
    """The printed summary of :func:`run_eval_zeroshot`'s ``result``: the retrieval table
    (model rows, then the chance levels of the real query-to-clip mapping), the temporal
    check and the QA accuracies."""
    m, n, chance = result["metrics"], result["num_samples"], result["chance"]
    frames = result.get("num_frames") or {}
    at = f", {frames['eval']} frames (trained on {frames['train']})" if frames else ""
    cols = ("R@1", "R@5", "R@10", "MedR", "MeanR")
    lines = [f"zero-shot retrieval on {n} held-out clips, {result['num_queries']} text queries "
             f"(eval.captions={result['captions']}; split '{result['split']}'{at})",
             f"{'':14s}" + "".join(f"{k:>8s}" for k in cols)]
    for head in ("vtc", "vtm"):
        for d in ("t2v", "v2t"):
            if f"{head}/{d}_R@1" in m:
                lines.append(f"{head + ' ' + d:14s}" + "".join(
                    f"{m[f'{head}/{d}_{k}']:8.1f}" for k in cols))
    for d in ("t2v", "v2t"):  # a random ranking has no single median: MedR is left blank
        lines.append(f"{'chance ' + d:14s}" + "".join(
            f"{chance[f'{d}_{k}']:8.1f}" if f"{d}_{k}" in chance else f"{'-':>8s}" for k in cols))
    if result.get("temporal"):
        t = result["temporal"]
        lines.append(f"temporal check (clips differing only in direction): t2v R@1 "
                     f"{t['R@1']:.1f} vs chance {t['chance']:.1f} ({t['queries']} queries)")
    if result.get("qa"):
        lines.append("zero-shot multiple-choice QA (accuracy vs chance):")
        for qtype, r in result["qa"].items():
            lines.append(f"  {qtype:12s} {r['accuracy']:6.1f} vs {r['chance']:5.1f}  (n={r['n']})")
    return "\n".join(lines)


def run_eval_zeroshot(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid eval-zeroshot`: evaluates weights on ``eval.split`` and writes
    ``<run_dir>/eval/zeroshot_<split>_step<N>.json``, which records the weights' path, hash
    and training step.

    The weights (:func:`megavid.tasks.evaluation.select_eval_weights`): ``--resume`` or
    ``eval.checkpoint``, else the run's newest, else (a run folder without weights, e.g. a new
    run.name) the model config's own: ``model.weights=<exported fp32 file>`` and/or the tower
    weights, evaluated with no training run. Weights without a recorded step name the file
    ``zeroshot_<split>_<weights file stem>.json`` (``_imported`` for tower weights alone). An
    existing results file is refused before anything is evaluated: ``--overwrite`` replaces it.
    """
    from megavid.eval.results import results_path, write_results

    check_data(cfg, cfg.eval.split)
    # the newest weights of a run (a stale export is re-exported), exactly the one named, or
    # the model config's imported weights
    weights = select_eval_weights(cfg, resume)
    out = results_path(cfg.run_dir, "zeroshot", cfg.eval.split, step=weights.step, weights=weights.name,
                       overwrite=overwrite)
    task, model = open_eval(cfg, weights, get_task(cfg.task.name))
    if task.rank == 0:
        print(f"evaluating {weights.describe()}")

    loader = task.build_eval_loader(cfg.eval.split, task.rank, task.world_size)
    k_test = cfg.eval.k_test if cfg.model.vtm_weight > 0 else 0
    res = evaluate_retrieval(model, loader, task, k_test=k_test)
    enc = res["encoded"]
    result = {
        "split": cfg.eval.split,
        "num_samples": len(enc.keys),
        "num_queries": len(enc.texts),
        "captions": cfg.eval.captions,
        # the same checkpoint scores differently at another clip length: both are recorded
        "num_frames": get_frame_counts(cfg),
        "low_resource": cfg.eval.low_resource,
        "metrics": res["metrics"],
        "chance": retrieval_chance(enc.text_to_video, len(enc.keys)),
        "temporal": temporal_check(enc, res["sim"]) if cfg.eval.temporal_check else None,
        "qa": multiple_choice_qa(model, enc, task),
    }
    if task.rank == 0:
        write_results(out, result, to_dict(cfg), weights.path, step=weights.step, imported=weights.imported)
        print(format_report(result))
        print(f"results: {out}")
    return result
