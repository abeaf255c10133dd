"""make-shards on the retrieval datasets' files in the layouts they are released in: MSR-VTT's
``MSRVTT_data.json`` with the 9k and 1k-A (JSFUSION) split files, WebVid's ``results_*.csv``,
entries missing a field (counted and named, never dropped), unknown splits, and
``--path-template`` accepted or refused per format.

The annotation files are small hand-written copies of the released layouts (the column and key
names of CLIP4Clip's ``msrvtt_data.zip`` and WebVid's CSVs); the videos are the real mp4 files
of the ``videos_dir`` fixture under the released file names. The shards are read back with
Python's ``tarfile``, not with megavid's own reader."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from megavid import cli

# MSR-VTT as released (keys, and the "split" values train / validate / test)
MSRVTT_JSON = {
    "info": {"year": "2016", "version": "1.0"},
    "videos": [
        {"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "video_id": "video0",
         "start time": 137.72, "end time": 149.44, "split": "train", "id": 0},
        {"category": 16, "url": "https://www.youtube.com/watch?v=w4JM08PDEng", "video_id": "video1",
         "start time": 184.33, "end time": 206.89, "split": "train", "id": 1},
        {"category": 9, "url": "https://www.youtube.com/watch?v=QA7KVQq9vKA", "video_id": "video2",
         "start time": 31.17, "end time": 41.24, "split": "validate", "id": 2},
        {"category": 8, "url": "https://www.youtube.com/watch?v=0F6xWmzNdDo", "video_id": "video3",
         "start time": 56.0, "end time": 70.0, "split": "test", "id": 3},
        {"category": 3, "url": "https://www.youtube.com/watch?v=Lp7E973zozc", "video_id": "video4",
         "start time": 12.5, "end time": 25.0, "split": "test", "id": 4},
    ],
    "sentences": [
        {"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
        {"caption": "a man talks on the phone in a car", "video_id": "video1", "sen_id": 1},
        {"caption": "a red car drives on a road", "video_id": "video0", "sen_id": 2},
        {"caption": "a blurry man in a car", "video_id": "video2", "sen_id": 3},
        {"caption": "people ride bikes", "video_id": "video3", "sen_id": 4},
        {"caption": "a driver speaks", "video_id": "video1", "sen_id": 5},
        {"caption": "a blurry driver in a car", "video_id": "video4", "sen_id": 6},
    ],
}
# the source file behind each released name (real mp4 files of the videos_dir fixture)
SOURCES = {"video0": "carphone_pristine.mp4", "video1": "carphone_distorted.mp4",
           "video2": "carphone_distorted.mp4", "video3": "carphone_pristine.mp4",
           "video4": "carphone_distorted.mp4"}


def _link_videos(videos_dir: Path, folder: Path, names: dict[str, str]) -> Path:
    """``folder/<name>`` -> the fixture video ``names[name]`` (released file names, real files)."""
    for name, src in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(videos_dir / src, folder / name)
    return folder


def _shard_samples(out: Path) -> list[tuple[str, dict, bytes]]:
    """(key, sample JSON, video bytes) of every sample of the shard folder, read with tarfile
    alone (a tar's members are sorted by name: the samples come in key order)."""
    samples: dict[str, dict] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    return [(k, json.loads(v["json"]), v.get("mp4", b"")) for k, v in samples.items()]


def _make_shards(*args: str) -> int:
    return cli.main(["make-shards", "--workers", "1", "--quiet", *[str(a) for a in args]])


def _failed(out: Path) -> list[tuple[str, str]]:
    return [(f["reason"], f["source"]) for f in
            json.loads((out / "make_shards.json").read_text())["summary"]["failed"]]


@pytest.fixture
def msrvtt(videos_dir, tmp_path) -> Path:
    """An MSR-VTT folder as released: MSRVTT_data.json, the split files, videos/all/videoN.mp4."""
    root = tmp_path / "MSRVTT"
    _link_videos(videos_dir, root / "videos" / "all", {f"{v}.mp4": s for v, s in SOURCES.items()})
    (root / "MSRVTT_data.json").write_text(json.dumps(MSRVTT_JSON))
    # the 9k list (every video outside the 1k-A test): one video_id column
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo0\nvideo2\n")
    # the 1k-A test (videos of the official test split), one sentence per video
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr4,video4,a man is driving a car\n"
        "ret1,msr3,video3,a group of people on bicycles\n")
    return root


