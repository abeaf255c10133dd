"""`megavid shard-stats`: every number checked against values computed here, independently,
from the tar members (Python's tarfile + json) and numpy's histogram."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megavid import cli
from megavid.errors import DataError
from megavid.shards.ingest.make_shards import make_shards
from megavid.shards.ingest.options import MakeShardsOptions
from megavid.shards.stats import DURATION_BINS, get_shard_stats


def _members(shard_dir: Path) -> list[tuple[dict, dict[str, int]]]:
    """(sample JSON, {extension: size}) of every sample, read with tarfile."""
    out: dict[tuple[str, str], tuple[dict, dict[str, int]]] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                meta, sizes = out.setdefault((tar.name, key), ({}, {}))
                if ext == "json":
                    meta.update(json.loads(tf.extractfile(m).read()))
                else:
                    sizes[ext] = m.size
    return list(out.values())


def _expected(shard_dir: Path) -> dict:
    samples = _members(shard_dir)
    secs = []
    for meta, _ in samples:
        if meta.get("start") is not None or meta.get("end") is not None:
            end = meta["end"] if meta.get("end") is not None else meta["duration"]
            secs.append(end - (meta.get("start") or 0.0))
        else:
            secs.append(meta["duration"])
    hist, _ = np.histogram(secs, bins=[0.0, *DURATION_BINS, np.inf])
    return {
        "samples": len(samples),
        "seconds": sum(secs),
        "bytes": sum(p.stat().st_size for p in shard_dir.glob("*.tar")),
        "media_bytes": sum(sum(s.values()) for _, s in samples),
        "frames": sum(m["num_frames"] for m, _ in samples),
        "captions": sum(len(m["captions"]) for m, _ in samples),
        "hist": hist.tolist(),
        "codecs": Counter(m["codec"] for m, _ in samples),
        "resolutions": Counter(f"{m['width']}x{m['height']}" for m, _ in samples),
        "max": max(secs),
    }


def _check(stats: dict, exp: dict) -> None:
    assert stats["samples"] == exp["samples"]
    assert stats["seconds"] == pytest.approx(exp["seconds"], abs=1e-3)
    assert stats["bytes"] == exp["bytes"] and stats["media_bytes"] == exp["media_bytes"]
    assert stats["frames"] == exp["frames"] and stats["captions"] == exp["captions"]
    assert list(stats["duration"]["histogram"].values()) == exp["hist"]
    assert stats["duration"]["max"] == pytest.approx(exp["max"], abs=1e-3)
    assert stats["codecs"] == dict(exp["codecs"]) and stats["resolutions"] == dict(exp["resolutions"])


def test_video_shards_with_windows_and_failures(videos_dir, tmp_path, capsys):
    ann = tmp_path / "a.jsonl"
    rows = [{"video": "carphone_pristine.mp4", "captions": ["a man", "on the phone"]},
            {"video": "bikes.mp4", "caption": "bikes", "start": 1.0, "end": 3.5},
            {"video": "random.mp4", "caption": "noise"},
            {"video": "nosuch.mp4", "caption": "missing"},
            {"video": "carphone_distorted.mp4", "caption": "blurry"}]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    summary = make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(out),
                                            workers=1, max_count=2), quiet=True)
    stats = get_shard_stats(out)
    _check(stats, _expected(out))
    # by hand: 4.004 s + the 2.5 s window + 4.004 s; two 176x144 clips and one 640x272 h264
    assert stats["seconds"] == pytest.approx(4.004 * 2 + 2.5, abs=1e-3)
    assert stats["resolutions"] == {"176x144": 2, "640x272": 1} and stats["fps"] == {"29.97": 2, "25": 1}
    assert stats["duration"]["histogram"]["2-5s"] == 3 and stats["containers"] == {"mp4": 3}
    assert stats["failures"] == summary["failures"] == {"missing_file": 1, "unreadable_container": 1}
    assert stats["inputs"] == 5 and stats["shards"] == 2
    assert [Path(s).name for s in stats["failed_sources"]["unreadable_container"]] == ["random.mp4"]
    # the CLI: --json gives the same object; the text report names the failure
    assert cli.main(["shard-stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(stats))
    assert cli.main(["shard-stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 samples in 2 shards" in text and "unreadable_container: 1" in text and "640x272 1" in text


def test_frames_and_synthetic_vp9_shards(videos_dir, synthetic_root, tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("video,caption\ncarphone_pristine.mp4,a man on the phone\n")
    out = tmp_path / "frames"
    make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(out), workers=1,
                                  shard_format="frames", fps=4, short_side=64), quiet=True)
    stats = get_shard_stats(out)
    _check(stats, _expected(out))
    # 4.004 s at 4 fps: the frames on screen at 0, 0.25, ... 4.0 s -> 17 JPEGs of 78x64
    assert stats["frames"] == 17 and stats["formats"] == {"frames": 1} and stats["codecs"] == {"jpeg": 1}
    assert stats["resolutions"] == {"78x64": 1}
    syn = synthetic_root / "shards" / "train"
    stats = get_shard_stats(syn)
    _check(stats, _expected(syn))
    assert stats["codecs"] == {"vp9": 12} and stats["failures"] == {} and stats["shards"] == 3


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_shard_stats(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards"):
        get_shard_stats(tmp_path / "empty")
    assert cli.main(["shard-stats", str(tmp_path / "nope")]) == 2
