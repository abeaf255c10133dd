"""Zero-shot evaluation: text-video retrieval (VTC, optionally re-ranked by VTM), a temporal
check (retrieval among clips that differ only in motion direction), and multiple-choice QA.

The metrics themselves are pure tensor functions in ``megavid.eval``; this module encodes a
split with a model, arranges the tensors, and writes the results JSON.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megavid.config import Config, to_dict
from megavid.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """Features of one split, in dataset order, each sample once."""

    video_feat: torch.Tensor  # [N, P]
    text_feat: torch.Tensor  # [N, P] (first caption of each sample)
    keys: list[str]
    meta: list[dict]
    video_tokens: torch.Tensor | None = None  # [N, S, Dv] (for VTM re-ranking)
    text_hidden: torch.Tensor | None = None  # [N, L, Dt]
    text_mask: torch.Tensor | None = None  # [N, L]
    extras: dict = field(default_factory=dict)


@torch.no_grad()
def encode_split(model: nn.Module, loader, task, *, keep_tokens: bool = False,
                 on_device: bool = False) -> EncodedSplit:
    """Encodes every clip and its first caption, each sample once across ranks, in order.

    Args:
        model: the model (or a DeepSpeed engine wrapping it).
        loader: an evaluation loader (``task.build_eval_loader``).
        task: the task (device, dtype, tokenizer).
        keep_tokens: also keep the video tokens and text states (for VTM re-ranking).
        on_device: keep everything on ``task.device`` (the dense path); otherwise on the CPU
            (low-resource: a 96-frame clip of a ViT-B has 18,817 tokens, 29 MB in bf16, so a
            test set's tokens belong in host memory).
    """
    from megavid.eval.gather import gather_features, gather_objects

    model.eval()
    store = task.device if on_device else torch.device("cpu")
    vf, tf, toks, hids, masks, keys, metas, valids, indices = [], [], [], [], [], [], [], [], []
    for batch in loader:
        b = task.to_device(batch)
        tokens, v = model.encode_video(b["video"])
        hidden, t = model.encode_text(b["input_ids"], b["attention_mask"])
        vf.append(v.float().to(store))
        tf.append(t.float().to(store))
        if keep_tokens:
            # kept in the compute dtype (bf16 in bf16 runs): the VTM scorer casts to it anyway
            toks.append(tokens.to(store))
            hids.append(hidden.to(store))
            masks.append(b["attention_mask"].to(store))
        keys += batch["keys"]
        metas += batch["meta"]
        valids.append(batch.get("valid", torch.ones(len(batch["keys"]), dtype=torch.bool)))
        indices.append(batch.get("indices"))
    valid = torch.cat(valids).to(store)
    # the batches' dataset indices put the gathered rows in dataset order (as one process
    # would have them), not rank by rank
    index = torch.cat(indices) if indices and all(i is not None for i in indices) else None
    out = EncodedSplit(
        video_feat=gather_features(torch.cat(vf), valid, indices=index),
        text_feat=gather_features(torch.cat(tf), valid, indices=index),
        keys=gather_objects(keys, valid, indices=index),
        meta=gather_objects(metas, valid, indices=index),
    )
    if keep_tokens:
        out.video_tokens = gather_features(torch.cat(toks), valid, indices=index)
        out.text_hidden = gather_features(torch.cat(hids), valid, indices=index)
        out.text_mask = gather_features(torch.cat(masks), valid, indices=index)
    return out


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

    ``eval.low_resource`` keeps features and tokens on the CPU and computes similarities and
    ranks in blocks of ``eval.chunk_size`` rows; the metrics are the same as the dense path's.

    Args:
        model: the model (or a DeepSpeed engine wrapping it).
        loader: an evaluation loader (clips of ``eval.num_frames`` frames).
        task: the task (device, dtype, config).
        k_test: candidates re-scored by the VTM head per query (0: VTC only).

    Returns:
        {"metrics": {"vtc/...", "vtm/..."}, "encoded": EncodedSplit, "sim": [N, N] CPU}.
    """
    from megavid.eval.retrieval import compute_similarity, score_retrieval

    low = task.cfg.eval.low_resource
    chunk = task.cfg.eval.chunk_size if low else None
    enc = encode_split(model, loader, task, keep_tokens=k_test > 0, on_device=not low)
    sim = compute_similarity(enc.text_feat, enc.video_feat, chunk_size=chunk, device=task.device)
    n = sim.shape[0]
    metrics = score_retrieval(
        sim, torch.arange(n), k_test=min(k_test, n), chunk_size=chunk,
        pair_score_fn=_vtm_score_fn(model, enc, task.device, task.dtype) if k_test > 0 else None,
    )
    return {"metrics": metrics, "encoded": enc, "sim": sim}


def temporal_check(enc: EncodedSplit, sim: torch.Tensor) -> dict[str, float] | None:
    """t2v R@1 among clips that share every attribute but the motion direction.

    Returns None when the split has no such groups (not the synthetic dataset)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(enc.meta):
        a = m.get("attributes")
        if not a or "direction" not in a:
            return None
        groups[tuple(sorted((k, str(v)) for k, v in a.items() if k != "direction"))].append(i)
    hits, total, chance = 0, 0, 0.0
    for idx in groups.values():
        if len(idx) < 2:
            continue
        sub = sim[idx][:, idx]
        hits += int((sub.argmax(dim=1) == torch.arange(len(idx))).sum())
        total += len(idx)
        chance += 1.0  # sum over queries of 1/len(group)
    if total == 0:
        return None
    return {"R@1": 100.0 * hits / total, "chance": 100.0 * chance / total, "queries": total}


@torch.no_grad()
def multiple_choice_qa(model: nn.Module, enc: EncodedSplit, task) -> dict[str, Any] | None:
    """Zero-shot QA as multiple choice: each candidate answer, phrased as "question answer", is
    scored against the clip by VTC similarity; accuracy overall and per question type."""
    from megavid.data.text import tokenize
    from megavid.eval.qa import multiple_choice_accuracy

    items = [(i, qa) for i, m in enumerate(enc.meta) for qa in m.get("qa", []) if qa.get("choices")]
    if not items:
        return None
    tok = task.tokenizer
    by_type: dict[str, list] = defaultdict(list)
    for vi, qa in items:
        by_type[qa.get("type", "all")].append((vi, qa))
    results: dict[str, Any] = {}
    all_scores, all_correct, chance_sum = [], [], 0.0
    for qtype, group in sorted(by_type.items()):
        scores, correct = [], []
        for vi, qa in group:
            texts = [f"{qa['question']} {c}" for c in qa["choices"]]
            ids, mask = tokenize(tok, texts, task.cfg.data.max_text_len)
            _, tf = model.encode_text(ids.to(task.device), mask.to(task.device))
            scores.append((tf.float().cpu() @ enc.video_feat[vi].cpu()).tolist())
            correct.append(qa["choices"].index(qa["answer"]))
            chance_sum += 1.0 / len(qa["choices"])
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


def _chance_retrieval(n: int) -> dict[str, float]:
    return {"R@1": 100.0 / n, "R@5": 100.0 * min(5, n) / n, "R@10": 100.0 * min(10, n) / n,
            "MedR": (n + 1) / 2}


def format_report(result: dict[str, Any]) -> str:
    m, n = result["metrics"], result["num_samples"]
    chance = _chance_retrieval(n)
    frames = result.get("num_frames") or {}
    at = f", {frames['eval']} frames (trained on {frames['train']})" if frames else ""
    lines = [f"zero-shot retrieval on {n} held-out clips (split '{result['split']}'{at})",
             f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'MedR':>8s}"]
    for head in ("vtc", "vtm"):
        for d in ("t2v", "v2t"):
            if f"{head}/{d}_R@1" in m:
                lines.append(f"{head + ' ' + d:14s}" + "".join(
                    f"{m[f'{head}/{d}_{k}']:8.1f}" for k in ("R@1", "R@5", "R@10", "MedR")))
    lines.append(f"{'chance':14s}" + "".join(f"{chance[k]:8.1f}" for k in ("R@1", "R@5", "R@10", "MedR")))
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
    """`megavid eval-zeroshot`: evaluates a checkpoint (eval.checkpoint, --resume, or the run's
    newest weights) on ``eval.split`` and writes ``<run_dir>/eval/zeroshot_<split>.json``, which
    records the checkpoint's path, hash and training step."""
    from megavid.engine.checkpoint import select_checkpoint
    from megavid.engine.dist import get_world_info, init_distributed
    from megavid.eval.results import write_results
    from megavid.tasks import get_task
    from megavid.tasks.base import get_frame_counts, load_model_weights
    from megavid.tasks.pretrain import check_data

    check_data(cfg, cfg.eval.split)
    info = get_world_info()
    named = resume or cfg.eval.checkpoint
    if not named and not any(Path(cfg.run_dir, n).exists() for n in ("checkpoints", "model_fp32.pt")):
        raise CheckpointError(
            f"no checkpoint to evaluate in {cfg.run_dir}; train first (megavid pretrain ...) "
            "or pass eval.checkpoint=PATH"
        )
    # the newest weights of a run (a stale export is re-exported), or exactly the one named
    selected = select_checkpoint(named or cfg.run_dir)
    ckpt = selected.path
    if info.rank == 0:
        step = "an unrecorded step" if selected.step is None else f"step {selected.step}"
        print(f"evaluating {ckpt} ({step})" + (f"; {selected.note}" if selected.note else ""))
    if info.world_size > 1:
        init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    task = get_task(cfg.task.name)(cfg)
    task.setup(device, torch.float32, info.rank, info.world_size)
    model = task.build_model()
    load_model_weights(model, ckpt, cfg)
    model.to(device).eval()

    loader = task.build_eval_loader(cfg.eval.split, info.rank, info.world_size)
    k_test = cfg.eval.k_test if cfg.model.vtm_weight > 0 else 0
    res = evaluate_retrieval(model, loader, task, k_test=k_test)
    enc = res["encoded"]
    result = {
        "split": cfg.eval.split,
        "num_samples": len(enc.keys),
        # the same checkpoint scores differently at another clip length: both are recorded
        "num_frames": get_frame_counts(cfg),
        "low_resource": cfg.eval.low_resource,
        "metrics": res["metrics"],
        "chance": _chance_retrieval(len(enc.keys)),
        "temporal": temporal_check(enc, res["sim"]) if cfg.eval.temporal_check else None,
        "qa": multiple_choice_qa(model, enc, task),
    }
    if info.rank == 0:
        out = Path(cfg.run_dir) / "eval" / f"zeroshot_{cfg.eval.split}.json"
        write_results(out, result, to_dict(cfg), ckpt, step=selected.step)
        print(format_report(result))
        print(f"results: {out}")
    return result
