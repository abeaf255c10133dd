"""The downstream evaluation commands on the released file formats, end to end on the synthetic
clips: annotation files written here in the layouts the benchmarks ship (Charades-Ego CSV + class
list, a generic ``path,label`` list, EK-100's retrieval CSVs + relevancy pickle, EgoVLP's
egomcq.json), turned into shards by ``megavid make-shards`` (its own readers of those formats),
then evaluated by finetune-cls and eval-egocentric. Every reported number is recomputed here
from the saved per-sample scores or the reloaded features, with metric code written in this file.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megavid.cli import main
from megavid.config import compose

pytestmark = pytest.mark.slow

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
DIRECTIONS = ["left", "right", "up", "down"]
# Charades-Ego's CSV header (CharadesEgo_v1_train_only1st.csv)
CHARADES_COLS = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                 "descriptions", "actions", "length", "egocentric", "charades_video"]
# EPIC_100_retrieval_test.csv's header
EK100_COLS = ["uid", "narration_id", "participant_id", "video_id", "narration_timestamp",
              "start_timestamp", "stop_timestamp", "start_frame", "stop_frame", "narration", "verb",
              "verb_class", "noun", "noun_class", "all_nouns", "all_noun_classes"]


def _metas(root: Path, split: str) -> list[dict]:
    return [json.loads(x) for x in (root / "raw" / f"{split}.jsonl").read_text().splitlines()]


def _make_shards(videos: Path, ann: Path, out: Path, fmt: str) -> None:
    rc = main(["make-shards", "--videos", str(videos), "--annotations", str(ann), "--out", str(out),
               "--format", fmt, "--workers", "1", "--quiet"])
    assert rc == 0


def _doc(path: Path) -> dict:
    assert path.is_file(), path
    return json.loads(path.read_text())


def _finetune_cls(args: list[str]):
    """finetune-cls to the end; returns (cfg, results JSON, checkpoint) after checking that the
    JSON names the checkpoint's sha256 and verifies."""
    from megavid.engine.checkpoint import find_checkpoint
    from megavid.eval.results import file_sha256, verify_results

    assert main(["finetune-cls", *args, "--overwrite"]) == 0
    cfg = compose(args)
    out = cfg.run_dir / "eval" / "cls_val.json"
    doc = _doc(out)
    ckpt = Path(find_checkpoint(cfg.run_dir))
    assert doc["checkpoint"]["sha256"] == file_sha256(ckpt) and verify_results(out)
    return cfg, doc, ckpt


def _scores(run_dir: Path, doc: dict, name: str) -> dict:
    """The scores file named by a results JSON, checked against the sha256 the JSON records."""
    from megavid.eval.results import file_sha256

    path = run_dir / "eval" / doc["metrics"]["scores"]["file"]
    assert path.name == f"{name}_scores.pt"
    assert file_sha256(path) == doc["metrics"]["scores"]["sha256"]
    return torch.load(path, weights_only=True)


def _ap(scores: list[float], positives: list[bool]) -> float:
    """Average precision of one class by its definition (mean over positives of the precision
    at their rank), a tied negative ranked before the positive (ties count against the model)."""
    hits, total = 0, 0.0
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], positives[i]))
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            total += hits / rank
    return total / hits


def _correct_at(row: list[float], true: int, k: int) -> bool:
    better = sum(1 for j, v in enumerate(row) if j != true and v >= row[true])
    return better < k


def _model_logits(cfg, ckpt: Path, batch) -> torch.Tensor:
    """The finetuned classifier rebuilt from its checkpoint, on one batch of the eval loader."""
    from megavid.data.transforms import normalize_clip
    from megavid.engine.checkpoint import load_model_state
    from megavid.tasks.classification import ClassificationTask

    task = ClassificationTask(cfg)
    task.setup(torch.device("cpu"), torch.float32, 0, 1)
    model = task.build_model()
    model.load_state_dict(load_model_state(ckpt), strict=True)
    model.eval()
    with torch.no_grad():
        return model(normalize_clip(batch["video"], torch.device("cpu"), torch.float32)).float()


