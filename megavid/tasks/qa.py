"""Open-ended video QA finetuning (MSRVTT-QA / MSVD-QA / ActivityNet-QA style, and the synthetic
moving-shapes QA): answer classification over a vocabulary of the most frequent training answers.

- Answers: every answer (training, ground truth, prediction) is taken through
  :func:`megavid.eval.qa.normalize_answer` (lower-case, stripped, inner whitespace collapsed),
  as the benchmarks' exact-match scoring is done there; the shards keep the released text.
- Answer vocabulary: the ``model.num_answers`` most frequent normalised answers of the training
  split's QA pairs (ties broken alphabetically, so every rank and every re-run builds the same
  list), saved as ``<run_dir>/answers.json``.
- Training: each training sample contributes up to ``task.qa_pairs_per_sample`` of its QA pairs
  (all of them when it has no more; else a choice seeded from (run seed, epoch, sample index),
  so a resumed run picks the same pairs). The clip is encoded once and its questions share its
  tokens; each question is tokenized with ``data.tokenizer`` and the loss is the mean
  cross-entropy of ``model.qa_logits`` over the questions.
  Questions whose answer is outside the vocabulary are skipped and counted (``qa_skipped_oov``).
- Evaluation: every QA pair of every held-out sample; accuracy overall and per question type
  (an out-of-vocabulary answer counts as a wrong prediction), the majority-answer baseline of
  the same questions, a predictions JSONL keyed by question id (``qid``: the annotation's id,
  e.g. MSRVTT-QA's ``id``; ``<key>/<n>`` for the n-th QA pair of a sample without ids) and a
  results JSON with the checkpoint hash.

The loop is the engine's ``Trainer``; this module only supplies the task.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megavid.config import Config, to_dict
from megavid.errors import ConfigError, DataError
from megavid.eval.qa import normalize_answer
from megavid.data.table import read_split_meta
from megavid.tasks.base import VideoTextTask, get_frame_counts, train_task

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"
"""The answer vocabulary of a QA run, in ``cfg.run_dir``: {"answers": [...], "counts": [...]}."""
_QA_STREAM = 0x5141  # "QA": the seed stream of the per-sample QA choice (apart from the loader's)


def build_answer_vocab(answers: Iterable[str], k: int) -> list[str]:
    """The ``k`` most frequent answers, most frequent first (ties: alphabetical order).

    Args:
        answers: every training answer (one entry per QA pair).
        k: vocabulary size (``model.num_answers``).

    Returns:
        Up to ``k`` distinct answers (fewer when the data has fewer).
    """
    if k < 1:
        raise ConfigError(f"model.num_answers={k}: QA finetuning needs an answer vocabulary; "
                          "set model.num_answers (e.g. 1000 for MSRVTT-QA)")
    counts = Counter(answers)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _qa_pairs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The usable QA pairs of a sample JSON (a question and an answer, both text)."""
    return [qa for qa in meta.get("qa") or []
            if isinstance(qa, dict) and isinstance(qa.get("question"), str)
            and isinstance(qa.get("answer"), str)]


