"""Dataset annotation formats (QuerYD, Condensed Movies, Epic-Kitchens-100, Charades-Ego,
classification lists) and --path-template, each on a small hand-written file in the dataset's
released layout; expected records are written out by hand."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from megavid.errors import DataError
from megavid.shards.ingest.annotations import detect_format, read_annotations


def _w(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_queryd_pickle_tokens_and_split_lists(tmp_path):
    # raw_captions_combined_filtered-v2.pkl: {video_id: [[tokens of sentence 1], [...]]}
    caps = {
        "video-4YyPMVRPsjQ": [["a", "man", "walks", "in", "."], ["he", "opens", "the", "door"]],
        "video-0aBcDeFgHiJ": [["a", "red", "car"]],
        "video-zz": [],
    }
    pkl = tmp_path / "raw_captions_combined_filtered-v2.pkl"
    pkl.write_bytes(pickle.dumps(caps))
    _w(tmp_path / "train_list.txt", "video-4YyPMVRPsjQ\nvideo-zz\n")
    assert detect_format(pkl) == "queryd"
    recs = read_annotations(pkl)
    assert [(r.video, r.captions, r.error) for r in recs] == [
        ("video-4YyPMVRPsjQ", ["a man walks in .", "he opens the door"], ""),
        ("video-0aBcDeFgHiJ", ["a red car"], ""),
        ("video-zz", [], "no_caption"),
    ]
    assert [r.video for r in read_annotations(pkl, "queryd", split="train")] == ["video-4YyPMVRPsjQ", "video-zz"]
    # the same mapping as JSON, sentences as plain strings
    js = _w(tmp_path / "q.json", json.dumps({"video-a": ["one sentence.", 5]}))
    (r,) = read_annotations(js, "queryd")
    assert r.error == "non_text_caption"


def test_queryd_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"video-a": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        read_annotations(pkl)


def test_condensed_movies_descriptions(tmp_path):
    p = _w(tmp_path / "descriptions.csv",
           "videoid,imdbid,duration,description,upload_year\n"
           "0xFk1mzdL8c,tt0099785,118.0,Kevin sets up traps in the house.,2011.0\n"
           "-9NW0a_VmXM,tt0109830,93.5,\"Forrest, on a bench, talks about chocolates.\",\n"
           "abc,tt1,10,,2012\n")
    assert detect_format(p) == "condensed_movies"
    recs = read_annotations(p)
    assert [(r.video, r.key, r.captions, r.error) for r in recs] == [
        ("2011/0xFk1mzdL8c", "0xFk1mzdL8c", ["Kevin sets up traps in the house."], ""),
        ("-9NW0a_VmXM", "-9NW0a_VmXM", ["Forrest, on a bench, talks about chocolates."], ""),
        ("2012/abc", "abc", [], "no_caption"),
    ]
    assert recs[0].extra == {"imdbid": "tt0099785", "upload_year": "2011"}
    with pytest.raises(DataError, match="no 'description'"):
        read_annotations(_w(tmp_path / "c.csv", "videoid,imdbid\nx,y\n"), "condensed_movies")


EK100_HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,"
                "stop_timestamp,start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,"
                "all_nouns,all_noun_classes\n")


def test_epic_kitchens_windows_and_labels(tmp_path):
    p = _w(tmp_path / "EPIC_100_train.csv", EK100_HEADER +
           "P01_01_0,P01,P01_01,00:00:00.560,00:00:00.14,00:00:03.37,8,202,open door,open,3,door,3,['door'],[3]\n"
           "P01_01_1,P01,P01_01,00:00:04.370,00:00:04.37,00:00:05.12,262,307,turn on light,turn-on,6,light,114,['light'],[114]\n"
           "P01_01_2,P01,P01_01,00:01:02.500,00:01:01.50,00:01:03.25,3690,3795,\"put pan, lid on hob\",put,1,pan,5,\"['pan', 'lid', 'hob']\",\"[5, 31, 12]\"\n")
    assert detect_format(p) == "epic_kitchens"
    recs = read_annotations(p)
    assert [(r.key, r.video, r.captions, r.start, r.end) for r in recs] == [
        ("P01_01_0", "P01_01", ["open door"], 0.14, 3.37),
        ("P01_01_1", "P01_01", ["turn on light"], 4.37, 5.12),
        ("P01_01_2", "P01_01", ["put pan, lid on hob"], 61.5, 63.25),  # 00:01:01.50
    ]
    assert recs[2].extra == {
        "narration_id": "P01_01_2", "participant_id": "P01", "verb": "put", "noun": "pan",
        "verb_class": 1, "noun_class": 5, "all_nouns": ["pan", "lid", "hob"],
        "all_noun_classes": [5, 31, 12], "start_frame": 3690, "stop_frame": 3795,
    }
    bad = _w(tmp_path / "bad.csv", EK100_HEADER + "P01_01_0,P01,P01_01,x,1:2:3:4,00:00:03.37,8,202,a,b,3,c,3,[],[]\n")
    with pytest.raises(DataError, match=r"bad.csv:2: timestamp '1:2:3:4'"):
        read_annotations(bad, "epic_kitchens")


def test_charades_ego_multilabel_with_action_windows(tmp_path):
    p = _w(tmp_path / "CharadesEgo_v1_train.csv",
           "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length,egocentric,charades_video\n"
           "005BUEGO,HR43,Kitchen,6,7,Yes,A person cooks food on the stove.,food;stove,"
           "A person is cooking.,c147 0.00 12.60;c092 11.90 21.20;c147 20.0 25.5,32.12,Yes,005BU\n"
           "00HFPEGO,XX11,Bedroom,5,6,Yes,Someone sleeps.,bed,,,14.00,Yes,00HFP\n")
    assert detect_format(p) == "charades_ego"
    r1, r2 = read_annotations(p)
    assert r1.video == "005BUEGO" and r1.captions == ["A person is cooking.", "A person cooks food on the stove."]
    assert r1.extra["labels"] == [92, 147]
    assert r1.extra["segments"] == [
        {"start": 0.0, "end": 12.6, "label": 147, "class_id": "c147"},
        {"start": 11.9, "end": 21.2, "label": 92, "class_id": "c092"},
        {"start": 20.0, "end": 25.5, "label": 147, "class_id": "c147"},
    ]
    assert r1.extra["objects"] == ["food", "stove"] and r1.extra["charades_video"] == "005BU"
    assert r2.captions == ["Someone sleeps."] and r2.extra["labels"] == [] and not r2.error
    with pytest.raises(DataError, match="'c1 2' is not 'cNNN start end'"):
        read_annotations(_w(tmp_path / "b.csv", "id,script,descriptions,actions\nx,s,d,c1 2\n"))


def test_charades_labels_feed_the_classification_task(tmp_path):
    """The consumer's own reader (LabelSpace of tasks/classification) turns the JSON fields we
    write into the multi-hot and class-index targets expected by hand."""
    from megavid.tasks.classification import LabelSpace

    p = _w(tmp_path / "CharadesEgo_v1_train.csv",
           "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
           "A,s,k,1,1,Yes,script,,desc,c002 0 1;c000 1 2,3\n")
    (r,) = read_annotations(p)
    y = LabelSpace(classes=["c0", "c1", "c2"], multilabel=True).targets([r.extra])
    assert y.tolist() == [[1.0, 0.0, 1.0]]
    ek = _w(tmp_path / "EPIC_100_validation.csv", EK100_HEADER +
            "P02_01_0,P02,P02_01,00:00:01.00,00:00:01.00,00:00:02.00,60,120,wash cup,wash,2,cup,4,['cup'],[4]\n")
    (e,) = read_annotations(ek)
    space = LabelSpace(classes=[str(i) for i in range(5)], label_field="noun_class")
    assert space.targets([e.extra]).tolist() == [4]


def test_classification_lists(tmp_path):
    # Kinetics-style "path label" list (mmaction *_list_videos.txt), spaces in class folders
    p = _w(tmp_path / "kinetics_train_list_videos.txt",
           "abseiling/0wR5jVB-WPk_000417_000427.mp4 0\nair drumming/--nQbRBEz2s_000104_000114.mp4 1\n")
    recs = read_annotations(p, "classification")
    assert [(r.video, r.captions, r.extra) for r in recs] == [
        ("abseiling/0wR5jVB-WPk_000417_000427.mp4", ["abseiling"], {"label": 0}),
        ("air drumming/--nQbRBEz2s_000104_000114.mp4", ["air drumming"], {"label": 1}),
    ]
    # UCF-101 testlist: paths only, the class folder is the label
    p = _w(tmp_path / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    (r,) = read_annotations(p, "classification")
    assert r.extra == {"label": "ApplyEyeMakeup"} and r.captions == ["ApplyEyeMakeup"]
    # path,label CSV with and without a header; a missing label is counted, not raised
    p = _w(tmp_path / "l.csv", "path,label\nclips/a.mp4,jumping_jacks\nclips/b.mp4,\nc.mp4,3\n")
    recs = read_annotations(p, "classification")
    assert [(r.extra.get("label"), r.captions, r.error) for r in recs] == [
        ("jumping_jacks", ["jumping jacks"], ""), (None, [], "no_label"), (3, ["3"], "")]
    p = _w(tmp_path / "n.csv", "x.mp4,7\n")
    assert read_annotations(p, "classification")[0].extra == {"label": 7}


def test_multilabel_lists(tmp_path):
    p = _w(tmp_path / "ml.csv", "video,labels\nv1.mp4,3;17;4\nv2.mp4,c092|c147\n")
    assert [r.extra for r in read_annotations(p, "multilabel")] == [{"labels": [3, 17, 4]},
                                                                    {"labels": ["c092", "c147"]}]
    p = _w(tmp_path / "ml.txt", "v1.mp4 3 17\nv2.mp4 5\n")
    assert [r.extra for r in read_annotations(p, "multilabel")] == [{"labels": [3, 17]}, {"labels": [5]}]
    p = _w(tmp_path / "ml2.csv", "v1.mp4,1,2\n")
    assert read_annotations(p, "multilabel")[0].extra == {"labels": [1, 2]}


def test_webvid_path_template(tmp_path):
    # WebVid-10M results_*.csv: videoid,name,page_idx,page_dir,duration,contentUrl
    p = _w(tmp_path / "results_2M_val.csv",
           "videoid,contentUrl,duration,page_dir,name\n"
           "1066674784,https://x/1.mp4,PT00H00M30S,006001_006050,Horse grazing in a field\n"
           "21179416,https://x/2.mp4,PT00H00M23S,013401_013450,Aerial shot of a city\n")
    recs = read_annotations(p, path_template="{page_dir}/{videoid}.mp4")
    assert [(r.video, r.captions) for r in recs] == [
        ("006001_006050/1066674784.mp4", ["Horse grazing in a field"]),
        ("013401_013450/21179416.mp4", ["Aerial shot of a city"])]
    with pytest.raises(DataError, match=r"names 'page'.*\{column\}"):
        read_annotations(p, path_template="{page}/{videoid}.mp4")
    # classification CSVs take it too (Kinetics' official CSV + the usual file naming)
    k = _w(tmp_path / "kinetics400_val.csv", "label,youtube_id,time_start,time_end,split\n"
                                             "abseiling,0wR5jVB-WPk,417,427,val\n")
    (r,) = read_annotations(k, "classification",
                            path_template="{label}/{youtube_id}_{time_start:0>6}_{time_end:0>6}.mp4")
    assert r.video == "abseiling/0wR5jVB-WPk_000417_000427.mp4" and r.extra == {"label": "abseiling"}


def test_classification_list_end_to_end(videos_dir, tmp_path):
    """A UCF-101 style list through make-shards: the sample JSONs carry `label`, and the
    classification task's LabelSpace reads them into the targets expected by hand."""
    import shutil

    from megavid.shards.format import read_index, read_sample
    from megavid.shards.ingest.make_shards import make_shards
    from megavid.shards.ingest.options import MakeShardsOptions
    from megavid.tasks.classification import LabelSpace

    vids = tmp_path / "UCF-101"
    for cls, name in (("PhoneCall", "carphone_pristine.mp4"), ("Blurry", "carphone_distorted.mp4")):
        (vids / cls).mkdir(parents=True)
        shutil.copy(videos_dir / name, vids / cls / f"v_{cls}_g01_c01.mp4")
    lst = _w(tmp_path / "testlist01.txt", "PhoneCall/v_PhoneCall_g01_c01.mp4\nBlurry/v_Blurry_g01_c01.mp4\n"
                                          "Blurry/v_Blurry_g02_c01.mp4\n")
    s = make_shards(MakeShardsOptions(videos=str(vids), annotations=str(lst), out=str(tmp_path / "o"),
                                      format="classification", workers=1), quiet=True)
    assert s["successes"] == 2 and s["failures"] == {"missing_file": 1}
    metas = [read_sample(tmp_path / "o", e)[1] for e in read_index(tmp_path / "o")]
    assert [(m["key"], m["label"], m["captions"]) for m in metas] == [
        ("Blurry_v_Blurry_g01_c01", "Blurry", ["Blurry"]),
        ("PhoneCall_v_PhoneCall_g01_c01", "PhoneCall", ["PhoneCall"])]
    assert LabelSpace(classes=["PhoneCall", "Blurry"]).targets(metas).tolist() == [1, 0]