def test_finetune_multilabel_charades_ego_csv(downstream_root, base_args, tmp_path):
    """Charades-Ego layout: the 'actions' column lists class ids with times (here the clip's
    colour and direction as two actions), the class list maps ids to names; make-shards reads
    the labels into the samples and finetune-cls reports mAP over the 12 classes."""
    from megavid.shards.ingest.labels import read_label_file

    ce = tmp_path / "charades_ego"
    (ce / "CharadesEgo").mkdir(parents=True)
    names = COLOURS + DIRECTIONS
    (ce / "CharadesEgo" / "Charades_v1_classes.txt").write_text(
        "".join(f"c{i:03d} {n}\n" for i, n in enumerate(names)))
    expected: dict[str, set[int]] = {}
    for split, n in (("train", 64), ("val", 32)):
        rows = []
        for m in _metas(downstream_root, split)[:n]:
            a = m["attributes"]
            col, dirn = COLOURS.index(a["colour"]), 8 + DIRECTIONS.index(a["direction"])
            expected[m["key"]] = {col, dirn}
            rows.append({"id": m["key"], "subject": "S01", "scene": "Kitchen", "quality": "6",
                         "relevance": "7", "verified": "Yes", "script": m["captions"][0],
                         "objects": "shape;screen", "descriptions": m["captions"][1],
                         "actions": f"c{dirn:03d} 0.00 1.00;c{col:03d} 0.10 0.90", "length": "1",
                         "egocentric": "Yes", "charades_video": m["key"].upper()})
        ann = ce / "CharadesEgo" / f"CharadesEgo_v1_{split}_only1st.csv"
        with open(ann, "w", newline="") as f:
            w = csv.DictWriter(f, CHARADES_COLS)
            w.writeheader()
            w.writerows(rows)
        _make_shards(downstream_root / "raw" / split, ann, ce / "shards" / split, "charades_ego")

    # the label-file route reads the same CSV through the same reader: the same labels
    by_file = read_label_file(ce / "CharadesEgo" / "CharadesEgo_v1_val_only1st.csv")
    assert {k: set(v) for k, v in by_file.items() if k in expected} == \
        {k: v for k, v in expected.items() if k in by_file}

    args = base_args + [f"data.root={ce}", "run.name=ft_charades", "task=cls_charades_ego",
                        "train.max_steps=4", "optim.lr=5e-4", "eval.split=val"]
    cfg, doc, ckpt = _finetune_cls(args)
    m = doc["metrics"]
    assert m["labels"] == {"classes": names, "multilabel": True} and m["num_samples"] == 32

    saved = _scores(cfg.run_dir, doc, "cls_val")
    keys, scores, targets = saved["keys"], saved["scores"], saved["targets"]
    assert sorted(keys) == sorted(k for k in expected if k.startswith("val_"))
    # targets: the hand-built multi-hot rows of the CSV
    for k, row in zip(keys, targets.tolist()):
        assert {j for j, v in enumerate(row) if v == 1.0} == expected[k]
    # mAP by hand over the classes that have a positive (Charades' convention)
    aps = []
    for c in range(len(names)):
        pos = [c in expected[k] for k in keys]
        if any(pos):
            aps.append(_ap(scores[:, c].tolist(), pos))
    assert m["metrics"]["num_classes"] == len(aps)
    assert m["metrics"]["mAP"] == pytest.approx(100 * sum(aps) / len(aps), abs=1e-9)
    # chance: the positive rate per class, as a random ranking's AP
    assert m["chance"]["mAP"] == pytest.approx(
        100 * np.mean([np.mean([c in expected[k] for k in keys]) for c in range(len(names))
                       if any(c in expected[k] for k in keys)]), abs=1e-9)

    # the saved scores are the model's outputs for those clips
    from megavid.tasks.base import VideoTextTask

    batch = next(iter(VideoTextTask(cfg).build_eval_loader("val")))
    logits = _model_logits(cfg, ckpt, batch)
    rows = [keys.index(k) for k in batch["keys"]]
    torch.testing.assert_close(scores[rows], logits, rtol=1e-4, atol=1e-5)


