"""The moving-shapes generator: determinism, content checked from decoded pixels, splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from megavid import cli
from megavid.errors import ConfigError
from megavid.shards import synthetic as syn_mod
from megavid.shards.format import list_shards, read_index


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _all_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("_stats.json")  # stats hold wall-clock seconds
    }


def _meta(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / "raw" / f"{split}.jsonl").read_text().splitlines()]


def _shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[int, int]:
    """The (dy, dx) circular shift that best maps frame a onto frame b (brute force)."""
    best, arg = None, (0, 0)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            err = np.abs(np.roll(a, (dy, dx), axis=(0, 1)).astype(int) - b).mean()
            if best is None or err < best:
                best, arg = err, (dy, dx)
    return arg


def test_same_seed_byte_identical_whatever_the_worker_count(synthetic_root, tmp_path, syn_config):
    """A second generation with 1 worker gives the same bytes as the fixture's 2 workers."""
    other = tmp_path / "one_worker"
    syn_mod.generate_synthetic(other, syn_config(), workers=1, shard_max_count=5)
    a, b = _all_files(synthetic_root), _all_files(other)
    assert any(k.endswith(".tar") for k in a) and any(k.endswith(".webm") for k in a)
    assert a == b
    # and the seed matters
    third = tmp_path / "seed4"
    syn_mod.generate_synthetic(third, syn_config(seed=4), workers=1, splits=("val",))
    va = {k: v for k, v in a.items() if k.startswith("raw/val/")}
    vc = {k: v for k, v in _all_files(third).items() if k.startswith("raw/val/")}
    assert va.keys() == vc.keys() and not set(va.values()) & set(vc.values())


def test_decoded_motion_matches_the_caption(synthetic_root):
    """Independent check from the pixels: the frame-to-frame shift, the colour and the
    number of frames agree with the attributes the captions and QA were built from."""
    for split in ("train", "test"):
        for meta in _meta(synthetic_root, split):
            frames = _decode(synthetic_root / meta["source"])
            assert frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3) == (8, 32, 32, 3)
            attrs = meta["attributes"]
            step = {"slow": 0.5, "fast": 1.5}[attrs["speed"]]  # px/frame at size 32
            # shift of the luma from frame 0 to frame 6: 3 px slow, 9 px fast
            luma = frames.astype(float) @ np.array([0.299, 0.587, 0.114])
            dy, dx = _shift(luma[0], luma[6], 10)
            ey, ex = {"left": (0, -6 * step), "right": (0, 6 * step), "up": (-6 * step, 0),
                      "down": (6 * step, 0)}[attrs["direction"]]
            assert abs(dy - ey) <= 1 and abs(dx - ex) <= 1, (meta["key"], meta["captions"][0], dy, dx)
            # the shape's pixels are the most saturated ones; their median is closest to
            # the named colour (tiny shapes: yuv420 chroma blurs the edges, so no exact match)
            sat = frames[0].max(-1).astype(int) - frames[0].min(-1)
            bg = int(np.median(frames[0]))
            mask = (sat > 60) if attrs["colour"] != "white" else (frames[0].min(-1) > bg + 80)
            assert mask.sum() > 10
            med = np.median(frames[0][mask], axis=0)
            # the decoded colour is nearest to the named one among all palette colours
            nearest = min(syn_mod.COLOURS, key=lambda c: np.abs(med - syn_mod.COLOURS[c]).sum())
            assert nearest == attrs["colour"], (meta["key"], med)
            # captions and QA derive from the same attributes
            cap = meta["captions"][0]
            assert cap.split()[1:3] == [attrs["colour"], attrs["shape"]] and attrs["direction"] in cap
            assert len(set(meta["captions"])) == len(meta["captions"]) >= 4
            qa = {q["type"]: q for q in meta["qa"]}
            assert qa["colour"]["answer"] == attrs["colour"] and qa["colour"]["choices"] == list(syn_mod.COLOURS)
            assert qa["shape"]["answer"] == attrs["shape"] and qa["shape"]["choices"] == list(syn_mod.SHAPES)
            assert qa["direction"]["answer"] == attrs["direction"]
            assert sorted(qa["direction"]["choices"]) == ["down", "left", "right", "up"]


def test_test_split_groups_differ_only_in_motion(synthetic_root):
    metas = _meta(synthetic_root, "test")
    assert len(metas) == 16
    firsts = [m["captions"][0] for m in metas]
    assert len(set(firsts)) == len(firsts)
    for g in range(0, 16, 4):
        group = metas[g : g + 4]
        same = {(m["attributes"]["colour"], m["attributes"]["shape"], m["attributes"]["speed"]) for m in group}
        assert len(same) == 1
        assert sorted(m["attributes"]["direction"] for m in group) == ["down", "left", "right", "up"]
        # the first decoded frame is the same picture for all 4 directions: one frame cannot
        # tell the direction, only motion can
        f0 = [_decode(synthetic_root / m["source"])[0] for m in group]
        for f in f0[1:]:
            assert np.array_equal(f, f0[0])
        last = [_decode(synthetic_root / m["source"])[-1] for m in group]
        assert len({x.tobytes() for x in last}) == 4


