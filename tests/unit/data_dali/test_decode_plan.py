"""The decode plan: one scan of the shard folder, one decision, handed to the backend.

Oracles: call counters on ``list_shards`` and on every ``open()`` of an ``index.jsonl`` (a build
reads each once); the shard kind and codec each fixture was written with; the expected paths of
the policy derived by hand from the numbers of the cited ``bench/results`` files (comments);
those files themselves, parsed here, for every number of ``AUTO_POLICY``.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megavid.data import build
from megavid.data.build import AUTO_POLICY, get_decode_plan, plan_decode, scan_shards
from megavid.shards import format as shard_format
from tests.helpers.dali_shards import data_cfg

REPO = Path(__file__).resolve().parents[3]

MACHINES = {
    "cpu": dict(has_dali=True, has_cuda=False, cpu_cores=2),
    "gpu, 16 cores": dict(has_dali=True, has_cuda=True, cpu_cores=16, num_gpus=1),
    "gpu, 2 cores": dict(has_dali=True, has_cuda=True, cpu_cores=2, num_gpus=1),
    "gpu, no dali": dict(has_dali=False, has_cuda=True, cpu_cores=2, num_gpus=1),
}
EXPECTED = {
    # no GPU, per CPU-second (loader_cpu-2core.md): PyAV 5.54 > DALI cpu 4.95 on vp9, and DALI
    # cpu cannot read h264; PIL 44.40 > DALI cpu 31.45 on JPEG frames (images follow frames).
    # GPU, 16 cores (loader_gpu_nvidia-h200.md): PyAV 56.8 > DALI cpu 36.6 > DALI mixed 19.6 on
    # video; PIL 182.1 > DALI cpu 130.0 > DALI mixed 50.7 on frames.
    # GPU, 2 cores: the CPU paths scale to 2/16 of those (7.1, 4.6; 22.8, 16.3), below mixed.
    ("video", "vp9"): {"cpu": "pyav", "gpu, 16 cores": "pyav", "gpu, 2 cores": "dali-mixed",
                       "gpu, no dali": "pyav"},
    ("video", "h264"): {"cpu": "pyav", "gpu, 16 cores": "pyav", "gpu, 2 cores": "dali-mixed",
                        "gpu, no dali": "pyav"},
    ("images", "image"): {"cpu": "pyav", "gpu, 16 cores": "pyav", "gpu, 2 cores": "dali-mixed",
                          "gpu, no dali": "pyav"},
}


@pytest.fixture
def scan_counts(monkeypatch) -> Counter:
    """Counts ``list_shards`` calls (wherever a megavid module imported it) and ``open()``s of
    an ``index.jsonl`` (``read_index``, ``is_frames_shard_dir``, ``is_image_split``, ...)."""
    counts: Counter = Counter()
    original = shard_format.list_shards

    def list_shards(*args, **kwargs):
        counts["list_shards"] += 1
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("megavid") and getattr(module, "list_shards", None) is original:
            monkeypatch.setattr(module, "list_shards", list_shards)
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if os.path.basename(str(file)) == "index.jsonl":
            counts["index.jsonl"] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return counts


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord", "dali"])
@pytest.mark.parametrize("kind", ["video", "images"])
def test_a_build_scans_the_shards_once(kind, backend, vp9_shards, image_shards, scan_counts):
    """Before: an auto build listed the shards 3 times and opened index.jsonl 3 times (video),
    a dali build 3 and 4 times; frames shards (tests/unit/data_frames) 5 and 6."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    if backend == "decord":
        pytest.importorskip("decord")
    shards = vp9_shards if kind == "video" else image_shards
    loader = build.build_loader(data_cfg(shards, backend=backend, dali_device="auto"), "train",
                                train=True)
    assert dict(scan_counts) == {"list_shards": 1, "index.jsonl": 1}
    assert len(loader.table) == (12 if kind == "video" else 10)