def test_finetune_path_label_list(downstream_root, base_args, tmp_path):
    """A generic `path,label` list (paths relative to the video folder, labels as names):
    make-shards' classification reader writes 'label', finetune-cls reports top-1/top-4."""

    root = tmp_path / "pathlabel"
    truth: dict[str, int] = {}
    for split, n in (("train", 64), ("val", 32)):
        lines = ["path,label"]
        for m in _metas(downstream_root, split)[:n]:
            lines.append(f"{split}/{Path(m['source']).name},{m['attributes']['direction']}")
            truth[m["key"]] = DIRECTIONS.index(m["attributes"]["direction"])
        ann = root / f"{split}.csv"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text("\n".join(lines) + "\n")
        _make_shards(downstream_root / "raw", ann, root / "shards" / split, "classification")

    args = base_args + [f"data.root={root}", "run.name=ft_list", "task=finetune_cls",
                        f"task.cls.classes=[{','.join(DIRECTIONS)}]", "train.max_steps=4",
                        "optim.lr=5e-4", "eval.split=val"]
    cfg, doc, ckpt = _finetune_cls(args)
    m = doc["metrics"]
    assert m["num_samples"] == 32 and m["labels"]["classes"] == DIRECTIONS
    assert m["train"]["step"] == 4
    # the loss was logged per step by the engine (the one Trainer loop, not a copy)
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in x for x in lines) >= 1

    saved = _scores(cfg.run_dir, doc, "cls_val")
    keys, scores = saved["keys"], saved["scores"].tolist()
    # make-shards keys a listed file by its path: val/val_000003.webm -> val_val_000003
    clip = {k: k.split("_", 1)[1] for k in keys}
    assert saved["targets"].tolist() == [truth[clip[k]] for k in keys]
    for k_top in (1, 4):
        hits = [_correct_at(row, truth[clip[k]], k_top) for k, row in zip(keys, scores)]
        assert m["metrics"][f"top{k_top}"] == pytest.approx(100 * sum(hits) / len(hits), abs=1e-9)
    assert m["metrics"]["top4"] == 100.0


