"""One DALI pipeline per loader: epochs, evaluation passes and resumed passes flow through the
same pipeline and external source; a quarantine event is the only rebuild. The feed stage (in
the loader's process, or 1 or 2 worker processes) gives the same batches.

References, none of them the loader: the number of times the pipeline builder is called
(patched counter); each batch decoded again by a fresh one-batch pipeline from the shard bytes
(``read_index`` offsets) and ``plan_clip`` / ``sample_clip_frames``, the plans the loaders made
before the feed stage existed, so pixels must be bit-identical; the PyAV loader's keys; the
(seed, epoch) draws of ``plan_clip``."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.dali_shards import data_cfg, make_shards, render

pytest.importorskip("nvidia.dali")

from megavid.data.dali import measure  # noqa: E402
from megavid.data.dali import loader as dali_loader_module  # noqa: E402
from megavid.data.dali import image_loaders  # noqa: E402
from megavid.data.dali.backend import build_dali_loader  # noqa: E402
from megavid.data.dali.image_loaders import FramesDaliLoader  # noqa: E402
from megavid.data.dali.pipelines import (  # noqa: E402
    build_frames_pipeline,
    build_video_pipeline,
    dali_to_torch,
    one_batch_source,
)
from megavid.data.dali.plan import plan_clip  # noqa: E402
from megavid.data.frames import sample_clip_frames  # noqa: E402
from megavid.data.loader import build_pyav_loader  # noqa: E402
from megavid.errors import DataError  # noqa: E402
from megavid.shards.format import get_frame_ext, read_index  # noqa: E402
from megavid.shards.writer import ShardSample, write_shards  # noqa: E402

STATS_KEYS = {"pipeline_builds", "batches", "feed_ms_per_batch", "decode_wait_ms_per_batch"}


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Batch sizes of every decode pipeline the DALI loaders build (1-clip culprit probes
    excluded), counted at the builders themselves."""
    sizes: list[int] = []

    def counting(builder, per_clip):
        def build(source, *, batch_size, **kw):
            if batch_size > per_clip:
                sizes.append(batch_size // per_clip)
            return builder(source, batch_size=batch_size, **kw)
        return build

    monkeypatch.setattr(dali_loader_module, "build_video_pipeline",
                        counting(build_video_pipeline, 1))
    monkeypatch.setattr(image_loaders, "build_frames_pipeline",
                        counting(build_frames_pipeline, 4))  # 4 frames per clip below
    return sizes


def _entries(shards: Path) -> dict[str, dict]:
    return {e["key"]: e for e in read_index(shards)}


def _member(shards: Path, entry: dict, ext: str) -> bytes:
    offset, size = entry["members"][ext]
    with open(shards / entry["shard"], "rb") as f:
        f.seek(offset)
        return f.read(size)


def reference_video(shards: Path, batch: dict, cfg, *, train: bool, seed: int,
                    epoch: int) -> torch.Tensor:
    """The batch decoded again from the shard bytes by a fresh one-batch pipeline."""
    entries = _entries(shards)
    enc, frames, starts, ends, flips = [], [], [], [], []
    for key, index, meta in zip(batch["keys"], batch["indices"].tolist(), batch["meta"]):
        plan = plan_clip(meta, index, num_frames=cfg.num_frames, img_size=cfg.img_size,
                         train=train, seed=seed, epoch=epoch, random_flip=cfg.random_flip,
                         crop_scale=cfg.crop_scale)
        enc.append(np.frombuffer(_member(shards, entries[key], "webm"), np.uint8))
        frames.append(plan.frames)
        starts.append(plan.roi_start)
        ends.append(plan.roi_end)
        flips.append(np.array(int(plan.flip), np.int32))
    pipe = build_video_pipeline(one_batch_source((enc, frames, starts, ends, flips)),
                                batch_size=len(enc), img_size=cfg.img_size, prefetch=1)
    (out,) = pipe.run()
    return dali_to_torch(out).clone()


@pytest.mark.parametrize("feed_workers", [0, 1, 2])
def test_one_pipeline_for_three_epochs_and_eval_passes(vp9_shards, builds, feed_workers):
    cfg = data_cfg(vp9_shards, batch_size=3, random_flip=True, feed_workers=feed_workers)
    loader = build_dali_loader(cfg, "train", train=True, seed=3, device="cpu")
    pyav = build_pyav_loader(cfg, "train", train=True, seed=3)
    assert loader.feed_workers == feed_workers and builds == []  # built at the first batch
    handed = 0
    for epoch in range(3):
        batches = list(loader)
        assert [b["keys"] for b in batches] == [b["keys"] for b in pyav]
        for b in batches:
            ref = reference_video(vp9_shards, b, cfg, train=True, seed=3, epoch=epoch)
            assert torch.equal(b["video"], ref)  # this epoch's draws, decoded the same way
        handed += len(batches)
        assert loader.state_dict() == {"epoch": epoch + 1, "cursor": 0, "seed": 3,
                                       "num_samples": 12}
    assert builds == [3]
    stats = loader.stats()
    assert stats["pipeline_builds"] == 1 and stats["batches"] == handed == 12
    assert stats["dropped_batches"] == 0  # every epoch was the one the sequence planned

    # an evaluation loader: every pass through its own single pipeline, the same batches
    ev = build_dali_loader(cfg, "val", train=False, device="cpu")
    passes = [list(ev) for _ in range(3)]
    assert builds == [3, 4]
    assert ev.stats()["pipeline_builds"] == 1 and ev.stats()["batches"] == 9
    for b0, b1, b2 in zip(*passes):
        assert b0["keys"] == b1["keys"] == b2["keys"]
        assert torch.equal(b0["video"], b2["video"])
        assert torch.equal(b1["video"], reference_video(vp9_shards, b1, cfg, train=False,
                                                        seed=0, epoch=0))


def test_a_pass_from_elsewhere_drops_what_is_in_flight(vp9_shards, builds):
    """Stopping mid-pass and going on keeps the batches in flight; a state loaded from
    elsewhere (and a set_epoch to another epoch) drops them: the pipeline stays."""
    cfg = data_cfg(vp9_shards, batch_size=2, feed_workers=2)  # 6 steps per epoch
    full = {e: [b["keys"] for b in build_pyav_loader(cfg, "train", train=True, seed=7, epoch=e)]
            for e in (0, 2)}
    loader = build_dali_loader(cfg, "train", train=True, seed=7, device="cpu")
    head = [b["keys"] for b in itertools.islice(iter(loader), 2)]
    rest = [b["keys"] for b in loader]  # continues at the cursor: what was in flight is used
    assert head + rest == full[0]
    assert loader.stats()["dropped_batches"] == 0

    ref = build_pyav_loader(cfg, "train", train=True, seed=7)
    ref.load_state_dict({"epoch": 2, "cursor": 6, "seed": 7, "num_samples": 12})
    ref_batches = list(ref)
    loader.load_state_dict({"epoch": 2, "cursor": 6, "seed": 7, "num_samples": 12})
    got = list(loader)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref_batches] == full[2][3:]
    for b in got:
        assert torch.equal(b["video"], reference_video(vp9_shards, b, cfg, train=True, seed=7,
                                                       epoch=2))
    assert loader.stats()["dropped_batches"] > 0
    loader.set_epoch(5)
    assert [b["keys"] for b in loader] == [b["keys"] for b in build_pyav_loader(
        cfg, "train", train=True, seed=7, epoch=5)]
    assert builds == [2] and loader.stats()["pipeline_builds"] == 1
    # one pass at a time: a second iterator takes the pipeline over, the first one says so
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(first)
    assert len(list(second)) == 4  # steps 2..5 of the epoch (each iterator took one)


