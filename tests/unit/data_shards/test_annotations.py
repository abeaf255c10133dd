"""Annotation readers: each format against hand-written files with known expected records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megavid.errors import DataError
from megavid.shards.format import read_index
from megavid.shards.ingest.annotations import detect_format, read_annotations
from megavid.shards.ingest.make_shards import make_shards
from megavid.shards.ingest.options import MakeShardsOptions, make_key


def _w(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_msrvtt_groups_sentences_and_filters_split(tmp_path):
    p = _w(tmp_path / "videodatainfo.json", {
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"},
                   {"video_id": "video2", "split": "test"}],
        "sentences": [{"video_id": "video1", "caption": "a dog runs", "sen_id": 0},
                      {"video_id": "video0", "caption": "a cat sits", "sen_id": 1},
                      {"video_id": "video1", "caption": "a dog is running", "sen_id": 2}],
    })
    assert detect_format(p) == "msrvtt"
    recs = read_annotations(p)
    assert [(r.video, r.captions, r.error) for r in recs] == [
        ("video0", ["a cat sits"], ""), ("video1", ["a dog runs", "a dog is running"], ""),
        ("video2", [], "no_caption")]
    assert [r.video for r in read_annotations(p, "msrvtt", split="test")] == ["video1", "video2"]


def test_didemo_paragraph_with_segments(tmp_path):
    p = _w(tmp_path / "didemo.json", [
        {"video": "v1.mp4", "description": "a man enters.", "times": [[0, 0], [0, 1]]},
        {"video": "v1.mp4", "description": "he sits down.", "times": [[2, 3]]},
        {"video": "v2.mp4", "description": 7, "times": [[1, 1]]},
    ])
    assert detect_format(p) == "didemo"
    r1, r2 = read_annotations(p)
    assert r1.captions == ["a man enters. he sits down."]
    # 5-second segments, mean over annotators: [0, 0.5] -> 0..7.5 s; [2, 3] -> 10..20 s
    assert r1.extra["segments"] == [{"start": 0.0, "end": 7.5, "caption": "a man enters."},
                                    {"start": 10.0, "end": 20.0, "caption": "he sits down."}]
    assert r2.error == "non_text_caption"


def test_activitynet_captions(tmp_path):
    p = _w(tmp_path / "anet.json", {"v_abc": {"duration": 30.0, "timestamps": [[0, 10.5], [12, 30]],
                                              "sentences": ["A woman cooks. ", "She serves."]}})
    assert detect_format(p) == "activitynet"
    (r,) = read_annotations(p)
    assert r.video == "v_abc" and r.captions == ["A woman cooks. She serves."]
    assert r.extra["segments"][1] == {"start": 12.0, "end": 30.0, "caption": "She serves."}


def test_egoclip_windows(tmp_path):
    p = _w(tmp_path / "egoclip.tsv",
           "video_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\tclip_end\tclip_text\n"
           "vidA\t100\tnarration_pass_1\t0\t1.5\t1.0\t2.0\t#C C opens the door\n"
           "vidA\t100\tnarration_pass_1\t1\t3.5\t3.0\t4.5\t#C C picks a cup\n")
    assert detect_format(p) == "egoclip"
    recs = read_annotations(p)
    assert [(r.key, r.captions, r.start, r.end) for r in recs] == [
        ("vidA_0", ["C opens the door"], 1.0, 2.0), ("vidA_1", ["C picks a cup"], 3.0, 4.5)]


def test_qa_and_jsonl_and_json_list(tmp_path):
    p = _w(tmp_path / "qa.json", [{"video_id": "v1", "question": "what is he doing?", "answer": "cooking"},
                                  {"video_id": "v1", "question": "who?", "answer": "a man", "type": "who"}])
    assert detect_format(p) == "qa"
    (r,) = read_annotations(p)
    assert [q["answer"] for q in r.extra["qa"]] == ["cooking", "a man"]
    assert r.captions == ["what is he doing? cooking", "who? a man"]

    p = _w(tmp_path / "a.jsonl", '{"video": "x.mp4", "captions": ["one", "two"], "label": 3}\n\n'
                                 '{"video": "y.mp4", "caption": "  "}\n')
    r1, r2 = read_annotations(p)
    assert r1.captions == ["one", "two"] and r1.extra == {"label": 3} and r2.error == "no_caption"
    p = _w(tmp_path / "list.json", [{"video": "x.mp4", "caption": "c", "start": 1, "end": 2}])
    assert detect_format(p) == "json"
    assert [(r.start, r.end) for r in read_annotations(p)] == [(1.0, 2.0)]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_annotations(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_annotations(_w(tmp_path / "a.xml", "<x/>"))
    with pytest.raises(DataError, match=r"a.jsonl:2 is not valid JSON"):
        read_annotations(_w(tmp_path / "a.jsonl", '{"video": "a", "caption": "b"}\n{oops\n'))
    with pytest.raises(DataError, match="not a number"):
        read_annotations(_w(tmp_path / "t.csv", "video,caption,s\na.mp4,x,soon\n"), start_col="s")
    with pytest.raises(DataError, match="not an EgoClip file"):
        read_annotations(_w(tmp_path / "e.tsv", "video\tcaption\n"), "egoclip")


def test_keys():
    assert make_key("dir/sub/clip.v2.mp4") == "dir_sub_clip_v2"
    assert make_key("clip.mp4", 1.5, 3.0) == "clip_1500_3000"
    long = make_key("x" * 200)
    assert len(long) <= 90 and long != make_key("x" * 199)


def test_egoclip_end_to_end(videos_dir, tmp_path):
    ann = _w(tmp_path / "egoclip.tsv",
             "video_uid\tnarration_ind\tclip_start\tclip_end\tclip_text\n"
             "bikes\t0\t0.5\t2.0\t#C C rides a bike\n"
             "bikes\t1\t6.0\t9.0\t#C C turns left\n")
    make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                  workers=1), quiet=True)
    entries = read_index(tmp_path / "o")
    assert [(e["key"], e["start"], e["end"], e["duration"]) for e in entries] == [
        ("bikes_0", 0.5, 2.0, 10.0), ("bikes_1", 6.0, 9.0, 10.0)]
