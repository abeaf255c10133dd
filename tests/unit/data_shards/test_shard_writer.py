"""Shard writer, DALI index, reading helpers and the verifier, on real synthetic videos."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest
import webdataset as wds

from megavid import cli
from megavid.errors import DataError
from megavid.shards.format import list_shards, read_index, read_sample
from megavid.shards.verify import verify_main, verify_shards
from megavid.shards.writer import SampleFailure, ShardSample, complete_shards, write_shards


def _raw_samples(root: Path, split: str = "train") -> list[ShardSample]:
    out = []
    for line in (root / "raw" / f"{split}.jsonl").read_text().splitlines():
        meta = json.loads(line)
        out.append(ShardSample(key=meta["key"], video=(root / meta["source"]).read_bytes(),
                               ext="webm", meta=meta, source=meta["source"]))
    return out


def test_tar_format_with_gnu_tar_and_tarfile(synthetic_root):
    shard_dir = synthetic_root / "shards" / "train"
    tars = list_shards(str(shard_dir))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]  # 12 clips, 5 per shard
    listing = subprocess.run(["tar", "tvf", str(tars[0]), "--numeric-owner"], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    names = [line.split()[-1] for line in listing]
    assert names == sorted(names) and len(names) == 10
    assert names[:2] == ["train_000000.json", "train_000000.webm"]
    for line in listing:
        perms, owner = line.split()[:2]
        assert perms == "-rw-r--r--" and owner == "0/0"
        assert "1970-01-01" in line
    with tarfile.open(tars[0]) as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_webdataset_reads_what_was_written(synthetic_root):
    shard_dir = synthetic_root / "shards" / "train"
    raw = {s.key: s for s in _raw_samples(synthetic_root)}
    urls = [str(p) for p in list_shards(str(shard_dir))]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        got[sample["__key__"]] = sample
    assert sorted(got) == sorted(raw)
    for key, sample in got.items():
        assert sample["webm"] == raw[key].video
        meta = json.loads(sample["json"])
        assert meta == raw[key].meta
    # random access through index.jsonl gives the same bytes
    for entry in read_index(shard_dir):
        video, meta = read_sample(shard_dir, entry)
        assert video == raw[entry["key"]].video and meta["key"] == entry["key"]
        assert entry["num_frames"] == 8 and entry["duration"] == 1.0


def test_dali_index_matches_wds2idx(synthetic_root, tmp_path):
    """The .idx we write equals what nvidia-dali's wds2idx script writes for the same tar."""
    for split in ("train", "test"):
        for tar in list_shards(split, root=synthetic_root):
            ref = tmp_path / f"{split}_{tar.stem}.idx"
            subprocess.run([sys.executable, "-m", "wds2idx", str(tar), str(ref)], check=True,
                           capture_output=True)
            assert tar.with_suffix(".idx").read_text() == ref.read_text()


