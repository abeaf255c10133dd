"""`megavid bench-loader` on tiny real VP9 shards, 1 s per measurement.

Oracles: the printed table itself (the best path is recomputed from its clips/s column and the
last line must agree with that row), the JSON printed by the same run (it must equal the
table), the paths this machine can run (DALI, decord, a GPU: what imports and what torch sees),
and the plan of :func:`megavid.data.build.plan_decode` for the shards' kind and codec.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from megavid import cli
from megavid.data import bench
from megavid.data.build import plan_decode
from megavid.data.dali.devices import dali_available
from megavid.data.decord_backend import decord_available
from megavid.errors import ConfigError

SUMMARY = re.compile(r"bench-loader: best=(\S+) clips_per_s=(\S+) feed_clips_per_cpu_s=(\S+) "
                     r"pipeline_builds=(\S+)")


def parse_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """path -> {column: cell} of the report's table."""
    head = next(i for i, line in enumerate(lines) if line.startswith("| path |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


def expected_paths() -> list[str]:
    """What this machine can run on VP9 shards."""
    return (["pyav"] + ["decord"] * decord_available() + ["dali-cpu"] * dali_available()
            + ["dali-mixed"] * (dali_available() and torch.cuda.is_available()))


def test_every_path_measured_best_and_json_match_the_table(vp9_shards, capsys):
    rc = cli.main(["bench-loader", str(vp9_shards), "--seconds", "1", "--batch", "4", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    lines = captured.err.splitlines()  # --json: the text report on stderr, the JSON on stdout
    table = parse_table(lines)
    assert list(table) == expected_paths()
    rates = {p: float(row["clips/s"]) for p, row in table.items()}
    assert all(r > 0 for r in rates.values())
    # the last line parses; best is a measured path with the highest clips/s printed above
    best, clips, feed, builds = SUMMARY.fullmatch(lines[-1]).groups()
    assert best in table and float(clips) == rates[best] == max(rates.values())
    assert (feed, builds) == (table[best]["feed clips/CPU-s"], table[best]["pipeline builds"])
    # PyAV's feed and decode are one call in its worker processes: no stage rates
    assert table["pyav"]["feed clips/CPU-s"] == table["pyav"]["decode-only clips/s"] == "n/a"
    # what auto picks here, as plan_decode says for VP9 video shards
    plan = plan_decode("video", "vp9")
    assert any(line.startswith(f"data.backend=auto picks here: {plan.path}: {plan.reason}")
               for line in lines)
    # the JSON of the same run equals the table
    report = json.loads(captured.out)
    assert report["summary"] == lines[-1] and report["best"] == best
    assert (report["shard_kind"], report["codec"], report["samples"]) == ("video", "vp9", 12)
    assert report["auto"]["path"] == plan.path
    for r in report["paths"]:
        row = table[r["path"]]
        assert r["error"] is None
        assert bench._num(r["clips_per_s"]) == row["clips/s"]
        assert bench._num(r["feed_clips_per_cpu_s"]) == row["feed clips/CPU-s"]
        assert bench._num(r["decode_clips_per_s"]) == row["decode-only clips/s"]
        assert bench._num(r["pipeline_builds"]) == row["pipeline builds"]
        assert (str(r["passes"]), str(r["batches"])) == (row["passes"], row["batches timed"])
        # 12 samples in batches of 4: 3 batches per pass; the first batch is untimed and the
        # last pass may stop early
        assert r["clips"] == 4 * r["batches"]
        assert 3 * r["passes"] - 3 <= r["batches"] <= 3 * r["passes"] - 1
    assert [r["path"] for r in report["paths"]] == list(table)
    if not torch.cuda.is_available():
        assert report["not_measured"]["dali-mixed"] in ("no CUDA GPU", "nvidia-dali is not "
                                                        "installed: pip install megavid[dali]")


def test_one_named_path_text_report(vp9_shards, capsys):
    """--backend auto measures the path auto picks; the report goes to stdout."""
    assert cli.main(["bench-loader", str(vp9_shards), "--backend", "auto", "--seconds", "1",
                     "--batch", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    path = plan_decode("video", "vp9").path
    assert list(parse_table(lines)) == [path]
    assert SUMMARY.fullmatch(lines[-1]).group(1) == path


def test_which_paths():
    plan = plan_decode("video", "h264", has_dali=True, has_cuda=False, cpu_cores=2)
    kw = dict(plan=plan, has_dali=True, has_cuda=False, has_decord=True)
    # h264 on a CPU machine: DALI's CPU decoder cannot, no GPU for mixed
    paths, skipped = bench.get_paths("video", "h264", backend=None, device=None, **kw)
    assert paths == ["pyav", "decord"] and set(skipped) == {"dali-cpu", "dali-mixed"}
    paths, _ = bench.get_paths("video", "vp9", backend="dali", device=None, **kw)
    assert paths == ["dali-cpu"]
    # frames shards: decord would be the pyav path again (PIL)
    paths, skipped = bench.get_paths("frames", "jpeg", backend=None, device=None, **kw)
    assert paths == ["pyav", "dali-cpu"] and "decord" in skipped
    with pytest.raises(ConfigError, match="dali-cpu: it cannot decode h264"):
        bench.get_paths("video", "h264", backend="dali", device="cpu", **kw)


def test_user_errors_are_one_line(vp9_shards, capsys):
    """Nothing is measured: a batch larger than the shards, a path that cannot read them."""
    assert cli.main(["bench-loader", str(vp9_shards), "--batch", "13"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"megavid bench-loader: error: --batch 13 is more than the 12 samples of {vp9_shards}: "
        "a train pass would yield no batch; lower --batch")
    if not torch.cuda.is_available():
        assert cli.main(["bench-loader", str(vp9_shards), "--backend", "dali", "--device",
                         "mixed", "--batch", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "dali-mixed: " in err


def test_time_loader_accounting(monkeypatch):
    """A fake loader on a fake clock (1 s per batch, 3 batches of 2 clips per pass): the first
    batch (t=1) is untimed; 5 s later (t=6) the 5 batches at t=2..6 are in, over 2 passes."""
    clock = [0.0]

    class Loader:
        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                clock[0] += 1.0
                yield {"keys": ["a", "b"]}

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    run = bench.time_loader(Loader(), 5.0)
    assert run == {"clips": 10, "batches": 5, "seconds": 5.0, "passes": 2, "first_batch_s": 1.0}
