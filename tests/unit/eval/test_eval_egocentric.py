"""Readers of the released egocentric benchmark files (EK-100 MIR, EgoVLP's EgoMCQ), on small
files written here in those layouts."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from megavid.errors import ConfigError, DataError
from megavid.tasks.egocentric import (
    align_rows,
    egomcq_clip_annotations,
    egomcq_clip_key,
    load_egomcq,
    load_relevancy,
    read_queries,
)


def _clip(uid: str, start: float, end: float, text: str) -> dict:
    return {"video_uid": uid, "video_dur": 600.0, "narration_source": "narration_pass_1",
            "narration_ind": 3, "narration_time": (start + end) / 2, "clip_start": start,
            "clip_end": end, "clip_text": text, "tag_verb": "[3]", "tag_noun": "[10, 11]"}


def test_egomcq_released_layout_maps_choices_to_make_shards_keys(tmp_path):
    from megavid.shards.ingest.options import make_key

    uid = "0a3097fc-baed-4d11-a4c9-30f07eb91af6"
    q = _clip(uid, 12.25, 13.3, "#C C opens the drawer")
    choices = {str(i): _clip(uid, 10.0 + i, 11.0 + i, f"#C C step {i}") for i in range(5)}
    data = {"1": {"query": q, "choices": choices, "answer": 3, "types": 2},
            "0": {"query": q, "choices": {"0": q, **{str(i): choices[str(i)] for i in range(1, 5)}},
                  "answer": 0, "types": 1}}
    (tmp_path / "egomcq.json").write_text(json.dumps(data))
    items = load_egomcq(tmp_path / "egomcq.json")
    assert [it["id"] for it in items] == ["0", "1"]  # question order, not file order
    assert items[1] == {"id": "1", "query": "C opens the drawer", "answer": 3, "type": 2,
                        "choices": [make_key(uid, 10.0 + i, 11.0 + i) for i in range(5)]}
    # the key is make-shards' key of the window: video uid + start/end in milliseconds
    assert egomcq_clip_key(q) == f"{uid}_12250_13300"
    clips = egomcq_clip_annotations(tmp_path / "egomcq.json")
    assert [c["key"] for c in clips] == [egomcq_clip_key(q)] + items[1]["choices"][1:] + \
        [items[1]["choices"][0]]
    assert clips[0] == {"video": uid, "start": 12.25, "end": 13.3, "key": f"{uid}_12250_13300",
                        "caption": "C opens the drawer"}
    bad = {"0": {"query": q, "choices": choices, "answer": 1}}  # no "types"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="egomcq.json layout"):
        load_egomcq(tmp_path / "bad.json")
    # our list format is still read as is
    ours = [{"query": "a", "choices": ["k0", "k1"], "answer": 1, "type": "inter"}]
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    assert load_egomcq(tmp_path / "ours.json") == ours


def test_ek100_relevancy_pickle_sentence_csv_and_row_alignment(tmp_path):
    rel = np.array([[1.0, 0.5], [0.0, 1.0], [0.25, 0.0]])
    with open(tmp_path / "caption_relevancy_EPIC_100_retrieval_test.pkl", "wb") as f:
        pickle.dump(rel, f)
    got = load_relevancy(tmp_path / "caption_relevancy_EPIC_100_retrieval_test.pkl")
    assert got.dtype == torch.float64 and torch.equal(got, torch.from_numpy(rel))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(DataError, match="refusing to load"):
        load_relevancy(tmp_path / "evil.pkl")
    with pytest.raises(ConfigError, match="caption_relevancy"):
        load_relevancy(tmp_path / "missing.pkl")

    (tmp_path / "EPIC_100_retrieval_test_sentence.csv").write_text(
        "index,sentence\nP01_11_0,take plate\nP01_11_1,\"put down plate, then cup\"\n")
    assert read_queries(tmp_path / "EPIC_100_retrieval_test_sentence.csv") == [
        "take plate", "put down plate, then cup"]
    (tmp_path / "bad.csv").write_text("index,text\nP01_11_0,take plate\n")
    with pytest.raises(DataError, match="'sentence'"):
        read_queries(tmp_path / "bad.csv")

    keys = ["P01_11_2", "P01_11_0", "P01_11_1"]
    assert align_rows(keys, ["P01_11_0", "P01_11_1", "P01_11_2"]).tolist() == [1, 2, 0]
    with pytest.raises(DataError, match="P09_01_1"):
        align_rows(keys, ["P01_11_0", "P09_01_1"])


def test_label_files_read_by_make_shards_readers_and_found_under_data_root(tmp_path):
    """task.cls.label_file goes through megavid.shards.ingest.annotations (one parser per format), and
    relative task.cls paths are looked up under data.root before the working directory."""
    from megavid.config import compose
    from megavid.shards.ingest.labels import read_label_file
    from megavid.tasks.base import get_data_file

    (tmp_path / "list.csv").write_text("path,label\nvids/a_1.mp4,jump\nvids/b_2.mp4,run\n")
    assert read_label_file(tmp_path / "list.csv") == {
        "vids/a_1.mp4": "jump", "a_1": "jump", "vids/b_2.mp4": "run", "b_2": "run"}
    (tmp_path / "multi.csv").write_text("path,labels\nx.mp4,3;7\n")
    assert read_label_file(tmp_path / "multi.csv", multilabel=True)["x"] == [3, 7]
    (tmp_path / "ce.csv").write_text(
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
        "P1A5M,S1,Kitchen,6,7,Yes,a script,cup;table,a description,c092 11.90 21.20;c147 0.00 12.60,30\n")
    assert read_label_file(tmp_path / "ce.csv") == {"P1A5M": [92, 147]}

    cfg = compose(["data=synthetic", f"data.root={tmp_path}"])
    assert get_data_file(cfg, "list.csv", "task.cls.label_file") == tmp_path / "list.csv"
    assert get_data_file(cfg, str(tmp_path / "ce.csv"), "x") == tmp_path / "ce.csv"
    with pytest.raises(ConfigError, match="data.root"):
        get_data_file(cfg, "nowhere/file.csv", "task.cls.label_file")