@pytest.mark.parametrize("feed_workers", [1, 2])
def test_resume_mid_epoch_in_a_new_loader(vp9_shards, feed_workers):
    cfg = data_cfg(vp9_shards, batch_size=2, feed_workers=feed_workers)
    full = list(build_dali_loader(cfg, "train", train=True, seed=4, device="cpu"))
    first = build_dali_loader(cfg, "train", train=True, seed=4, device="cpu")
    head = list(itertools.islice(iter(first), 3))
    resumed = build_dali_loader(cfg, "train", train=True, seed=0, device="cpu")
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(head + list(resumed), full, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["video"], b["video"])


def test_quarantine_event_is_the_only_rebuild(tmp_path, builds):
    shards = make_shards(tmp_path / "shards", 10, corrupt=(5,))
    cfg = data_cfg(shards)  # eval batches of 4: the second holds the corrupt sample
    loader = build_dali_loader(cfg, "val", train=False, device="cpu")
    first = list(loader)
    assert loader.failures == {"decode_error": 1}
    assert [s["key"] for s in loader.quarantine.samples] == ["clip_0005"]
    assert builds == [4, 4] and loader.stats()["pipeline_builds"] == 2
    second = list(loader)  # the culprit is never fed again: no new event, no new pipeline
    assert builds == [4, 4] and loader.stats()["pipeline_builds"] == 2
    pyav = [b["keys"] for b in build_pyav_loader(cfg, "val", train=False)]
    assert [b["keys"] for b in first] == [b["keys"] for b in second] == pyav
    assert "clip_0005" not in {k for b in first for k in b["keys"]}


