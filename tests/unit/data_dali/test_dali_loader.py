"""The DALI loader (CPU pipeline, real VP9 shards) against the PyAV loader and hand-made
references: same samples, captions, frame indices and (within tolerance) pixels; world-size
independent coverage and resume; the corrupt-sample quarantine; mixed decode on a GPU."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch

from tests.helpers.dali_shards import NUM_FRAMES, data_cfg

pytest.importorskip("nvidia.dali")

from megavid.data.build import select_backend  # noqa: E402
from megavid.data.dali.backend import build_dali_loader  # noqa: E402
from megavid.data.dali.devices import get_dali_device, get_shard_codec  # noqa: E402
from megavid.data.dali.loader import DaliLoader  # noqa: E402
from megavid.data.dali.plan import plan_clip  # noqa: E402
from megavid.data.dali.quarantine import Quarantine  # noqa: E402
from megavid.data.dali.readers import iter_dali_reader  # noqa: E402
from megavid.data.loader import build_pyav_loader  # noqa: E402
from megavid.errors import DataError  # noqa: E402

# Mean |DALI - PyAV| in uint8 over a batch of clips of the same frames: the two resamplers
# (DALI's antialiased linear ROI resize vs torch's antialiased bilinear interpolate) and the
# two YUV->RGB conversions differ by a level or two on smooth content. Measured ~1.4; one
# frame off (6 brightness levels per frame in these videos, plus the moving bar) gives > 5.
MAX_MEAN_ABS_DIFF = 3.0


def _pairs(dali_loader, pyav_loader):
    d, p = list(dali_loader), list(pyav_loader)
    assert len(d) == len(p) == len(dali_loader) == len(pyav_loader)
    return list(zip(d, p))


def _frame_diffs(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[T, T] mean |a[i] - b[j]| of two clips [T, C, H, W]."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return (a[:, None] - b[None]).abs().mean(-1).numpy()


@pytest.mark.parametrize("train,crop_scale", [(False, (0.5, 1.0)), (True, (0.5, 1.0)), (True, (0.2, 0.3))],
                         ids=["eval", "train", "train_small_crops"])
def test_same_samples_frames_and_pixels_as_pyav(vp9_shards, train, crop_scale):
    cfg = data_cfg(vp9_shards, random_flip=True, crop_scale=crop_scale)
    dali = build_dali_loader(cfg, "train", train=train, seed=3, epoch=1, device="cpu")
    pyav = build_pyav_loader(cfg, "train", train=train, seed=3, epoch=1)
    for bd, bp in _pairs(dali, pyav):
        assert bd["keys"] == bp["keys"]
        assert bd["captions"] == bp["captions"]
        assert torch.equal(bd["input_ids"], bp["input_ids"])
        assert torch.equal(bd["attention_mask"], bp["attention_mask"])
        assert torch.equal(bd["valid"], bp["valid"]) and torch.equal(bd["indices"], bp["indices"])
        assert bd["meta"] == bp["meta"]
        assert bd["video"].dtype == torch.uint8 and bd["video"].device.type == "cpu"
        assert bd["video"].shape == bp["video"].shape == (len(bd["keys"]), 4, 3, 32, 32)
        mad = (bd["video"].float() - bp["video"].float()).abs().mean().item()
        assert mad < MAX_MEAN_ABS_DIFF, mad
        for cd, cp in zip(bd["video"], bp["video"]):
            # each DALI frame is nearest to the PyAV frame at the same position: same indices
            # (a train clip may hold one frame twice, hence ties rather than argmin)
            diffs = _frame_diffs(cd, cp)
            assert (np.diag(diffs) <= diffs.min(1)).all(), diffs


def test_eval_frame_indices_are_segment_centres():
    """Hand-computed: 20 frames at 10 fps (2 s), 4 segments of 0.5 s, centres 0.25..1.75 s ->
    the frames on screen then, 2, 7, 12, 17; a [0.2, 1.6] window: centres 0.375, 0.725, 1.075,
    1.425 -> 3, 7, 10, 14."""
    meta = {"key": "k", "duration": 2.0, "fps": 10.0, "num_frames": 20, "width": 96,
            "height": 64, "captions": ["a"]}
    plan = plan_clip(meta, 0, num_frames=4, img_size=32, train=False, seed=0, epoch=0)
    assert plan.frames.tolist() == [2, 7, 12, 17]
    # short side 64 -> 32: width 96 -> 48, centre crop 32 -> columns 8..40 of 48 = 16..80 of 96
    assert plan.roi_start.tolist() == [0.0, 16.0] and plan.roi_end.tolist() == [64.0, 80.0]
    windowed = plan_clip(dict(meta, start=0.2, end=1.6), 0, num_frames=4, img_size=32,
                         train=False, seed=0, epoch=0)
    assert windowed.frames.tolist() == [3, 7, 10, 14]
    # data.crop_scale reaches the train box: areas in the range, [1, 1] is the whole frame
    # (a 96x64 frame has aspect 1.5 > 4/3: torchvision's fallback is the centre 85x64 box)
    for index in range(20):
        small = plan_clip(meta, index, num_frames=4, img_size=32, train=True, seed=0, epoch=0,
                          crop_scale=(0.2, 0.3))
        area = float(np.prod(small.roi_end - small.roi_start)) / (96 * 64)
        assert 0.18 <= area <= 0.32, area
        full = plan_clip(meta, index, num_frames=4, img_size=32, train=True, seed=0, epoch=0,
                         crop_scale=(1.0, 1.0))
        assert full.roi_start.tolist() == [0.0, 5.0] and full.roi_end.tolist() == [64.0, 90.0]


def test_decoded_frames_are_the_planned_ones(vp9_shards):
    """DALI's output frame t matches PyAV's full decode of frame plan.frames[t], resized with
    the same box, better than any neighbouring frame (independent of the loader code)."""
    from megavid.data.transforms import resize
    from megavid.shards.format import read_index, read_sample

    cfg = data_cfg(vp9_shards, img_size=32)
    loader = build_dali_loader(cfg, "train", train=True, seed=5, device="cpu")
    batch = next(iter(loader))
    entries = {e["key"]: e for e in read_index(vp9_shards)}
    for clip, key, meta, index in zip(batch["video"], batch["keys"], batch["meta"],
                                      batch["indices"].tolist()):
        video, _ = read_sample(vp9_shards, entries[key])
        with av.open(io.BytesIO(video)) as c:
            full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert len(full) == NUM_FRAMES
        plan = plan_clip(meta, index, num_frames=4, img_size=32, train=True, seed=5, epoch=0)
        (y0, x0), (y1, x1) = plan.roi_start.astype(int), plan.roi_end.astype(int)
        ref = resize(torch.from_numpy(full[:, y0:y1, x0:x1]).permute(0, 3, 1, 2), (32, 32))
        if plan.flip:
            ref = ref.flip(-1)
        diffs = _frame_diffs(clip, ref)  # [4, 20]
        assert diffs.argmin(1).tolist() == plan.frames.tolist(), diffs.round(1)
        assert diffs.min(1).max() < MAX_MEAN_ABS_DIFF


def test_two_ranks_cover_the_epoch_once(vp9_shards):
    cfg = data_cfg(vp9_shards)  # 12 samples, batch 3 x 2 ranks -> 2 steps, nothing dropped
    keys = {}
    for rank in range(2):
        loader = build_dali_loader(cfg, "train", train=True, rank=rank, world_size=2, seed=1,
                                   device="cpu")
        pyav = build_pyav_loader(cfg, "train", train=True, rank=rank, world_size=2, seed=1)
        keys[rank] = [k for b in loader for k in b["keys"]]
        assert keys[rank] == [k for b in pyav for k in b["keys"]]
        assert len(loader) == 2 and loader.state_dict()["epoch"] == 1
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"clip_{i:04d}" for i in range(12)]

    # eval with 2 ranks and a short last step: every sample exactly once among valid entries
    cfg = data_cfg(vp9_shards, eval_batch_size=5)
    valid_keys = []
    for rank in range(2):
        loader = build_dali_loader(cfg, "val", train=False, rank=rank, world_size=2,
                                   device="cpu")
        for b in loader:
            valid_keys += [k for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert sorted(valid_keys) == [f"clip_{i:04d}" for i in range(12)]


def test_resume_on_another_world_size_neither_repeats_nor_skips(vp9_shards):
    cfg = data_cfg(vp9_shards, batch_size=2)  # 12 samples
    full = build_dali_loader(cfg, "train", train=True, seed=7, device="cpu")
    reference = {k: v for b in full for k, v in zip(b["keys"], b["video"])}
    assert len(reference) == 12

    first = build_dali_loader(cfg, "train", train=True, seed=7, device="cpu")
    it = iter(first)
    seen = [k for _ in range(2) for k in next(it)["keys"]]  # 2 of 6 steps
    state = first.state_dict()
    assert state == {"epoch": 0, "cursor": 4, "seed": 7, "num_samples": 12}
    json.dumps(state)  # checkpointable as is

    rest = []
    for rank in range(2):  # resume with 2 ranks of batch 2: 2 more global steps
        loader = build_dali_loader(cfg, "train", train=True, rank=rank, world_size=2, seed=0,
                                   device="cpu")
        loader.load_state_dict(state)
        loader.set_epoch(0)  # a trainer calls this; it must keep the restored cursor
        for b in loader:
            for k, clip in zip(b["keys"], b["video"]):
                rest.append(k)
                # the same sample decodes to the same frames and crop after resuming
                assert torch.equal(clip, reference[k]), k
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["cursor"] == 0
    assert sorted(seen + rest) == sorted(reference)


def test_switching_backend_on_resume_and_wrapping_tail(vp9_shards):
    """A PyAV loader's state resumes in the DALI loader (same state dict, same positions); with
    drop_last off the last train step wraps around the permutation in both backends."""
    cfg = data_cfg(vp9_shards, batch_size=5, drop_last=False)  # 12 samples: 3 steps, wraps 3
    pyav = build_pyav_loader(cfg, "train", train=True, seed=4)
    it = iter(pyav)
    first = next(it)["keys"]
    state = pyav.state_dict()
    del it
    dali = build_dali_loader(cfg, "train", train=True, seed=4, device="cpu")
    dali.load_state_dict(state)
    rest = [b["keys"] for b in dali]
    reference = [b["keys"] for b in build_pyav_loader(cfg, "train", train=True, seed=4)]
    assert [first] + rest == reference
    flat = [k for b in reference for k in b]
    assert len(flat) == 15 and sorted(set(flat)) == [f"clip_{i:04d}" for i in range(12)]


def test_corrupt_sample_is_named_quarantined_and_skipped(corrupt_shards, tmp_path):
    from megavid.shards.format import read_index, read_sample
    from megavid.shards.ingest.probe import VideoProbeError, probe_video

    entries = {e["key"]: e for e in read_index(corrupt_shards)}
    # independent reference: PyAV cannot decode the two corrupt members either
    for key in ("clip_0003", "clip_0007"):
        with pytest.raises(VideoProbeError):
            probe_video(read_sample(corrupt_shards, entries[key])[0])

    qpath = tmp_path / "run" / "quarantine.json"
    cfg = data_cfg(corrupt_shards, quarantine=str(qpath))
    loader = build_dali_loader(cfg, "val", train=False, device="cpu")  # batches of 4, in order
    batches = list(loader)
    assert dict(loader.failures) == {"decode_error": 2}
    q = json.loads(qpath.read_text())["samples"]
    assert [(s["shard"], s["key"], s["reason"]) for s in q] == [
        (entries["clip_0003"]["shard"], "clip_0003", "decode_error"),
        (entries["clip_0007"]["shard"], "clip_0007", "decode_error")]
    shards = {entries["clip_0003"]["shard"], entries["clip_0007"]["shard"]}
    assert shards == {"00000.tar", "00001.tar"}
    assert all(s["detail"] for s in q)  # DALI's message is kept
    valid = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert sorted(valid) == [f"clip_{i:04d}" for i in range(10) if i not in (3, 7)]
    # eval stand-ins fill the batch but are not valid; they are samples from outside the
    # batch, the ones the PyAV loader picks (the same rule: loader docstring, "Faults")
    assert [len(b["keys"]) for b in batches] == [4, 4, 2]
    assert batches[0]["keys"][:3] == ["clip_0000", "clip_0001", "clip_0002"]
    assert batches[0]["keys"][3] not in ("clip_0000", "clip_0001", "clip_0002", "clip_0003",
                                         "clip_0007")
    assert batches[0]["valid"].tolist() == [True, True, True, False]
    assert all(len(set(b["keys"])) == len(b["keys"]) for b in batches)
    pyav = list(build_pyav_loader(cfg, "val", train=False))
    assert [b["keys"] for b in pyav] == [b["keys"] for b in batches]
    assert [b["valid"].tolist() for b in pyav] == [b["valid"].tolist() for b in batches]

    # a new loader reads the quarantine and never feeds the culprits to DALI again; it still
    # counts them (bad samples its pass met), once each
    again = build_dali_loader(cfg, "val", train=False, device="cpu")
    again._decode_alone = lambda *a: pytest.fail("a quarantined sample was decoded again")
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert dict(again.failures) == {"decode_error": 2}
    assert len(Quarantine(qpath)) == 2


def test_too_many_failures_in_a_row_abort(corrupt_shards):
    cfg = data_cfg(corrupt_shards, max_consecutive_failures=1)
    with pytest.raises(DataError, match="in a row"):
        list(build_dali_loader(cfg, "val", train=False, device="cpu"))


def test_backend_choice_and_codec_errors(vp9_shards, h264_shards):
    assert get_shard_codec(vp9_shards) == "vp9" and get_shard_codec(h264_shards) == "h264"
    # the auto policy's video numbers on a GPU (bench/results/loader_gpu_nvidia-h200.md, 16
    # cores): PyAV 56.8 clips/s (3.55 per core), DALI mixed 19.6 per GPU, DALI cpu 36.6
    gpu = dict(has_dali=True, has_cuda=True)
    assert select_backend("h264", **gpu, cpu_cores=16, num_gpus=1)[:2] == ("pyav", "")  # 56.8
    assert select_backend("h264", **gpu, cpu_cores=16, num_gpus=8)[:2] == ("dali", "mixed")  # 7.1
    assert select_backend("vp9", **gpu, cpu_cores=4, num_gpus=2)[:2] == ("dali", "mixed")  # 7.1
    assert select_backend("vp9", **gpu, cpu_cores=10, num_gpus=2)[:2] == ("dali", "mixed")  # 17.8
    assert select_backend("vp9", **gpu, cpu_cores=12, num_gpus=2)[:2] == ("pyav", "")  # 21.3
    assert select_backend("prores", **gpu, cpu_cores=1, num_gpus=8)[:2] == ("pyav", "")
    assert select_backend("h264", has_dali=True, has_cuda=False)[:2] == ("pyav", "")
    assert select_backend("vp9", has_dali=True, has_cuda=False)[:2] == ("pyav", "")
    assert select_backend("vp9", has_dali=False, has_cuda=True, cpu_cores=1)[:2] == ("pyav", "")
    # decord is never auto's choice (same FFmpeg decode, no faster per core: bench/loader.py);
    # where it is installed the reason says how to select it
    with_decord = select_backend("h264", has_dali=True, has_cuda=False, has_decord=True)
    without = select_backend("h264", has_dali=True, has_cuda=False, has_decord=False)
    assert with_decord[:2] == without[:2] == ("pyav", "")
    assert "data.backend=decord" in with_decord[2] and "decord" not in without[2]
    assert "decord" not in select_backend("h264", has_dali=True, has_cuda=True, cpu_cores=1,
                                          num_gpus=8, has_decord=True)[2]  # DALI mixed wins
    assert get_dali_device("vp9", "cpu") == "cpu"
    with pytest.raises(DataError, match="data.backend=pyav"):
        get_dali_device("h264", "cpu")
    with pytest.raises(DataError, match="data.backend=pyav"):
        build_dali_loader(data_cfg(h264_shards), "train", train=True, device="cpu")
    # data.dali_device picks the decoder (the tests pin "cpu"); asking for the GPU without
    # one names the setting that fixes it
    mixed = data_cfg(vp9_shards, dali_device="mixed")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA"):
            get_dali_device("h264", "mixed")
        with pytest.raises(DataError, match="data.dali_device=cpu"):
            build_dali_loader(mixed, "train", train=True)
    else:
        assert build_dali_loader(mixed, "train", train=True).device == "mixed"
    assert build_dali_loader(data_cfg(vp9_shards), "train", train=True).device == "cpu"


def test_loader_built_through_build_loader(vp9_shards):
    from megavid.data.build import build_loader

    loader = build_loader(data_cfg(vp9_shards, backend="dali"), "train", train=True)
    assert isinstance(loader, DaliLoader) and len(loader) == 4


def test_dali_webdataset_reader_reads_the_idx_files_two_ranks(vp9_shards):
    """fn.readers.webdataset with the shards' NNNNN.idx and shard_id/num_shards: the two
    ranks' contiguous ranges cover every sample once, with the bytes index.jsonl points at."""
    from megavid.shards.format import read_index, read_sample

    entries = read_index(vp9_shards)
    got = [[(m, v) for m, v in iter_dali_reader(vp9_shards, shard_id=r, num_shards=2,
                                                 batch_size=4)] for r in range(2)]
    assert [m["key"] for m, _ in got[0]] == [e["key"] for e in entries[:6]]
    assert [m["key"] for m, _ in got[1]] == [e["key"] for e in entries[6:]]
    for (meta, video), entry in zip(got[0] + got[1], entries):
        ref_video, ref_meta = read_sample(vp9_shards, entry)
        assert video == ref_video and meta == ref_meta


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_decode_of_h264_matches_pyav(h264_shards):
    cfg = data_cfg(h264_shards, batch_size=4)
    dali = build_dali_loader(cfg, "train", train=True, seed=2, device="mixed")
    pyav = build_pyav_loader(cfg, "train", train=True, seed=2)
    for bd, bp in _pairs(dali, pyav):
        assert bd["video"].is_cuda and bd["keys"] == bp["keys"]
        video = bd["video"].cpu()
        mad = (video.float() - bp["video"].float()).abs().mean().item()
        assert mad < MAX_MEAN_ABS_DIFF, mad
        for cd, cp in zip(video, bp["video"]):
            diffs = _frame_diffs(cd, cp)
            assert (np.diag(diffs) <= diffs.min(1)).all(), diffs