def test_the_dali_device_is_decided_once(vp9_shards, monkeypatch):
    """The loader gets the plan's device: DALI's own 'auto' resolution never runs."""
    pytest.importorskip("nvidia.dali")
    from megavid.data.dali import devices

    requested = []
    resolve = devices._resolve_device

    def record(device, **kwargs):
        requested.append(device)
        return resolve(device, **kwargs)

    monkeypatch.setattr(devices, "_resolve_device", record)
    cfg = data_cfg(vp9_shards, backend="dali", dali_device="auto")
    loader = build.build_loader(cfg, "train", train=True)
    plan = get_decode_plan(cfg, "train")
    assert requested == [plan.device] and loader.device == plan.device
    assert plan.device == ("mixed" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("fixture,kind,codec", [("vp9_shards", "video", "vp9"),
                                                ("h264_shards", "video", "h264"),
                                                ("image_shards", "images", "image")])
def test_plan_follows_the_policy_table(fixture, kind, codec, request):
    shards = request.getfixturevalue(fixture)
    scan = scan_shards(str(shards))
    assert (scan.shard_kind, scan.codec) == (kind, codec)  # what the fixture wrote
    for machine, expected in EXPECTED[(kind, codec)].items():
        plan = get_decode_plan(data_cfg(shards, dali_device="auto"), "train", **MACHINES[machine])
        assert (plan.shard_kind, plan.codec, plan.path) == (kind, codec, expected), machine
        # the reason names the file it rests on and the numbers it compared
        m = AUTO_POLICY[("video" if kind == "video" else "frames", MACHINES[machine]["has_cuda"])]
        assert plan.source == m.source and m.source in plan.reason
        assert all(f"= {row.rate:g}" in plan.reason for row in m.rows)
    # a named backend is taken as it is, whatever the table says
    plan = get_decode_plan(data_cfg(shards, backend="dali", dali_device="cpu"), "train")
    assert (plan.backend, plan.device, plan.source) == ("dali", "cpu", "data.backend=dali")
    # data.dali_device restricts auto's DALI paths: on 2 cores per GPU mixed would win
    plan = plan_decode(kind, codec, dali_device="cpu", **MACHINES["gpu, 2 cores"])
    assert plan.path == "pyav" and "data.dali_device=cpu" in plan.reason


def _file_row(source: str, row: str) -> list[float]:
    """The numbers of the first table row of ``source`` that starts with ``row``'s cells."""
    for line in (REPO / source).read_text().splitlines():
        if line.startswith(f"| {row} |"):
            cells = [c.strip() for c in line.strip("|").split("|")][len(row.split(" | ")):]
            return [float(c) for c in cells if re.fullmatch(r"[0-9.]+", c)]
    raise AssertionError(f"{source} has no row {row!r}")


def test_every_policy_number_is_in_its_file():
    for (kind, gpu), m in AUTO_POLICY.items():
        assert m.source.startswith("bench/results/") and (REPO / m.source).is_file()
        for row in m.rows:
            numbers = _file_row(m.source, row.row)
            # the H200 table: clips/s is the first number; the 2-core table: clips per CPU-s
            # is the second (after clips/s; the 'vs decord' ratios end in 'x')
            assert row.rate == (numbers[0] if gpu else numbers[1]), (m.source, row.row)


def test_where_a_gpu_path_measured_slower_auto_takes_the_cpu_path():
    plan = plan_decode("frames", "jpeg", **MACHINES["gpu, 16 cores"])
    assert plan.path == "pyav"
    assert "bench/results/loader_gpu_nvidia-h200.md" in plan.reason
    assert all(n in plan.reason for n in ("182.1", "130", "50.7"))
    assert "re-measured" in plan.reason
    # the boundary: PIL's 182.1 on 16 cores is 11.4 per core, so 4.45 cores per GPU match
    # DALI mixed's 50.7 per GPU
    gpu = dict(has_dali=True, has_cuda=True)
    assert plan_decode("frames", "jpeg", **gpu, cpu_cores=10, num_gpus=2).path == "pyav"
    assert plan_decode("frames", "jpeg", **gpu, cpu_cores=8, num_gpus=2).path == "dali-mixed"


def test_train_build_logs_the_plan(vp9_shards, caplog):
    cfg = data_cfg(vp9_shards, backend="auto")
    plan = get_decode_plan(cfg, "train")
    with caplog.at_level(logging.INFO, logger="megavid"):
        build.build_loader(cfg, "train", train=True)
        build.build_loader(cfg, "val", train=False)  # eval loaders: DEBUG only
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and "decode plan" in r.getMessage()]
    assert infos == [f"decode plan for {vp9_shards} (rank 0): {plan.describe()}"]
    assert plan.source in infos[0] and plan.reason in infos[0]


def test_a_train_spec_mixes_images_as_the_split_name_does(vp9_shards, image_shards):
    """The trainer passes data.train (a spec), not 'train': image mixing applies to both."""
    from megavid.data.mixing import MixedLoader

    cfg = data_cfg(vp9_shards, image_train=str(image_shards), image_ratio=1 / 3)
    for split in ("train", str(vp9_shards)):
        assert isinstance(build.build_loader(cfg, split, train=True), MixedLoader), split