def test_msrvtt_9k_train_keeps_the_listed_videos_with_all_json_sentences(msrvtt, videos_dir, tmp_path):
    out = tmp_path / "train_9k"
    assert _make_shards("--format", "msrvtt", "--videos", msrvtt / "videos" / "all",
                        "--annotations", msrvtt / "MSRVTT_data.json",
                        "--split-file", msrvtt / "MSRVTT_train.9k.csv", "--out", out) == 0
    got = _shard_samples(out)
    # the listed videos, each with every sentence of the json in file order
    assert [(k, m["captions"], m["split"]) for k, m, _ in got] == [
        ("video0", ["a car is shown", "a red car drives on a road"], "train"),
        ("video1", ["a man talks on the phone in a car", "a driver speaks"], "train"),
        ("video2", ["a blurry man in a car"], "validate"),
    ]
    for key, _, video in got:  # --codec keep: the released file's own bytes
        assert video == (videos_dir / SOURCES[key]).read_bytes()
    assert _failed(out) == []


def test_msrvtt_1ka_test_is_the_jsfusion_sentence_with_or_without_the_json(msrvtt, tmp_path):
    alone, with_json = tmp_path / "alone", tmp_path / "with_json"
    assert _make_shards("--format", "msrvtt", "--videos", msrvtt / "videos" / "all",
                        "--annotations", msrvtt / "MSRVTT_JSFUSION_test.csv", "--out", alone) == 0
    assert _make_shards("--format", "msrvtt", "--videos", msrvtt / "videos" / "all",
                        "--annotations", msrvtt / "MSRVTT_data.json",
                        "--split-file", msrvtt / "MSRVTT_JSFUSION_test.csv", "--out", with_json) == 0
    got = _shard_samples(alone)
    # one query per video: the csv's sentence, not the json's sentences of that video
    assert [(k, m["captions"]) for k, m, _ in got] == [
        ("video3", ["a group of people on bicycles"]), ("video4", ["a man is driving a car"])]
    assert ({p.name: p.read_bytes() for p in alone.glob("*.tar")}
            == {p.name: p.read_bytes() for p in with_json.glob("*.tar")})
    # auto-detected from the released header too
    assert _make_shards("--videos", msrvtt / "videos" / "all", "--annotations",
                        msrvtt / "MSRVTT_JSFUSION_test.csv", "--out", tmp_path / "auto") == 0
    assert [k for k, _, _ in _shard_samples(tmp_path / "auto")] == ["video3", "video4"]


def test_msrvtt_split_file_mistakes_are_one_line_errors(msrvtt, tmp_path, capsys):
    videos = msrvtt / "videos" / "all"
    bad = tmp_path / "MSRVTT_train.7k.csv"
    bad.write_text("video_id\nvideo0\nvideo77\n")
    cases = [
        (["--annotations", msrvtt / "MSRVTT_train.9k.csv", "--format", "msrvtt"],
         "lists videos only; pass --annotations MSRVTT_data.json --split-file MSRVTT_train.9k.csv"),
        (["--annotations", msrvtt / "MSRVTT_data.json", "--format", "msrvtt", "--split-file", bad],
         "names videos that MSRVTT_data.json does not have (video77)"),
        (["--annotations", msrvtt / "MSRVTT_data.json", "--format", "msrvtt", "--split", "train",
          "--split-file", msrvtt / "MSRVTT_train.9k.csv"], "pass --split or --split-file"),
        (["--annotations", msrvtt / "MSRVTT_JSFUSION_test.csv", "--format", "csv",
          "--split-file", msrvtt / "MSRVTT_train.9k.csv"], "--split-file does not apply to --format csv"),
    ]
    for i, (args, message) in enumerate(cases):
        assert _make_shards("--videos", videos, "--out", tmp_path / f"o{i}", *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"o{i}").exists()


def test_msrvtt_unknown_split_lists_the_splits_present(msrvtt, tmp_path, capsys):
    assert _make_shards("--format", "msrvtt", "--videos", msrvtt / "videos" / "all", "--annotations",
                        msrvtt / "MSRVTT_data.json", "--split", "val", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no split 'val' (its splits: test, train, validate); pass one of them "
                        "to --split") and len(err.splitlines()) == 1
    # the official split by name
    assert _make_shards("--format", "msrvtt", "--videos", msrvtt / "videos" / "all", "--annotations",
                        msrvtt / "MSRVTT_data.json", "--split", "validate", "--out", tmp_path / "val") == 0
    assert [(k, m["captions"]) for k, m, _ in _shard_samples(tmp_path / "val")] == [
        ("video2", ["a blurry man in a car"])]
    # QuerYD: the splits are the <split>_list.txt files beside the captions
    q = tmp_path / "queryd"
    q.mkdir()
    (q / "raw_captions_combined_filtered-v2.pkl").write_bytes(pickle.dumps({"video-a": [["a", "car"]]}))
    (q / "train_list.txt").write_text("video-a\n")
    (q / "test_list.txt").write_text("video-b\n")
    assert _make_shards("--videos", msrvtt, "--annotations", q / "raw_captions_combined_filtered-v2.pkl",
                        "--split", "val", "--out", tmp_path / "q") == 2
    err = capsys.readouterr().err.strip()
    assert "QuerYD has no split 'val'" in err and "(no val_list.txt; splits there: test, train)" in err


