"""The video QA releases through ``megavid make-shards``, each from a small hand-written file in
its released layout (MSRVTT-QA ``train_qa.json`` with integer video ids, MSVD-QA ``*_qa.json`` +
``youtube_mapping.txt``, ActivityNet-QA ``train_q.json`` + ``train_a.json``) and real mp4 files
copied to the released video names. The shards are read back with Python's tarfile and
compared with the samples written out by hand; entries lacking a field are counted and named."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from megavid import cli
from megavid.errors import DataError
from megavid.shards.ingest.annotations import detect_format, read_annotations

CLIPS = ("carphone_pristine.mp4", "carphone_distorted.mp4")  # two small real h264 files


def _videos(videos_dir: Path, root: Path, names: list[str]) -> Path:
    """Copies of the real clips under the released names (relative paths under ``root``)."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(videos_dir / CLIPS[i % len(CLIPS)], root / name)
    return root


def _make_shards(videos: Path, annotations: Path, out: Path, *extra: str) -> dict:
    rc = cli.main(["make-shards", "--videos", str(videos), "--annotations", str(annotations),
                   "--out", str(out), "--workers", "1", "--quiet", *extra])
    assert rc == 0
    return json.loads((out / "make_shards.json").read_text())["summary"]


def _tar_samples(out: Path) -> dict[str, dict]:
    """Every sample JSON of the shards, by key, read with tarfile (not megavid's reader)."""
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    samples[meta["key"]] = meta
    return samples


def _failed(summary: dict) -> list[tuple[str, str]]:
    return sorted((f["reason"], f["source"]) for f in summary["failed"])


def test_msrvtt_qa_integer_ids_types_and_qids(videos_dir, tmp_path):
    videos = _videos(videos_dir, tmp_path / "MSRVTT", ["TrainValVideo/video0.mp4",
                                                      "TrainValVideo/video1.mp4",
                                                      "TestVideo/video7010.mp4"])
    entries = [  # the release's field order; category_id 0..4 = what/who/how/when/where
        {"answer": "car", "category_id": 0, "id": 0, "question": "what is being driven?", "video_id": 0},
        {"answer": "man", "category_id": 1, "id": 1, "question": "who is talking?", "video_id": 0},
        {"answer": "two", "category_id": 2, "id": 2, "question": "how many people are there?",
         "video_id": 1},
        {"answer": "night", "category_id": 3, "id": 3, "question": "when does he drive?", "video_id": 1},
        {"answer": "road", "category_id": 4, "id": 4, "question": "where is the car?", "video_id": 7010},
        {"category_id": 0, "id": 5, "question": "what has no answer?", "video_id": 1},
        {"answer": "phone", "category_id": 0, "id": 6, "question": "what is he holding?"},
    ]
    ann = tmp_path / "train_qa.json"
    ann.write_text(json.dumps(entries))
    assert detect_format(ann) == "msrvtt_qa"
    out = tmp_path / "shards"
    s = _make_shards(videos, ann, out)
    assert s["failures"] == {"missing_field": 2}  # no missing_file: video<N> names resolve
    assert (s["count"], s["successes"]) == (5, 3)
    assert _failed(s) == [("missing_field", "train_qa.json[5] (id 5): no 'answer'"),
                          ("missing_field", "train_qa.json[6] (id 6): no 'video_id'")]
    samples = _tar_samples(out)
    assert {k: m["qa"] for k, m in samples.items()} == {
        "video0": [{"question": "what is being driven?", "answer": "car", "type": "what", "qid": 0},
                   {"question": "who is talking?", "answer": "man", "type": "who", "qid": 1}],
        "video1": [{"question": "how many people are there?", "answer": "two", "type": "how", "qid": 2},
                   {"question": "when does he drive?", "answer": "night", "type": "when", "qid": 3}],
        "video7010": [{"question": "where is the car?", "answer": "road", "type": "where", "qid": 4}],
    }
    assert samples["video0"]["captions"] == ["what is being driven? car", "who is talking? man"]
    assert samples["video7010"]["source"] == str(videos / "TestVideo" / "video7010.mp4")


def test_msrvtt_qa_path_template(tmp_path):
    ann = tmp_path / "test_qa.json"
    ann.write_text(json.dumps([{"answer": "a", "category_id": 1, "id": 9, "question": "who?",
                                "video_id": 12}]))
    (rec,) = read_annotations(ann, "msrvtt_qa", path_template="clips/msrvtt_{video_id}.mp4")
    assert rec.video == "clips/msrvtt_12.mp4" and rec.extra["qa"][0]["qid"] == 9
    with pytest.raises(DataError, match=r"names 'vid'"):
        read_annotations(ann, "msrvtt_qa", path_template="{vid}.mp4")