def test_stats_and_measure_helpers(vp9_shards):
    cfg = data_cfg(vp9_shards, batch_size=3)
    loader = build_dali_loader(cfg, "train", train=True, seed=1, device="cpu")
    zero = loader.stats()
    assert STATS_KEYS <= set(zero) and zero["pipeline_builds"] == 0 and zero["batches"] == 0
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    s = loader.stats()
    assert s["batches"] == 2 and s["pipeline_builds"] == 1
    # every batch is prepared (read + plan + hand-over, some CPU) before it is decoded; a
    # video sample is two reads (its JSON and its video member)
    assert 0 < s["feed_ms_per_batch"] < 1e4 and s["decode_wait_ms_per_batch"] >= 0
    assert s["reads_per_clip"] == 2.0
    assert measure.feed_rate(loader, 0.3) > 0
    assert measure.measure_feed(loader, 0.3, workers=2)["clips_per_s"] > 0
    assert measure.decode_only_rate(loader, 0.3, batches=2) > 0
    # the helpers neither move the loader nor count their own pipelines
    assert loader.state_dict() == state and loader.stats()["pipeline_builds"] == 1
    rest = list(it)
    assert len(rest) == 2 and loader.stats()["batches"] == 4


def test_bad_samples_found_in_feed_workers(tmp_path, caplog):
    """Samples DALI cannot decode (clip_0003, clip_0007) and samples a cut tar truncates (the
    last tar cut inside clip_0010's video: 10 and 11), found by feed workers and by the
    in-process feed: the same batches, counts, log lines and quarantine as the PyAV loader's
    batches and the cut's reference (the index offsets)."""
    from megavid.shards.format import read_index as index_of

    shards = make_shards(tmp_path / "shards", 12, corrupt=(3, 7))
    entries = {e["key"]: e for e in index_of(shards)}
    offset, size = entries["clip_0010"]["members"]["webm"]
    with open(shards / entries["clip_0010"]["shard"], "r+b") as f:
        f.truncate(offset + size // 2)
    ref = {"clip_0003": "decode_error", "clip_0007": "decode_error",
           "clip_0010": "truncated_shard", "clip_0011": "truncated_shard"}
    runs = {}
    for fw in (0, 2):
        caplog.clear()
        cfg = data_cfg(shards, batch_size=2, feed_workers=fw)
        loader = build_dali_loader(cfg, "train", train=True, seed=5, device="cpu")
        with caplog.at_level("WARNING", logger="megavid.data"):
            runs[fw] = [list(loader), list(loader)]  # two epochs
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("skipped sample ")]
        assert sorted(ln.split()[2] for ln in lines) == sorted(ref)  # once each, 2 epochs
        assert loader.failures == {"decode_error": 4, "truncated_shard": 4}  # once per epoch
        assert {s["key"]: s["reason"] for s in loader.quarantine.samples} == ref
        for epoch in runs[fw]:
            assert all(len(set(b["keys"])) == len(b["keys"]) for b in epoch)
            assert not {k for b in epoch for k in b["keys"]} & set(ref)
        loader.close()
    pyav = build_pyav_loader(data_cfg(shards, batch_size=2), "train", train=True, seed=5)
    reference = [[b["keys"] for b in pyav], [b["keys"] for b in pyav]]
    for fw, epochs in runs.items():
        assert [[b["keys"] for b in e] for e in epochs] == reference, fw
    for a, b in zip(runs[0][1], runs[2][1], strict=True):
        assert torch.equal(a["video"], b["video"])


def test_auto_feed_workers_use_the_cores_dali_leaves(vp9_shards, monkeypatch):
    cfg = data_cfg(vp9_shards, num_workers=2)  # 2 DALI threads; data.feed_workers=-1 (auto)
    for cores, cpu, mixed in [(2, 0, 0), (3, 0, 0), (4, 1, 1), (5, 1, 2), (16, 1, 2)]:
        monkeypatch.setattr("os.sched_getaffinity", lambda _, n=cores: set(range(n)))
        loader = build_dali_loader(cfg, "train", train=True, device="cpu")
        assert loader.feed_workers == cpu, cores
        loader.device = "mixed"  # the rule for the GPU decoder (no GPU needed to check it)
        assert loader._auto_feed_workers() == mixed, cores
    assert build_dali_loader(data_cfg(vp9_shards, feed_workers=2), "train",
                             train=True).feed_workers == 2
    with pytest.raises(ValueError, match="feed_workers"):
        data_cfg(vp9_shards, feed_workers=-2)