class QATask(VideoTextTask):
    """Video QA as classification over the answer vocabulary.

    Args:
        cfg: the resolved job config (``model.num_answers`` > 0).
        overwrite: a run directory's ``answers.json`` that disagrees with the data is replaced
            instead of raising.

    Raises:
        ConfigError: no QA head (``model.num_answers`` < 1), before anything is built.
    """

    task_name = "qa"

    def __init__(self, cfg: Config, *, overwrite: bool = False) -> None:
        if cfg.model.num_answers < 1:
            raise ConfigError("QA finetuning needs a QA head: set model.num_answers (the answer "
                              "vocabulary size, e.g. model.num_answers=1000)")
        super().__init__(cfg)
        self.overwrite = overwrite
        self.answers: list[str] = []
        self.answer_to_id: dict[str, int] = {}
        self.train_answers: list[tuple[str, str]] = []  # (answer, type) of every training pair
        self.skipped_oov = 0
        self._train_loader: Any = None

    # -- vocabulary ------------------------------------------------------------------------------
    def build_vocab(self) -> list[str]:
        """Read the training QA pairs, build the vocabulary and save it (rank 0)."""
        k = self.cfg.model.num_answers
        metas = read_split_meta(self.cfg.data, self.cfg.data.train)
        pairs = [qa for m in metas for qa in _qa_pairs(m)]
        if not pairs:
            raise DataError(
                f"the training split '{self.cfg.data.train}' has no QA pairs (sample JSON field "
                "'qa': [{question, answer, type}]); make the shards from a QA annotation file")
        self.train_answers = [(normalize_answer(qa["answer"]), str(qa.get("type", "all")))
                              for qa in pairs]
        answers = build_answer_vocab((a for a, _ in self.train_answers), k)
        covered = sum(a in set(answers) for a, _ in self.train_answers)
        log.info("answer vocabulary: %d answers (model.num_answers=%d) cover %d of %d training "
                 "QA pairs", len(answers), k, covered, len(self.train_answers))
        path = Path(self.cfg.run_dir) / ANSWERS_FILE
        if path.is_file() and not self.overwrite:
            saved = json.loads(path.read_text()).get("answers")
            if saved != answers:
                raise DataError(
                    f"{path} holds a different answer vocabulary than the training data gives "
                    "now (the data or model.num_answers changed); pass --overwrite to start afresh "
                    "or use another run.name")
        if self.rank == 0 and not self.cfg.run.debug:
            counts = Counter(a for a, _ in self.train_answers)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"answers": answers, "counts": [counts[a] for a in answers],
                                       "num_answers": k}, indent=1) + "\n")
            os.replace(tmp, path)
        self.answers = answers
        self.answer_to_id = {a: i for i, a in enumerate(answers)}
        return answers

    # -- engine protocol -------------------------------------------------------------------------
    def setup(self, device: torch.device, dtype: torch.dtype, rank: int, world_size: int,
              gather: Any = None) -> None:
        super().setup(device, dtype, rank, world_size, gather)
        if not self.answers:
            self.build_vocab()

    def build_train_loader(self, rank: int, world_size: int):
        # kept so training_forward knows the epoch of the batch (the seeded QA choice)
        self._train_loader = super().build_train_loader(rank, world_size)
        return self._train_loader

    def choose_training_qa(self, batch: dict[str, Any]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The QA pairs trained on this batch: up to ``task.qa_pairs_per_sample`` per sample
        (all when it has no more; else a choice seeded by (run seed, epoch, sample index), so a
        resumed run picks the same ones).

        Returns:
            (questions, answer ids [R] with -1 for an answer outside the vocabulary, the batch
            row of each question [R]); a sample without QA pairs gives no row.
        """
        epoch = int(getattr(self._train_loader, "epoch", 0))
        k = self.cfg.task.qa_pairs_per_sample
        indices = batch.get("indices")
        questions, labels, rows = [], [], []
        for j, meta in enumerate(batch["meta"]):
            pairs = _qa_pairs(meta)
            if 0 < k < len(pairs):
                index = int(indices[j]) if indices is not None else j
                rng = np.random.default_rng([int(self.cfg.run.seed), epoch, index, _QA_STREAM])
                pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), k, replace=False).tolist())]
            for qa in pairs:
                questions.append(qa["question"])
                labels.append(self.answer_to_id.get(normalize_answer(qa["answer"]), -1))
                rows.append(j)
        return questions, torch.tensor(labels, dtype=torch.long), torch.tensor(rows, dtype=torch.long)

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from megavid.data.text import tokenize
        from megavid.data.transforms import normalize_clip

        questions, labels, rows = self.choose_training_qa(batch)
        keep = labels >= 0
        skipped = int((~keep).sum())
        self.skipped_oov += skipped
        if not bool(keep.any()):
            # Every rank must run backward (ZeRO collectives): a zero loss still connected to
            # the graph, computed on one row with a dummy question and label.
            questions, rows = [""], torch.zeros(1, dtype=torch.long)
            labels, keep, weight = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 0.0
        else:
            weight = 1.0
        sel = keep.nonzero().squeeze(1)
        # each clip is encoded once; its kept questions share its tokens
        clips = torch.unique(rows[sel])
        video = normalize_clip(batch["video"][clips], self.device, self.dtype)
        ids, mask = tokenize(self.tokenizer, [questions[i] for i in sel.tolist()],
                             self.cfg.data.max_text_len)
        # The QA objective alone (whatever the pretraining weights of model.*_weight say):
        # cross-entropy of the QA head's logits over the vocabulary, one term per question.
        tokens, _ = model.encode_video(video)
        row_of_clip = torch.searchsorted(clips, rows[sel]).to(tokens.device)
        logits = model.qa_logits(tokens[row_of_clip], ids.to(self.device), mask.to(self.device)).float()
        target = labels[sel].to(self.device)
        loss = F.cross_entropy(logits, target) * weight
        acc = (logits.argmax(-1) == target).float().mean() if weight else logits.new_zeros(())
        return {"loss": loss, "loss_qa": loss.detach(), "train_acc": acc.detach() * 100.0,
                "qa_skipped_oov": torch.tensor(float(skipped)),
                "qa_questions": torch.tensor(float(len(sel) if weight else 0))}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """QA accuracy on the validation split (run by the engine every ``train.eval_every``)."""
        return self.evaluate_split(model, self.cfg.data.val)["metrics"]

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, split: str) -> list[dict[str, Any]]:
        """Predictions for every QA pair of ``split``, each once across ranks, in index order.

        Returns:
            [{"qid", "key", "question", "answer", "prediction", "type", "in_vocab"}]: the
            annotation's answer as stored, the prediction a vocabulary entry.
        """
        from megavid.data.text import tokenize
        from megavid.eval.gather import gather_objects

        if not self.answers:
            self.build_vocab()
        model.eval()
        loader = self.build_eval_loader(split, self.rank, self.world_size)
        per_sample: list[list[dict[str, Any]]] = []
        valids: list[bool] = []
        n_ans = len(self.answers)
        for batch in loader:
            rows = [(i, n, qa) for i, m in enumerate(batch["meta"])
                    for n, qa in enumerate(_qa_pairs(m))]
            recs: list[list[dict[str, Any]]] = [[] for _ in batch["meta"]]
            if rows:
                b = self.to_device(batch)
                tokens, _ = model.encode_video(b["video"])
                ids, mask = tokenize(self.tokenizer, [qa["question"] for _, _, qa in rows],
                                     self.cfg.data.max_text_len)
                vid = torch.tensor([i for i, _, _ in rows], device=tokens.device)
                # only the vocabulary's columns: a head wider than the vocabulary (fewer distinct
                # training answers than model.num_answers) never predicts an unused slot
                logits = model.qa_logits(tokens[vid], ids.to(self.device), mask.to(self.device))
                pred = logits[:, :n_ans].float().argmax(-1).tolist()
                for (i, n, qa), p in zip(rows, pred):
                    key = batch["keys"][i]
                    recs[i].append({
                        "qid": qa.get("qid", f"{key}/{n}"), "key": key,
                        "question": qa["question"], "answer": qa["answer"],
                        "prediction": self.answers[p], "type": str(qa.get("type", "all")),
                        "in_vocab": normalize_answer(qa["answer"]) in self.answer_to_id})
            per_sample += recs
            valids += batch.get("valid", torch.ones(len(recs), dtype=torch.bool)).tolist()
        gathered = gather_objects(per_sample, valids)
        return [r for recs in gathered for r in recs]

    def evaluate_split(self, model: nn.Module, split: str) -> dict[str, Any]:
        """Accuracy overall / per type, the majority-answer baseline and the predictions.

        Returns:
            {"metrics": {"acc", "acc_<type>", "num", ..., "baseline_acc", "baseline_acc_<type>",
            "oov"}, "predictions": [...]}.
        """
        from megavid.eval.qa import majority_answer_baseline, qa_accuracy

        preds = self.predict(model, split)
        if not preds:
            raise DataError(f"split '{split}' has no QA pairs to evaluate (sample JSON field "
                            "'qa'); evaluate on a split made from a QA annotation file")
        types = [p["type"] for p in preds]
        metrics = qa_accuracy([p["prediction"] for p in preds], [p["answer"] for p in preds], types)
        base = majority_answer_baseline(
            [a for a, _ in self.train_answers], [p["answer"] for p in preds],
            train_types=[t for _, t in self.train_answers], test_types=types)
        metrics.update({f"baseline_{k}": v for k, v in base.items() if k.startswith("acc")})
        metrics["oov"] = float(sum(not p["in_vocab"] for p in preds))
        return {"metrics": metrics, "predictions": preds}


def format_qa_report(metrics: dict[str, float], split: str) -> str:
    """Accuracy per question type beside the majority-answer baseline, one line each."""
    types = sorted(k[4:] for k in metrics if k.startswith("acc_"))
    lines = [f"QA on split '{split}': {int(metrics['num'])} questions "
             f"({int(metrics['oov'])} with an answer outside the vocabulary)",
             f"  {'overall':12s} {metrics['acc']:6.1f}  (majority baseline {metrics['baseline_acc']:5.1f})"]
    for t in types:
        lines.append(f"  {t:12s} {metrics['acc_' + t]:6.1f}  (majority baseline "
                     f"{metrics.get('baseline_acc_' + t, float('nan')):5.1f}, n={int(metrics['num_' + t])})")
    return "\n".join(lines)


def run_finetune_qa(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid finetune-qa`: trains the QA task with the engine, then evaluates ``eval.split``.

    Writes ``<run_dir>/answers.json``, ``<run_dir>/eval/qa_<split>.json`` (metrics, baseline,
    config, versions, checkpoint hash, the predictions file's name) and
    ``<run_dir>/eval/qa_<split>_predictions.jsonl`` (one line per question: ``qid``, ``key``,
    ``question``, ``answer``, ``prediction``, ``type``).

    Args:
        cfg: the resolved config (its ``task.name``, when set, must be qa).
        overwrite: start afresh in an existing run directory.
        resume: checkpoint to resume from.

    Returns:
        The trainer's summary plus "qa" (the evaluation metrics) and "results" (the JSON path).
    """
    from megavid.engine.checkpoint import find_checkpoint
    from megavid.eval.results import write_results

    trained = train_task(cfg, QATask, "finetune-qa", overwrite=overwrite, resume=resume,
                         task_args={"overwrite": overwrite})
    task, summary, cfg = trained.task, trained.summary, trained.task.cfg  # cfg: task.name=qa
    result = task.evaluate_split(trained.model, cfg.eval.split)
    summary["qa"] = result["metrics"]
    if task.rank == 0:
        out = Path(cfg.run_dir) / "eval" / f"qa_{cfg.eval.split}.json"
        ckpt = None if cfg.run.debug else find_checkpoint(cfg.run_dir)
        pred_path = out.with_name(f"qa_{cfg.eval.split}_predictions.jsonl")
        write_results(out, {"qa": result["metrics"], "split": cfg.eval.split,
                            "num_frames": get_frame_counts(cfg),
                            "answers": len(task.answers),
                            "train_skipped_oov": task.skipped_oov,
                            "predictions": pred_path.name}, to_dict(cfg), ckpt)
        pred_path.write_text("".join(json.dumps({k: p[k] for k in (
            "qid", "key", "question", "answer", "prediction", "type")}) + "\n"
            for p in result["predictions"]))
        print(format_qa_report(result["metrics"], cfg.eval.split))
        print(f"results: {out}\npredictions: {pred_path}")
        summary["results"] = str(out)
    return summary