def test_msvd_qa_through_youtube_mapping(videos_dir, tmp_path):
    videos = _videos(videos_dir, tmp_path / "YouTubeClips", ["-4wsuPCjDBc_5_15.mp4",
                                                            "-7KMZQEsJW4_205_208.mp4"])
    release = tmp_path / "MSVD-QA"
    release.mkdir()
    entries = [  # MSVD-QA has no category field: the question word is the type
        {"answer": "man", "id": 30933, "question": "who is opening a box?", "video_id": 1},
        {"answer": "box", "id": 30934, "question": "what is a man opening?", "video_id": 1},
        {"answer": "two", "id": 30935, "question": "how many men are dancing?", "video_id": 2},
        {"answer": "dance", "id": 30936, "question": "does anyone dance?", "video_id": 2},
        {"answer": "cat", "id": 30937, "question": "what sleeps?", "video_id": 3},
        {"answer": "dog", "id": 30938, "question": "", "video_id": 2},
    ]
    ann = release / "test_qa.json"
    ann.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="youtube_mapping.txt"):
        read_annotations(ann, "msvd_qa")
    assert detect_format(ann) == "qa"  # without the mapping the file is not told apart
    (release / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n"
                                                 "-8y1Q0rA3n8_108_115 vid3\n")
    assert detect_format(ann) == "msvd_qa"
    out = tmp_path / "shards"
    s = _make_shards(videos, ann, out)
    # vid3 is in the mapping but its clip is not in the folder: a missing file, counted
    assert s["failures"] == {"missing_field": 1, "missing_file": 1}
    assert ("missing_field", "test_qa.json[5] (id 30938): no 'question'") in _failed(s)
    samples = _tar_samples(out)
    assert {k: [(q["qid"], q["type"], q["answer"]) for q in m["qa"]] for k, m in samples.items()} == {
        "-4wsuPCjDBc_5_15": [(30933, "who", "man"), (30934, "what", "box")],
        "-7KMZQEsJW4_205_208": [(30935, "how", "two"), (30936, "other", "dance")],
    }
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")
    (bad / "val_qa.json").write_text(json.dumps([{"answer": "x", "id": 1, "question": "who?",
                                                  "video_id": 4}]))
    (rec,) = read_annotations(bad / "val_qa.json", "msvd_qa")
    assert (rec.error, rec.video) == ("unmapped_video", "vid4")
    (bad / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15,vid1\n")
    with pytest.raises(DataError, match=r"youtube_mapping.txt:1: expected '<youtube clip name> vid<N>'"):
        read_annotations(bad / "val_qa.json", "msvd_qa")


def test_activitynet_qa_two_files_joined_by_question_id(videos_dir, tmp_path):
    videos = _videos(videos_dir, tmp_path / "videos", ["v_1QIUV7WYKXg.mp4", "v_9eniCub7u60.mp4"])
    data = tmp_path / "dataset"
    data.mkdir()
    questions = [
        {"video_name": "1QIUV7WYKXg", "question": "is the athlete wearing trousers",
         "question_id": "v_1QIUV7WYKXg_3"},
        {"video_name": "9eniCub7u60", "question": "what is the color of the girl's clothes",
         "question_id": "v_9eniCub7u60_2"},
        {"video_name": "1QIUV7WYKXg", "question": "what does the athlete do after running",
         "question_id": "v_1QIUV7WYKXg_5"},
        {"video_name": "9eniCub7u60", "question": "how many people are there",
         "question_id": "v_9eniCub7u60_7"},
    ]
    answers = [  # another order than the questions; one answer's question is not in the file
        {"answer": "black", "type": 4, "question_id": "v_9eniCub7u60_2"},
        {"answer": "no", "type": 3, "question_id": "v_1QIUV7WYKXg_3"},
        {"answer": "jump", "type": 2, "question_id": "v_1QIUV7WYKXg_5"},
        {"answer": "yes", "type": 3, "question_id": "v_zzzzzzzzzzz_1"},
    ]
    (data / "train_q.json").write_text(json.dumps(questions))
    (data / "train_a.json").write_text(json.dumps(answers))
    assert detect_format(data / "train_q.json") == detect_format(data / "train_a.json") == "activitynet_qa"
    # either file or the common prefix names the pair
    by_q = read_annotations(data / "train_q.json")
    assert by_q == read_annotations(data / "train_a.json") == read_annotations(data / "train", "activitynet_qa")
    out = tmp_path / "shards"
    s = _make_shards(videos, data / "train", out, "--format", "activitynet_qa")
    assert (s["successes"], s["failures"]) == (2, {"missing_field": 2})
    assert _failed(s) == [
        ("missing_field", "train_a.json[3] (question_id v_zzzzzzzzzzz_1): no 'question'"),
        ("missing_field", "train_q.json[3] (question_id v_9eniCub7u60_7): no 'answer'")]
    samples = _tar_samples(out)
    assert {k: [(q["qid"], q["type"], q["answer"]) for q in m["qa"]] for k, m in samples.items()} == {
        "v_1QIUV7WYKXg": [("v_1QIUV7WYKXg_3", "yes_no", "no"), ("v_1QIUV7WYKXg_5", "temporal_relation", "jump")],
        "v_9eniCub7u60": [("v_9eniCub7u60_2", "color", "black")],
    }
    assert samples["v_9eniCub7u60"]["captions"] == ["what is the color of the girl's clothes? black"]