def test_dali_reads_the_shards(synthetic_root):
    """DALI's own webdataset reader (CPU) with our index files decodes every VP9 clip."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    tars = list_shards("val", root=synthetic_root)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        video, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["webm", "json"], missing_component_behavior="error")
        return fn.decoders.video(video, device="cpu"), meta

    p = pipe()
    p.build()
    frames, meta = p.run()
    import numpy as np

    assert np.array(frames[0]).shape == (8, 32, 32, 3)
    first = json.loads(bytes(np.array(meta[0])).decode())
    assert first["key"] == "val_000000"
    assert dali.__version__


def test_verify_clean_shards_and_cli(synthetic_root, capsys):
    assert verify_shards(synthetic_root / "shards" / "test") == []
    assert cli.main(["verify-shards", str(synthetic_root / "shards" / "test")]) == 0
    assert "OK (4 shards, 16 samples)" in capsys.readouterr().out


def _copy_shards(synthetic_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(synthetic_root / "shards" / "val", dst)
    return dst


def _corrupt(tar: Path, entry: dict, ext: str, data: bytes) -> None:
    off, size = entry["members"][ext]
    assert len(data) <= size
    with open(tar, "r+b") as f:
        f.seek(off)
        f.write(data)


def test_verify_catches_corrupted_video_member(synthetic_root, tmp_path, capsys):
    d = _copy_shards(synthetic_root, tmp_path)
    entry = read_index(d)[1]
    # overwrite the whole video payload with noise (same size: tar structure still valid)
    size = entry["members"]["webm"][1]
    _corrupt(d / entry["shard"], entry, "webm", bytes((i * 7919 + 13) % 251 for i in range(size)))
    problems = verify_shards(d)
    assert len(problems) == 1 and entry["key"] in problems[0] and "decode" in problems[0]
    assert verify_main([str(d)]) == 1
    assert entry["key"] in capsys.readouterr().out


def test_verify_catches_bad_json_and_index_mismatches(synthetic_root, tmp_path):
    d = _copy_shards(synthetic_root, tmp_path)
    entries = read_index(d)
    _corrupt(d / entries[0]["shard"], entries[0], "json", b"{not json")
    problems = verify_shards(d, decode=False)
    assert any("val_000000.json: not valid JSON" in p for p in problems)

    d2 = _copy_shards(synthetic_root, tmp_path / "b")
    lines = (d2 / "index.jsonl").read_text().splitlines()
    (d2 / "index.jsonl").write_text("\n".join(lines[1:]) + "\n")
    idx = d2 / "00000.idx"
    idx.write_text(idx.read_text().replace("webm 2560", "webm 2048"))
    problems = verify_shards(d2, decode=False)
    assert any("index.jsonl" in p and "val_000000" in p and "missing" in p for p in problems)
    assert any("00000.idx does not match" in p for p in problems)


def test_list_shards_specs_and_errors(synthetic_root, tmp_path):
    train = synthetic_root / "shards" / "train"
    all3 = [train / f"0000{i}.tar" for i in range(3)]
    assert list_shards(str(train)) == all3
    assert list_shards("train", root=str(synthetic_root)) == all3
    assert list_shards(str(train / "0000[01].tar")) == all3[:2]
    assert list_shards(str(train) + "/{00001..00002}.tar") == all3[1:]
    assert list_shards(str(all3[2])) == [all3[2]]
    with pytest.raises(DataError, match="does not exist") as e:
        list_shards("nosuchsplit", root=str(synthetic_root))
    assert "\n" not in str(e.value) and "make-shards" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no .tar shard matches"):
        list_shards(str(tmp_path / "empty" / "*.tar"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a .tar shard"):
        list_shards(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="no sample index"):
        read_index(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        verify_main([str(tmp_path / "missing")])


def test_failures_counted_and_limits(synthetic_root, tmp_path):
    samples = _raw_samples(synthetic_root)
    stream = [samples[0], SampleFailure(source="a.mp4", reason="decode_error"), samples[1],
              SampleFailure(source="b.mp4", reason="decode_error"), samples[2],
              SampleFailure(source="c.mp4", reason="no_caption")]
    # max_bytes smaller than two videos: one sample per shard
    summary = write_shards(stream, tmp_path / "s", max_count=100, max_bytes=1)
    assert summary["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    assert summary["failures"] == {"decode_error": 2, "no_caption": 1}
    assert summary["count"] == 6 and summary["successes"] == 3
    st = [json.loads((tmp_path / "s" / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["count"] for s in st] == [1, 2, 3]  # failures go to the shard open when they come
    assert st[2]["failed"] == [{"source": "b.mp4", "reason": "decode_error"},
                               {"source": "c.mp4", "reason": "no_caption"}]
    assert verify_shards(tmp_path / "s") == []
    with pytest.raises(DataError, match="duplicate sample key"):
        write_shards([samples[0], samples[0]], tmp_path / "d")
    bad = ShardSample(key="a.b", video=b"x", ext="webm", meta={})
    with pytest.raises(DataError, match="not a valid shard key"):
        write_shards([bad], tmp_path / "k")


def test_resume_after_partial_write_is_byte_identical(synthetic_root, tmp_path):
    samples = _raw_samples(synthetic_root)
    stream = samples[:4] + [SampleFailure(source="x", reason="decode_error")] + samples[4:]
    write_shards(stream, tmp_path / "full", max_count=3)
    # simulate a crash: a complete first shard, a torn second one (tar only, no stats) and a
    # temporary file
    part = tmp_path / "part"
    part.mkdir()
    for name in ("00000.tar", "00000.idx", "00000_stats.json"):
        shutil.copy(tmp_path / "full" / name, part / name)
    (part / "00001.tar").write_bytes((tmp_path / "full" / "00001.tar").read_bytes()[:3000])
    (part / ".00002.tar.tmp").write_bytes(b"junk")
    n_shards, consumed = complete_shards(part)
    assert (n_shards, consumed) == (1, 3)
    write_shards(stream[consumed:], part, max_count=3, start_shard=n_shards)
    for p in sorted((tmp_path / "full").iterdir()):
        if not p.name.endswith("_stats.json"):
            assert (part / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(x.name for x in part.iterdir()) == sorted(x.name for x in (tmp_path / "full").iterdir())
    assert verify_shards(part) == []


def test_h264_samples_in_shards(tmp_path, syn_config):
    """mp4 members: the writer/verifier are codec-agnostic (PyAV decodes H.264)."""
    from megavid.shards.synthetic import generate_synthetic

    generate_synthetic(tmp_path, syn_config(codec="h264", num_train=0, num_test=0, num_val=2), workers=1)
    d = tmp_path / "shards" / "val"
    assert verify_shards(d) == []
    entry = read_index(d)[0]
    assert set(entry["members"]) == {"json", "mp4"} and entry["codec"] == "h264"
    video, _ = read_sample(d, entry)
    with av.open(io.BytesIO(video)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 8
