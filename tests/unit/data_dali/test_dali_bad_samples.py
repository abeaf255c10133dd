"""Bad samples in the DALI loaders (CPU decoders), on damaged real shards: VP9 video
shards with one tar cut in the middle of a member and random bytes written into the videos of
another, and frames (JPEG) shards with a cut tar and garbled frames. Against references computed
without the loaders (tarfile + PyAV / PIL decodes): no key twice in a batch, each bad sample
counted once per epoch and logged once, the PyAV loader's batches, the same batches for 1 and 2
DALI threads and after a resume mid-epoch; quarantined samples are not decoded again."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import bad_shards
from tests.helpers.dali_shards import data_cfg, make_shards, render

pytest.importorskip("nvidia.dali")

from megavid.data.dali.backend import build_dali_loader  # noqa: E402
from megavid.data.dali.image_loaders import FramesDaliLoader  # noqa: E402
from megavid.data.dali.loader import DaliLoader  # noqa: E402
from megavid.data.loader import build_pyav_loader  # noqa: E402
from megavid.shards.format import read_index  # noqa: E402
from megavid.shards.writer import ShardSample, write_shards  # noqa: E402

N = 30  # 6 tars of 5
B = 5
SEED = 2


@pytest.fixture(scope="module")
def damaged_vp9(tmp_path_factory) -> tuple[Path, list[str], dict[str, str]]:
    """(shard folder, keys in index order, reference {bad key: reason}): 30 VP9 clips (96x64,
    20 frames); 00001.tar cut in the middle of its third video, random bytes written near the
    start of the videos of 00003.tar (seeded; patches that leave a partly decodable video are
    undone, ``bad_shards.damage_split``)."""
    d = make_shards(tmp_path_factory.mktemp("damaged_vp9") / "shards", N, max_count=5)
    entries = read_index(d)
    ref = bad_shards.damage_split(d, entries, truncate=entries[7], patch=entries[15:20],
                                  ext="webm", seed=3, window=(0.0, 0.1))
    assert {k for k, r in ref.items() if r == "truncated_shard"} == {
        "clip_0007", "clip_0008", "clip_0009"}
    broken = {k for k, r in ref.items() if r == "decode_error"}
    assert len(broken) >= 2 and broken <= {f"clip_{i:04d}" for i in range(15, 20)}
    assert set(ref.values()) == {"truncated_shard", "decode_error"}
    return d, [e["key"] for e in entries], ref


def skip_lines(caplog) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in caplog.records:
        msg = r.getMessage()
        if msg.startswith("skipped sample "):
            out.setdefault(msg.split()[2], []).append(msg)
    return out


def check_epoch(batches: list[dict], keys: list[str], ref: dict[str, str]) -> None:
    assert len(batches) == len(keys) // B and all(len(b["keys"]) == B for b in batches)
    bad_shards.assert_no_duplicate_keys(batches)
    assert {k for b in batches for k in b["keys"]} == set(keys) - set(ref)


def test_vp9_epoch_counts_logs_threads_and_pyav(damaged_vp9, caplog):
    d, keys, ref = damaged_vp9
    runs = {}
    for threads in (1, 2):
        caplog.clear()
        loader = build_dali_loader(data_cfg(d, batch_size=B, num_workers=threads), "train",
                                   train=True, seed=SEED)
        assert isinstance(loader, DaliLoader) and loader.device == "cpu"
        with caplog.at_level("WARNING", logger="megavid.data"):
            runs[threads] = batches = list(loader)
        check_epoch(batches, keys, ref)
        assert loader.failures == Counter(ref.values())
        lines = skip_lines(caplog)
        assert sorted(lines) == sorted(ref)
        for key, (line,) in lines.items():  # once each, with its reason
            assert f"({ref[key]}: " in line, line
        assert sorted(s["key"] for s in loader.quarantine.samples) == sorted(ref)
    for a, b in zip(runs[1], runs[2], strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["video"], b["video"])
    # the PyAV loader picks the same replacements (one rule for every backend)
    pyav = build_pyav_loader(data_cfg(d, batch_size=B), "train", train=True, seed=SEED)
    assert [b["keys"] for b in pyav] == [b["keys"] for b in runs[1]]
    assert pyav.failures == Counter(ref.values())

    # next epoch: the quarantined samples count again, without being decoded or logged again
    loader._decode_alone = lambda *a: pytest.fail("a quarantined sample was decoded again")
    caplog.clear()
    with caplog.at_level("WARNING", logger="megavid.data"):
        again = list(loader)
    check_epoch(again, keys, ref)
    assert loader.failures == Counter({r: 2 * n for r, n in Counter(ref.values()).items()})
    assert not skip_lines(caplog)


def test_vp9_resume_mid_epoch(damaged_vp9):
    d, keys, ref = damaged_vp9
    cfg = data_cfg(d, batch_size=B)
    full = list(build_dali_loader(cfg, "train", train=True, seed=SEED))
    first = build_dali_loader(cfg, "train", train=True, seed=SEED)
    head = list(itertools.islice(iter(first), 2))
    state = first.state_dict()
    assert state["cursor"] == 2 * B
    # a fresh loader with an empty (in-memory) quarantine finds the bad samples again
    resumed = build_dali_loader(cfg, "train", train=True, seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head + rest) == len(full)
    for a, b in zip(head + rest, full):
        assert a["keys"] == b["keys"] and torch.equal(a["video"], b["video"])
    assert set(resumed.failures) <= {"truncated_shard", "decode_error"}
    assert sum(resumed.failures.values()) <= len(ref)


# -------------------------------------------------------------------------------------------
# Frames (JPEG) shards
# -------------------------------------------------------------------------------------------
FRAMES = 6
FRAME_FPS = 4


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged_frames(tmp_path_factory) -> tuple[Path, list[str], dict[str, str]]:
    """20 frames samples (6 JPEGs of 64x48 each, 4 fps) in 4 tars of 5; 00001.tar cut in its
    third sample's fourth frame; every frame of two samples of 00002.tar overwritten with
    random bytes (seeded). Reference: tarfile + PIL, not the loaders."""
    from megavid.shards.format import get_frame_ext

    d = tmp_path_factory.mktemp("damaged_frames") / "shards"
    samples = []
    for i in range(20):
        frames = render(i, FRAMES, 64, 48)
        key = f"fr_{i:04d}"
        meta = {"key": key, "captions": [f"frames sample {i}"], "duration": FRAMES / FRAME_FPS,
                "fps": float(FRAME_FPS), "num_frames": FRAMES, "width": 64, "height": 48,
                "codec": "jpeg", "format": "frames", "start": None, "end": None,
                "frame_times": [t / FRAME_FPS for t in range(FRAMES)]}
        samples.append(ShardSample(key=key, video=b"", ext="", meta=meta, members={
            get_frame_ext(t): _jpeg(frames[t]) for t in range(FRAMES)}))
    write_shards(samples, d, max_count=5)
    entries = {e["key"]: e for e in read_index(d)}
    bad_shards.truncate_in_member(d, entries["fr_0007"], get_frame_ext(3))
    rng = np.random.default_rng(4)
    for key in ("fr_0011", "fr_0013"):
        with open(d / entries[key]["shard"], "r+b") as f:
            for t in range(FRAMES):
                offset, size = entries[key]["members"][get_frame_ext(t)]
                f.seek(offset)
                f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())

    # the reference: stream each tar; a sample with a missing or short member is truncated,
    # one with a frame PIL cannot decode is a decode error
    members = bad_shards.read_members(d)
    ref = {}
    for key in entries:
        got = members.get(key, {})
        if len(got) != FRAMES + 1 or any(v is None for v in got.values()):
            ref[key] = "truncated_shard"
            continue
        for ext, data in got.items():
            if ext != "json":
                try:
                    Image.open(io.BytesIO(data)).load()
                except Exception:  # noqa: BLE001 - PIL raises several kinds
                    ref[key] = "decode_error"
    assert ref == {"fr_0007": "truncated_shard", "fr_0008": "truncated_shard",
                   "fr_0009": "truncated_shard", "fr_0011": "decode_error",
                   "fr_0013": "decode_error"}
    return d, list(entries), ref


def test_frames_dali_and_pil_paths(damaged_frames, caplog):
    d, keys, ref = damaged_frames
    cfg = data_cfg(d, batch_size=B)
    dali = build_dali_loader(cfg, "train", train=True, seed=SEED)
    assert isinstance(dali, FramesDaliLoader)
    with caplog.at_level("WARNING", logger="megavid.data"):
        batches = list(dali)
    check_epoch(batches, keys, ref)
    assert dali.failures == Counter(ref.values())
    assert sorted(skip_lines(caplog)) == sorted(ref)
    assert all(len(v) == 1 for v in skip_lines(caplog).values())
    # the PyAV loader's PIL path over the same shards: same batches, same counts
    caplog.clear()
    pil = build_pyav_loader(data_cfg(d, batch_size=B, num_workers=2), "train", train=True,
                            seed=SEED)
    with caplog.at_level("WARNING", logger="megavid.data"):
        pil_batches = list(pil)
    assert [b["keys"] for b in pil_batches] == [b["keys"] for b in batches]
    assert pil.failures == Counter(ref.values())
    assert sorted(skip_lines(caplog)) == sorted(ref)