def _ek100_files(downstream_root: Path, root: Path) -> tuple[list[dict], list[int], np.ndarray]:
    """EK-100's retrieval_annotations over the test clips: the narrations CSV (rows in an order
    unrelated to the clips'), the sentence CSV and the relevancy pickle [videos, sentences]."""
    ann = root / "epic-kitchens-100-annotations" / "retrieval_annotations"
    (ann / "relevancy").mkdir(parents=True)
    metas = _metas(downstream_root, "test")[:32]
    order = [i for r in range(4) for i in range(r, len(metas), 4)]  # by direction, not by group
    rows = []
    for uid, i in enumerate(order):
        m = metas[i]
        rows.append({"uid": 4972 + uid, "narration_id": f"P01_{m['key'][-3:]}_{uid}",
                     "participant_id": "P01", "video_id": m["key"],
                     "narration_timestamp": "00:00:00.500", "start_timestamp": "00:00:00.00",
                     "stop_timestamp": "00:00:01.00", "start_frame": 1, "stop_frame": 8,
                     "narration": m["captions"][0], "verb": "move", "verb_class": 5,
                     "noun": m["attributes"]["shape"], "noun_class": 7,
                     "all_nouns": f"['{m['attributes']['shape']}']", "all_noun_classes": "[7]"})
    with open(ann / "EPIC_100_retrieval_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, EK100_COLS)
        w.writeheader()
        w.writerows(rows)
    # sentences: the first caption of every other narration row (fewer texts than videos)
    sent = list(range(0, len(rows), 2))
    with open(ann / "EPIC_100_retrieval_test_sentence.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "sentence"])
        w.writerows([[rows[j]["narration_id"], rows[j]["narration"]] for j in sent])
    # graded relevance of video v to sentence t: the share of attributes they have in common
    attrs = [metas[i]["attributes"] for i in order]
    rel = np.array([[sum(attrs[v][a] == attrs[t][a] for a in attrs[v]) / 4 for t in sent]
                    for v in range(len(rows))], dtype=np.float64)
    with open(ann / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.pkl", "wb") as f:
        pickle.dump(rel, f)
    return rows, sent, rel


def _mir_by_hand(sim_TV: torch.Tensor, rel_TV: np.ndarray) -> tuple[float, float]:
    """EK-100's mAP (items of relevance 1 are the ones to find; partial relevances add to the
    precision numerator) and nDCG (linear gains, k = the query's number of relevant items),
    texts to videos, ties against the model."""
    aps, ndcgs = [], []
    for t in range(sim_TV.shape[0]):
        s, r = sim_TV[t].tolist(), rel_TV[t].tolist()
        order = sorted(range(len(s)), key=lambda v: (-s[v], r[v]))
        found, total = 0, 0.0
        for rank, v in enumerate(order, start=1):
            if r[v] == 1.0:
                found += 1
                total += sum(r[u] for u in order[:rank]) / rank
        if found:
            aps.append(total / found)
        k = sum(x > 0 for x in r)
        if k == 0:  # no relevant item: excluded, as EK-100's matrix has none such
            continue
        dcg = sum(r[v] / np.log2(i + 2) for i, v in enumerate(order[:k]))
        ideal = sorted(r, reverse=True)
        ndcgs.append(dcg / sum(ideal[i] / np.log2(i + 2) for i in range(k)))
    return 100 * float(np.mean(aps)), 100 * float(np.mean(ndcgs))


def test_ek100_mir_released_layout(downstream_root, base_args, pretrained, tmp_path, capsys):
    """EK-100 MIR with task=ek100_mir: its paths, relative to data.root, name the released
    files; shards made from the narrations CSV; rows matched to samples by narration_id."""
    from megavid.engine.checkpoint import find_checkpoint
    from megavid.eval.results import file_sha256
    from megavid.tasks.features import load_features

    root = tmp_path / "ek100"
    rows, sent, rel = _ek100_files(downstream_root, root)
    ann = root / "epic-kitchens-100-annotations" / "retrieval_annotations"
    _make_shards(downstream_root / "raw" / "test", ann / "EPIC_100_retrieval_test.csv",
                 root / "shards" / "test", "epic_kitchens")
    ckpt = find_checkpoint(pretrained)
    args = base_args + [f"data.root={root}", "run.name=ek100", "task=ek100_mir", "eval.split=test",
                        f"eval.checkpoint={ckpt}"]
    assert main(["eval-egocentric", *args]) == 0
    cfg = compose(args)
    doc = _doc(cfg.run_dir / "eval" / "egocentric_test_step24.json")
    assert doc["checkpoint"]["sha256"] == file_sha256(ckpt)
    ek = doc["metrics"]["ek100_mir"]

    feats = load_features(cfg.run_dir / "features" / "test")
    assert sorted(feats["keys"]) == sorted(r["narration_id"] for r in rows)
    video = feats["video"][[feats["keys"].index(r["narration_id"]) for r in rows]]
    # the sentence of column t is the narration of row sent[t]: its text feature is that row's
    text = feats["text"][[feats["keys"].index(rows[j]["narration_id"]) for j in sent]]
    sim = text.double() @ video.double().T
    t2v_map, t2v_ndcg = _mir_by_hand(sim, rel.T)
    v2t_map, v2t_ndcg = _mir_by_hand(sim.T, rel)
    assert ek["t2v_mAP"] == pytest.approx(t2v_map, abs=1e-6)
    assert ek["v2t_mAP"] == pytest.approx(v2t_map, abs=1e-6)
    assert ek["t2v_nDCG"] == pytest.approx(t2v_ndcg, abs=1e-6)
    assert ek["nDCG"] == pytest.approx((t2v_ndcg + v2t_ndcg) / 2, abs=1e-6)

    # a narration make-shards could not make: named, not silently mis-aligned
    with open(ann / "EPIC_100_retrieval_test.csv", "a", newline="") as f:
        csv.DictWriter(f, EK100_COLS).writerow({**rows[0], "uid": 1, "narration_id": "P09_01_1"})
    extra = np.concatenate([rel, rel[:1]])
    with open(ann / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.pkl", "wb") as f:
        pickle.dump(extra, f)
    capsys.readouterr()
    # (--overwrite: the first evaluation's results file is there)
    assert main(["eval-egocentric", *args, "--overwrite"]) == 2  # a DataError, printed as one line
    err = capsys.readouterr().err
    assert "P09_01_1" in err and "make-shards" in err


def _clip(m: dict, start: float = 0.0, end: float = 1.0) -> dict:
    """An EgoClip row as egomcq.json holds it (the synthetic clip file is the 'video')."""
    return {"video_uid": m["key"], "video_dur": 1.0, "narration_source": "narration_pass_1",
            "narration_ind": 0, "narration_time": 0.5, "clip_start": start, "clip_end": end,
            "clip_text": f"#C C {m['captions'][0]}", "tag_verb": "[0]", "tag_noun": "[1]"}


def test_egomcq_released_layout(downstream_root, base_args, pretrained, tmp_path):
    """EgoMCQ with task=egomcq on EgoVLP's egomcq.json layout: its clips become a make-shards
    annotation through the module's tool, the questions find them by key; inter (types 1) and
    intra (types 2) accuracy equal the hand count from the reloaded features."""
    from megavid.engine.checkpoint import find_checkpoint
    from megavid.tasks.egocentric import egomcq_clip_key
    from megavid.tasks.egocentric import main as egocentric_tool
    from megavid.tasks.features import load_features

    metas = _metas(downstream_root, "test")[:32]
    n_groups = len(metas) // 4
    data: dict[str, dict] = {}
    for g in range(n_groups):
        for d in range(4):
            i = 4 * g + d
            # intra: the 4 direction siblings of a group (one scene) + one clip of the next group
            sib = [4 * g + e for e in range(4)] + [4 * ((g + 1) % n_groups)]
            data[str(len(data))] = {"query": _clip(metas[i]), "answer": d, "types": 2,
                                    "choices": {str(c): _clip(metas[j]) for c, j in enumerate(sib)}}
            # inter: the clip among 4 clips of other groups, answer in the middle
            others = [4 * ((g + s) % n_groups) + (d + s) % 4 for s in range(1, 5)]
            pick = others[:2] + [i] + others[2:]
            data[str(len(data))] = {"query": _clip(metas[i]), "answer": 2, "types": 1,
                                    "choices": {str(c): _clip(metas[j]) for c, j in enumerate(pick)}}
    root = tmp_path / "ego4d"
    root.mkdir()
    (root / "egomcq.json").write_text(json.dumps(data))
    assert egocentric_tool(["egomcq-clips", str(root / "egomcq.json"), str(root / "clips.jsonl")]) == 0
    clips = [json.loads(x) for x in (root / "clips.jsonl").read_text().splitlines()]
    # EgoClip's "#C" marker is dropped ("#C C opens" -> "C opens"), as make-shards' egoclip does
    assert len(clips) == len(metas) and clips[0]["caption"] == "C " + metas[0]["captions"][0]
    _make_shards(downstream_root / "raw" / "test", root / "clips.jsonl", root / "shards" / "egomcq", "jsonl")

    ckpt = find_checkpoint(pretrained)
    args = base_args + [f"data.root={root}", "run.name=egomcq", "task=egomcq",
                        "eval.split=egomcq", f"eval.checkpoint={ckpt}"]
    assert main(["eval-egocentric", *args]) == 0
    cfg = compose(args)
    mcq = _doc(cfg.run_dir / "eval" / "egocentric_egomcq_step24.json")["metrics"]["egomcq"]

    feats = load_features(cfg.run_dir / "features" / "egomcq")
    row = {k: i for i, k in enumerate(feats["keys"])}
    assert set(row) == {egomcq_clip_key(_clip(m)) for m in metas}
    for kind, code in (("inter", 1), ("intra", 2)):
        hits = []
        for q in (q for q in data.values() if q["types"] == code):
            # the query is the answer clip's caption without "#C ", which is that sample's text
            t = feats["text"][row[egomcq_clip_key(q["query"])]].double()
            s = [float(t @ feats["video"][row[egomcq_clip_key(c)]].double())
                 for c in q["choices"].values()]
            hits.append(_correct_at(s, q["answer"], 1))
        assert mcq[f"{kind}_acc"] == pytest.approx(100 * sum(hits) / len(hits), abs=1e-9)
        assert mcq[f"num_{kind}"] == len(hits)
    assert mcq["chance"] == 20.0