def test_missing_fields_are_counted_and_named(msrvtt, videos_dir, tmp_path, capsys):
    """An MSR-VTT sentence without 'caption' or 'video_id', a video left without sentences, a
    csv row with an empty caption, a JSONL entry without one: each a counted failure whose
    source names the entry and the field; the rest of the entry's video is still written."""
    data = json.loads(json.dumps(MSRVTT_JSON))
    data["sentences"] += [{"video_id": "video1", "sen_id": 7},  # no caption
                          {"caption": "orphan sentence", "sen_id": 8},  # no video_id
                          {"caption": "   ", "video_id": "video0", "sen_id": 9}]
    data["sentences"] = [s for s in data["sentences"] if s["sen_id"] != 3]  # video2: no sentence left
    ann = tmp_path / "MSRVTT_data.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "all"
    assert cli.main(["make-shards", "--workers", "1", "--format", "msrvtt", "--videos",
                     str(msrvtt / "videos" / "all"), "--annotations", str(ann), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [(k, m["captions"]) for k, m, _ in _shard_samples(out)] == [
        ("video0", ["a car is shown", "a red car drives on a road"]),
        ("video1", ["a man talks on the phone in a car", "a driver speaks"]),
        ("video3", ["people ride bikes"]), ("video4", ["a blurry driver in a car"])]
    assert sorted(_failed(out)) == [
        ("missing_field", "MSRVTT_data.json sentences[6] (sen_id 7, video1): no 'caption'"),
        ("missing_field", "MSRVTT_data.json sentences[7] (sen_id 8): no 'video_id'"),
        ("missing_field", "MSRVTT_data.json sentences[8] (sen_id 9, video0): empty 'caption'"),
        ("no_caption", "MSRVTT_data.json video video2: no 'caption'"),
    ]
    assert "failed missing_field: 3: MSRVTT_data.json sentences[6] (sen_id 7, video1): no 'caption'" in printed
    summary = json.loads((out / "make_shards.json").read_text())["summary"]
    assert (summary["count"], summary["successes"]) == (8, 4)

    # generic inputs: a csv row with an empty caption, a JSONL entry without one
    csv_ann = tmp_path / "a.csv"
    csv_ann.write_text("video,caption\ncarphone_pristine.mp4,a man on the phone\nbikes.mp4,\n,no video\n")
    assert _make_shards("--videos", videos_dir, "--annotations", csv_ann, "--out", tmp_path / "c") == 0
    assert sorted(_failed(tmp_path / "c")) == [("missing_field", "a.csv:4: no 'video'"),
                                               ("no_caption", "a.csv:3 (bikes.mp4): empty 'caption'")]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"video": "bikes.mp4", "key": "b1", "captoin": "typo"}\n'
                     '{"video": "carphone_pristine.mp4", "caption": "a man"}\n')
    assert _make_shards("--videos", videos_dir, "--annotations", jsonl, "--out", tmp_path / "j") == 0
    assert _failed(tmp_path / "j") == [("no_caption", "a.jsonl:1 (b1): no 'caption'")]


def test_webvid_released_csv_read_unchanged(videos_dir, tmp_path):
    """results_*.csv as released; each video at {page_dir}/{videoid}.mp4 under --videos (a
    different file with the same id elsewhere in the tree is not the one taken)."""
    vids = _link_videos(videos_dir, tmp_path / "webvid", {
        "006001_006050/1066674784.mp4": "carphone_pristine.mp4",
        "013401_013450/21179416.mp4": "carphone_distorted.mp4",
        "other/1066674784.mp4": "bikes.mp4",
    })
    ann = tmp_path / "results_2M_val.csv"
    ann.write_text("videoid,contentUrl,duration,page_dir,name\n"
                   "1066674784,https://ak.picdn.net/shutterstock/videos/1066674784/preview/stock-footage.mp4,"
                   "PT00H00M30S,006001_006050,\"Man talking on the phone, close up\"\n"
                   "21179416,https://ak.picdn.net/x.mp4,PT00H00M23S,013401_013450,Blurry driver in a car\n"
                   "31353427,https://ak.picdn.net/y.mp4,PT00H00M10S,,Tourists walk near a church\n")
    out = tmp_path / "o"
    assert _make_shards("--format", "webvid", "--videos", vids, "--annotations", ann, "--out", out) == 0
    got = _shard_samples(out)
    assert [(k, m["captions"]) for k, m, _ in got] == [
        ("1066674784", ["Man talking on the phone, close up"]), ("21179416", ["Blurry driver in a car"])]
    assert got[0][2] == (videos_dir / "carphone_pristine.mp4").read_bytes()
    assert got[1][2] == (videos_dir / "carphone_distorted.mp4").read_bytes()
    assert _failed(out) == [("missing_field", "results_2M_val.csv:4 (videoid 31353427): no 'page_dir'")]
    # another layout through --path-template (page_dir unused: that row is complete now)
    flat = _link_videos(videos_dir, tmp_path / "flat", {"v/1066674784.mp4": "bikes.mp4",
                                                         "v/21179416.mp4": "bikes.mp4",
                                                         "v/31353427.mp4": "bikes.mp4"})
    assert _make_shards("--format", "webvid", "--videos", flat, "--annotations", ann,
                        "--path-template", "v/{videoid}.mp4", "--out", tmp_path / "flat_out") == 0
    assert [k for k, _, _ in _shard_samples(tmp_path / "flat_out")] == ["1066674784", "21179416", "31353427"]