def test_a_dead_feed_worker_is_one_error(vp9_shards):
    cfg = data_cfg(vp9_shards, batch_size=1, feed_workers=1)  # 12 steps
    loader = build_dali_loader(cfg, "train", train=True, device="cpu")
    it = iter(loader)
    next(it)
    loader._stream.feed.procs[0].kill()
    with pytest.raises(DataError, match="DALI feed worker 0"):
        list(it)
    loader.close()


# -------------------------------------------------------------------------------------------
# Frames shards: the frames of a clip read with one pread
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames_shards(tmp_path_factory) -> Path:
    """12 frames samples (10 JPEGs of 64x48 at 5 fps each) in 3 tars of 4."""
    d = tmp_path_factory.mktemp("frames") / "shards"
    samples = []
    for i in range(12):
        key = f"fr_{i:04d}"
        members = {}
        for t, rgb in enumerate(render(i, 10, 64, 48)):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
            members[get_frame_ext(t)] = buf.getvalue()
        meta = {"key": key, "captions": [f"frames sample {i}", f"another caption {i}"],
                "duration": 2.0, "fps": 5.0, "num_frames": 10, "width": 64, "height": 48,
                "codec": "jpeg", "format": "frames", "start": None, "end": None,
                "frame_times": [t / 5 for t in range(10)]}
        samples.append(ShardSample(key=key, video=b"", ext="", meta=meta, members=members))
    write_shards(samples, d, max_count=4)
    return d


def reference_frames(shards: Path, batch: dict, cfg, *, seed: int, epoch: int,
                     train: bool = True) -> torch.Tensor:
    entries = _entries(shards)
    jpegs, starts, ends, flips = [], [], [], []
    for key, index, meta in zip(batch["keys"], batch["indices"].tolist(), batch["meta"]):
        plan = plan_clip(meta, index, num_frames=cfg.num_frames, img_size=cfg.img_size,
                         train=train, seed=seed, epoch=epoch, random_flip=cfg.random_flip)
        _, stored = sample_clip_frames(meta, index, num_frames=cfg.num_frames, train=train,
                                       seed=seed, epoch=epoch)
        for t in stored.tolist():
            jpegs.append(np.frombuffer(_member(shards, entries[key], get_frame_ext(t)), np.uint8))
            starts.append(plan.roi_start)
            ends.append(plan.roi_end)
            flips.append(np.array(int(plan.flip), np.int32))
    pipe = build_frames_pipeline(one_batch_source((jpegs, starts, ends, flips)),
                                 batch_size=len(jpegs), img_size=cfg.img_size, prefetch=1)
    (out,) = pipe.run()
    frames = dali_to_torch(out).clone()
    return frames.view(len(batch["keys"]), cfg.num_frames, *frames.shape[1:])


@pytest.mark.parametrize("feed_workers,max_gap", [(0, None), (2, None), (1, 0)],
                         ids=["inline", "2workers", "frame_by_frame"])
def test_frames_loader_one_read_per_clip(frames_shards, builds, monkeypatch, feed_workers,
                                         max_gap):
    if max_gap is not None:  # every frame read apart (the sparse-clip path)
        monkeypatch.setattr(image_loaders, "MAX_GAP_BYTES", max_gap)
    cfg = data_cfg(frames_shards, batch_size=3, random_flip=True, feed_workers=feed_workers)
    loader = build_dali_loader(cfg, "train", train=True, seed=2, device="cpu")
    assert isinstance(loader, FramesDaliLoader)
    pyav = build_pyav_loader(cfg, "train", train=True, seed=2)
    for epoch in range(2):
        batches = list(loader)
        assert [b["keys"] for b in batches] == [b["keys"] for b in pyav]
        for b in batches:
            assert torch.equal(b["video"], reference_frames(frames_shards, b, cfg, seed=2,
                                                            epoch=epoch))
    assert builds == [3] and loader.stats()["pipeline_builds"] == 1
    # evaluation takes the segment centres: 0.25, 0.75, 1.25 and 1.75 s at 5 fps are stored
    # frames 1, 3, 6 and 8, 1 KB or so apart
    ev = build_dali_loader(cfg, "val", train=False, device="cpu")
    for b in ev:
        assert torch.equal(b["video"], reference_frames(frames_shards, b, cfg, seed=0, epoch=0,
                                                        train=False))
    # the JSON, then the clip's frames in one read; or one read per frame
    assert ev.stats()["reads_per_clip"] == (2.0 if max_gap is None else 5.0)