def test_demo_size_test_split_has_60_distinct_groups():
    """num_test=240: 60 distinct (colour, shape, speed) groups, 240 distinct first captions."""
    params = [syn_mod.clip_params(0, "test", i) for i in range(240)]
    groups = {(p["colour"], p["shape"], p["speed"]) for p in params}
    assert len(groups) == 60
    caps = {syn_mod.make_captions(p["colour"], p["shape"], p["direction"], p["speed"])[0] for p in params}
    assert len(caps) == 240


def test_single_frame_position_is_independent_of_direction():
    """Start positions are uniform on the torus whatever the direction: the mean start
    position per direction over many train clips is the frame centre (within noise)."""
    by_dir: dict[str, list[tuple[float, float]]] = {d: [] for d in syn_mod.DIRECTIONS}
    for i in range(4000):
        p = syn_mod.clip_params(0, "train", i)
        # position at the middle frame (wrapped) as a fraction of the frame
        sy, sx = syn_mod._STEP[p["direction"]]
        step = syn_mod._SPEED_PX[p["speed"]] / 64 * 7
        by_dir[p["direction"]].append(((p["y0"] + sy * step) % 1, (p["x0"] + sx * step) % 1))
    for d, pos in by_dir.items():
        m = np.mean(pos, axis=0)
        assert np.all(np.abs(m - 0.5) < 0.04), (d, m)


def test_splits_are_disjoint(synthetic_root):
    hashes = {}
    for split in ("train", "val", "test"):
        for m in _meta(synthetic_root, split):
            h = hashlib.sha256((synthetic_root / m["source"]).read_bytes()).hexdigest()
            assert h not in hashes, (m["key"], hashes.get(h))
            hashes[h] = m["key"]
        keys = [e["key"] for e in read_index(synthetic_root / "shards" / split)]
        assert keys == [m["key"] for m in _meta(synthetic_root, split)]
        assert len(list_shards(split, root=synthetic_root)) >= 1
    assert len(hashes) == 12 + 4 + 16


def test_h264_codec_writes_decodable_mp4(tmp_path, syn_config):
    cfg = syn_config(codec="h264", num_train=0, num_test=0, num_val=3)
    syn_mod.generate_synthetic(tmp_path / "a", cfg, workers=1)
    syn_mod.generate_synthetic(tmp_path / "b", cfg, workers=1)
    files = sorted((tmp_path / "a" / "raw" / "val").glob("*.mp4"))
    assert len(files) == 3
    for f in files:
        with av.open(str(f)) as c:
            assert c.streams.video[0].codec_context.name == "h264"
        assert f.read_bytes() == (tmp_path / "b" / "raw" / "val" / f.name).read_bytes()
    assert (tmp_path / "a/shards/val/00000.tar").read_bytes() == (tmp_path / "b/shards/val/00000.tar").read_bytes()


def test_rgb_to_yuv420p_round_trips_through_ffmpeg():
    """Our numpy BT.601 conversion, converted back to RGB by FFmpeg's swscale (PyAV), gives
    the original picture (2x2-constant blocks so that chroma subsampling loses nothing)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(rgb, 2, 0), 2, 1)
    ours = syn_mod.rgb_to_yuv420p(rgb)
    assert ours.shape == (48, 48)
    back = av.VideoFrame.from_ndarray(ours, format="yuv420p").to_ndarray(format="rgb24")
    assert np.abs(back.astype(int) - rgb).max() <= 4
    assert np.abs(back.astype(int) - rgb).mean() < 1.5  # 8-bit rounding both ways


@pytest.mark.parametrize(
    "kw, match",
    [({"num_test": 10}, "multiple of 4"), ({"num_test": 324}, "distinct"), ({"size": 15}, "even size"), ({"codec": "av1"}, "codec")],
)
def test_bad_synthetic_config(kw, match, syn_config):
    with pytest.raises(ConfigError, match=match):
        syn_mod.check_synthetic_config(syn_config(**kw))


@pytest.mark.slow
def test_cli_make_synthetic_skips_identical_and_refuses_different(tmp_path, capsys):
    args = ["make-synthetic", "experiment=demo", f"data.root={tmp_path}", "data.synthetic.num_train=4",
            "data.synthetic.num_val=0", "data.synthetic.num_test=4", "data.synthetic.frames=4",
            "data.synthetic.size=32"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "8 clips" in out and (tmp_path / "manifest.json").is_file()
    tar = (tmp_path / "shards/train/00000.tar").read_bytes()
    assert cli.main(args) == 0
    assert "skipping" in capsys.readouterr().out
    assert cli.main(args + ["data.synthetic.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "--overwrite" in err and "\n" == err[-1] and err.count("\n") == 1
    assert cli.main(args + ["data.synthetic.seed=7", "--overwrite"]) == 0
    assert (tmp_path / "shards/train/00000.tar").read_bytes() != tar
    assert json.loads((tmp_path / "manifest.json").read_text())["synthetic"]["seed"] == 7
