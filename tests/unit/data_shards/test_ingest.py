"""make-shards inputs other than a video folder + annotation file: video2dataset output tars
(written here by hand in video2dataset's layout) and WebVid-style --path-template CSVs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from megavid import cli
from megavid.errors import DataError
from megavid.shards.format import iter_tar_samples, read_index, read_sample
from megavid.shards.ingest.make_shards import make_shards
from megavid.shards.ingest.options import MakeShardsOptions
from megavid.shards.verify import verify_shards


def _v2d_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar as video2dataset's webdataset writer makes it: per key .mp4, .txt, .json members
    (in that order, not sorted), real mtimes and user names."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.uname = len(data), 1_700_000_000, "worker"
                tf.addfile(ti, io.BytesIO(data))


def _meta(key: str, caption: str | None = None, **kw) -> bytes:
    d = {"url": f"https://example.com/{key}.mp4", "key": key, "status": "success",
         "error_message": None, "width": 176, "height": 144, **kw}
    if caption is not None:
        d["caption"] = caption
    return json.dumps(d).encode()


@pytest.fixture
def v2d_dir(videos_dir, tmp_path) -> Path:
    d = tmp_path / "v2d"
    d.mkdir()
    pristine = (videos_dir / "carphone_pristine.mp4").read_bytes()
    _v2d_tar(d / "00000.tar", [
        ("000000000", {"mp4": pristine, "txt": b"a man talks on the phone", "json": _meta("000000000", "x")}),
        ("000000001", {"mp4": (videos_dir / "random.mp4").read_bytes(), "txt": b"noise",
                       "json": _meta("000000001")}),
        ("000000002", {"txt": b"no video member", "json": _meta("000000002")}),
    ])
    _v2d_tar(d / "00001.tar", [
        # no .txt member: the caption of the JSON is used
        ("000010000", {"mp4": (videos_dir / "carphone_distorted.mp4").read_bytes(),
                       "json": _meta("000010000", "a blurry man in a car")}),
        ("000010001", {"mp4": (videos_dir / "truncated_faststart.mp4").read_bytes(), "txt": b"cut",
                       "json": _meta("000010001")}),
        ("000010002", {"mp4": pristine, "txt": b"   ", "json": _meta("000010002")}),
    ])
    for i, st in enumerate([{"count": 5, "successes": 3, "failed_to_download": 2, "failed_to_subsample": 0,
                             "status_dict": {"success": 3, "HTTP Error 404": 2}},
                            {"count": 4, "successes": 3, "failed_to_download": 0, "failed_to_subsample": 1,
                             "status_dict": {"success": 3, "subsample error": 1}}]):
        (d / f"{i:05d}_stats.json").write_text(json.dumps(st))
    return d


def test_video2dataset_ingest(v2d_dir, videos_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["make-shards", "--from-video2dataset", str(v2d_dir), "--out", str(out), "--workers", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "make_shards.json").read_text())["summary"]
    assert s["successes"] == 2 and s["count"] == 6
    assert s["failures"] == {"decode_error": 1, "missing_file": 1, "no_caption": 1, "unreadable_container": 1}
    by_reason = {f["reason"]: f["source"] for f in s["failed"]}
    assert by_reason["unreadable_container"].endswith("00000.tar:000000001.mp4")
    assert by_reason["decode_error"].endswith("00001.tar:000010001.mp4")
    assert by_reason["missing_file"].endswith("00000.tar:000000002")
    # video2dataset's own counters, summed by hand: 9 urls, 6 downloaded, 2 + 0, 0 + 1 failed
    assert s["video2dataset"] == {"shards": 2, "count": 9, "successes": 6, "failed_to_download": 2,
                                  "failed_to_subsample": 1,
                                  "status_dict": {"HTTP Error 404": 2, "subsample error": 1, "success": 6}}
    assert "failed to download" in printed
    # our shards: idx + stats + index, and every video decodes (verify-shards does all of that)
    assert verify_shards(out) == []
    entries = read_index(out)
    assert [e["key"] for e in entries] == ["000000000", "000010000"]
    video, meta = read_sample(out, entries[0])
    assert video == (videos_dir / "carphone_pristine.mp4").read_bytes()  # --codec keep: the bytes
    assert meta["captions"] == ["a man talks on the phone"] and meta["num_frames"] == 120
    assert meta["video2dataset"]["url"] == "https://example.com/000000000.mp4"
    _, meta2 = read_sample(out, entries[1])
    assert meta2["captions"] == ["a blurry man in a car"]
    # what PyAV decodes from our member equals what it decodes from the video2dataset member
    src = dict(iter_tar_samples(v2d_dir / "00001.tar"))["000010000"]["mp4"]
    ours = read_sample(out, entries[1])[0]
    with av.open(io.BytesIO(src)) as a, av.open(io.BytesIO(ours)) as b:
        fa = np.stack([f.to_ndarray(format="rgb24") for f in a.decode(video=0)])
        fb = np.stack([f.to_ndarray(format="rgb24") for f in b.decode(video=0)])
    assert np.array_equal(fa, fb)
    # resume: same options keep the shards
    s2 = make_shards(MakeShardsOptions(videos="", annotations="", out=str(out),
                                       from_video2dataset=str(v2d_dir), workers=1), quiet=True)
    assert s2["processed_videos"] == 0 and s2["successes"] == 2


def test_video2dataset_input_errors(v2d_dir, tmp_path, capsys):
    assert cli.main(["make-shards", "--from-video2dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--from-video2dataset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar files"):
        make_shards(MakeShardsOptions(videos="", annotations="", out=str(tmp_path / "o"),
                                      from_video2dataset=str(tmp_path / "empty")))
    rc = cli.main(["make-shards", "--from-video2dataset", str(v2d_dir), "--videos", str(tmp_path),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "one input, not both" in capsys.readouterr().err
    rc = cli.main(["make-shards", "--videos", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--annotations" in capsys.readouterr().err


def test_webvid_path_template_end_to_end(videos_dir, tmp_path):
    """WebVid keeps videos in page folders: {page_dir}/{videoid}.mp4."""
    vids = tmp_path / "webvid"
    for page, vid, name in (("006001_006050", "1066674784", "carphone_pristine.mp4"),
                            ("013401_013450", "1066674784", "carphone_distorted.mp4")):
        (vids / page).mkdir(parents=True)
        shutil.copy(videos_dir / name, vids / page / f"{vid}.mp4")
    ann = tmp_path / "results_2M_val.csv"
    ann.write_text("videoid,contentUrl,duration,page_dir,name\n"
                   "1066674784,https://x/1.mp4,PT00H00M04S,006001_006050,A man on the phone\n"
                   "1066674784,https://x/2.mp4,PT00H00M04S,013401_013450,The same man blurred\n"
                   "21179416,https://x/3.mp4,PT00H00M23S,013401_013450,Not downloaded\n")
    s = make_shards(MakeShardsOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "o"),
                                      path_template="{page_dir}/{videoid}.mp4", workers=1), quiet=True)
    assert s["successes"] == 2 and s["failures"] == {"missing_file": 1}
    entries = read_index(tmp_path / "o")
    # the same videoid in two pages: the page folder keeps the keys apart
    assert [e["key"] for e in entries] == ["006001_006050_1066674784", "013401_013450_1066674784"]
    for e, name in zip(entries, ("carphone_pristine.mp4", "carphone_distorted.mp4")):
        assert read_sample(tmp_path / "o", e)[0] == (videos_dir / name).read_bytes()