REFUSED = [  # (format, file name, content): formats without per-row columns
    ("msrvtt", "MSRVTT_data.json", json.dumps(MSRVTT_JSON)),
    ("didemo", "didemo.json", json.dumps([{"video": "a.mp4", "description": "x", "times": [[0, 0]]}])),
    ("activitynet", "anet.json", json.dumps({"v_a": {"duration": 3, "timestamps": [[0, 1]], "sentences": ["x"]}})),
    ("qa", "qa.json", json.dumps([{"video": "a", "question": "q?", "answer": "a"}])),
    ("classification", "trainlist01.txt", "Blurry/v_Blurry_g01_c01.mp4 1\n"),
]


@pytest.mark.parametrize("fmt, name, content", REFUSED, ids=[r[0] for r in REFUSED])
def test_path_template_is_refused_where_it_cannot_apply(fmt, name, content, videos_dir, tmp_path, capsys):
    ann = tmp_path / name
    ann.write_text(content)
    assert _make_shards("--videos", videos_dir, "--annotations", ann, "--format", fmt,
                        "--path-template", "{video}.mp4", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "--path-template" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_path_template_on_json_objects_and_dataset_csvs(videos_dir, tmp_path):
    """Entries with named fields take the template: JSONL objects (through make-shards) and
    the dataset CSVs (Epic-Kitchens' participant folders, Charades-Ego, EgoClip)."""
    from megavid.shards.ingest.annotations import detect_format, read_annotations

    vids = _link_videos(videos_dir, tmp_path / "v", {"P01/videos/P01_01.MP4": "bikes.mp4"})
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"participant": "P01", "vid": "P01_01", "caption": "c opens a door"}\n'
                     '{"participant": "", "vid": "P02_01", "caption": "c cuts"}\n')
    out = tmp_path / "o"
    assert _make_shards("--videos", vids, "--annotations", jsonl, "--out", out,
                        "--path-template", "{participant}/videos/{vid}.MP4") == 0
    ((key, meta, video),) = _shard_samples(out)
    assert (key, meta["captions"]) == ("P01_videos_P01_01", ["c opens a door"])
    assert video == (videos_dir / "bikes.mp4").read_bytes()
    assert _failed(out) == [("missing_field", "a.jsonl:2: no 'participant'")]

    ek = tmp_path / "EPIC_100_validation.csv"
    ek.write_text("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
                  "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"
                  "P01_01_0,P01,P01_01,00:00:01.00,00:00:01.00,00:00:02.00,60,120,open door,open,3,door,3,"
                  "['door'],[3]\n")
    (r,) = read_annotations(ek, path_template="{participant_id}/videos/{video_id}.MP4")
    assert (r.video, r.key) == ("P01/videos/P01_01.MP4", "P01_01_0")
    ch = tmp_path / "CharadesEgo_v1_test.csv"
    ch.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                  "005BUEGO,HR43,Kitchen,6,7,Yes,A person cooks.,food,Cooking.,c147 0.00 12.60,32.12\n")
    assert read_annotations(ch, path_template="CharadesEgo_v1/{id}.mp4")[0].video == "CharadesEgo_v1/005BUEGO.mp4"
    eg = tmp_path / "egoclip.csv"  # EgoVLP's release: tab-separated despite the name
    eg.write_text("video_uid\tnarration_ind\tclip_start\tclip_end\tclip_text\nvidA\t0\t1.0\t2.0\t#C C opens\n")
    assert detect_format(eg) == "egoclip"
    (r,) = read_annotations(eg, path_template="v2/full_scale/{video_uid}.mp4")
    assert (r.video, r.key, r.captions) == ("v2/full_scale/vidA.mp4", "vidA_0", ["C opens"])
