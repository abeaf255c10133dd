"""`megavid bench-loader SHARDS`: which decode path to use on this machine, measured on the
user's own shards.

For each decode path that can read the shards here (``pyav``; ``decord`` where installed, video
shards only; ``dali-cpu`` where nvidia-dali is installed; ``dali-mixed`` with a CUDA GPU too),
or only the one named with ``--backend`` / ``--device``, it builds the train loader the way a
run does (:func:`megavid.data.build.build_loader`: 8-frame 224^2 clips, train sampling, one
loader worker process or DALI thread per CPU core) and prints:

- clips/s of the full loader, read for ``--seconds`` after its first batch (that first batch,
  paying the first worker start or pipeline build, is timed apart), over as many passes
  (epochs) as fit;
- the feed stage alone, in clips per CPU-second (read, plan and hand over, no decode) and the
  decode stage alone in clips/s (DALI: the same inputs cycled through the pipeline), from
  :mod:`megavid.data.dali.measure`; "n/a" for PyAV and decord, whose worker processes read and
  decode each sample in one call (no separate feed to time);
- the pipeline builds the loader reported (``loader.stats()``) over the timed passes;
- what ``data.backend=auto`` picks for these shards here, and why.

The last line is machine-readable::

    bench-loader: best=<path> clips_per_s=<x> feed_clips_per_cpu_s=<y> pipeline_builds=<k>

With ``--json`` the report is one JSON object on stdout (its ``summary`` is that line) and the
text table goes to stderr.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megavid.parser import Parser, doc_summary
from megavid.config import DataConfig
from megavid.data.build import (
    DecodePlan,
    build_loader,
    get_unusable_reason,
    plan_decode,
    scan_shards,
)
from megavid.data.dali.devices import dali_available
from megavid.data.decord_backend import decord_available
from megavid.errors import ConfigError, DataError, MegavidError

try:  # TODO(data-path): import directly once megavid.data.dali.measure has landed
    from megavid.data.dali import measure
except ImportError:
    measure = None

PATHS = ("pyav", "decord", "dali-cpu", "dali-mixed")
"""The decode paths, in the order they are measured (``DecodePlan.path`` names)."""
NUM_FRAMES = 8
IMG_SIZE = 224
"""The clip every path decodes: 8 frames of 224^2 (the bench/results tables' clip)."""


@dataclass(slots=True)
class PathResult:
    """One decode path's measurements (rates rounded as printed)."""

    path: str
    clips_per_s: float | None = None
    """Full loader, after its first batch."""
    feed_clips_per_cpu_s: float | None = None
    """Feed stage alone (None: not separable, or not measurable yet)."""
    decode_clips_per_s: float | None = None
    """Decode stage alone (None: not separable, or not measurable yet)."""
    pipeline_builds: int | None = None
    """Over the timed passes, from ``loader.stats()`` (None: the loader does not report it)."""
    passes: int = 0
    """Passes (epochs) started, the first one included."""
    batches: int = 0
    """Batches timed (the first one excluded)."""
    clips: int = 0
    seconds: float = 0.0
    first_batch_s: float | None = None
    error: str | None = None
    """The path failed: its one-line error."""


# --------------------------------------------------------------------------------------------
# Which paths
# --------------------------------------------------------------------------------------------
def get_paths(shard_kind: str, codec: str, *, backend: str | None, device: str | None,
              plan: DecodePlan, has_dali: bool, has_cuda: bool, has_decord: bool
              ) -> tuple[list[str], dict[str, str]]:
    """The paths to measure, and the others with why they are not measured.

    Args:
        shard_kind: the shards' kind.
        codec: the shards' codec.
        backend: ``--backend``: None (every path), 'auto' (the plan's), 'pyav', 'decord', 'dali'.
        device: ``--device``: None, 'cpu' or 'mixed' (restricts the DALI paths).
        plan: what ``data.backend=auto`` picks here.
        has_dali: nvidia-dali imports.
        has_cuda: a CUDA GPU is visible.
        has_decord: decord imports.

    Raises:
        ConfigError: the named path cannot decode these shards here.
    """
    wanted = {None: PATHS, "auto": (plan.path,), "pyav": ("pyav",), "decord": ("decord",),
              "dali": ("dali-cpu", "dali-mixed")}[backend]
    if device is not None:
        wanted = tuple(p for p in wanted if not p.startswith("dali") or p == f"dali-{device}")
    paths, skipped = [], {}
    for p in PATHS:
        if p not in wanted:
            continue
        why = get_unusable_reason(p, shard_kind, codec, has_dali=has_dali, has_cuda=has_cuda,
                                  has_decord=has_decord)
        if why is None:
            paths.append(p)
        else:
            skipped[p] = why
    if not paths:
        named = f"--backend {backend}" + (f" --device {device}" if device else "")
        raise ConfigError(f"{named} cannot read these {shard_kind} shards ({codec}) here: "
                          + "; ".join(f"{p}: {w}" for p, w in skipped.items())
                          + "; leave --backend out to measure every path that can")
    return paths, skipped


def get_bench_config(shards: str, path: str, batch: int, workers: int) -> DataConfig:
    """The train data config of one path (8x224^2 clips, one worker or thread per core)."""
    backend, _, device = path.partition("-")
    return DataConfig(root=str(Path(shards).parent), train=shards, val=shards, test=shards,
                      backend=backend, dali_device=device or "auto", num_frames=NUM_FRAMES,
                      img_size=IMG_SIZE, batch_size=batch, eval_batch_size=batch,
                      num_workers=workers)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def time_loader(loader: Any, seconds: float, *, sync: Callable[[], None] = lambda: None
                ) -> dict[str, Any]:
    """Read ``loader`` pass after pass until ``seconds`` have gone by after its first batch.

    Returns:
        {"clips", "batches", "seconds", "passes", "first_batch_s"}: clips and batches after
        the first batch, and the wall time from the first batch to the last one (passes
        restarting in between included).

    Raises:
        DataError: the loader yields no batch.
    """
    if len(loader) == 0:
        raise DataError("the loader yields no batch per pass; lower --batch")
    t0 = time.perf_counter()
    first = last = None
    clips = batches = passes = 0
    now = t0
    while first is None or now - first < seconds:
        passes += 1
        it = iter(loader)
        try:
            for batch in it:
                sync()
                now = time.perf_counter()
                if first is None:
                    first = last = now  # the first batch: worker start or pipeline build
                    continue
                last = now
                clips += len(batch["keys"])
                batches += 1
                if now - first >= seconds:
                    break
        finally:
            it.close()  # stops the pass's worker processes / pipeline feed
        now = time.perf_counter()
        if first is None:
            raise DataError("the loader's pass ended before its first batch")
    return {"clips": clips, "batches": batches, "seconds": last - first, "passes": passes,
            "first_batch_s": first - t0}


def get_pipeline_builds(loader: Any) -> int | None:
    """``loader.stats()["pipeline_builds"]``, or None for a loader without ``stats``."""
    stats = getattr(loader, "stats", None)  # TODO(data-path): every loader has it once landed
    return None if stats is None else int(stats()["pipeline_builds"])


def measure_path(shards: str, path: str, *, seconds: float, batch: int, workers: int
                 ) -> PathResult:
    """Build the train loader of ``path`` over ``shards`` and measure it (see the module
    docstring). A path that fails gives a result with ``error`` set."""
    out = PathResult(path)
    loader = None
    try:
        loader = build_loader(get_bench_config(shards, path, batch, workers), "train",
                              train=True, seed=0)
        sync = torch.cuda.synchronize if path == "dali-mixed" else (lambda: None)
        run = time_loader(loader, seconds, sync=sync)
        out.clips, out.batches, out.passes = run["clips"], run["batches"], run["passes"]
        out.seconds = round(run["seconds"], 3)
        out.first_batch_s = round(run["first_batch_s"], 3)
        out.clips_per_s = round(run["clips"] / run["seconds"], 2) if run["seconds"] > 0 else 0.0
        out.pipeline_builds = get_pipeline_builds(loader)
        if measure is not None and path.startswith("dali"):
            out.feed_clips_per_cpu_s = round(float(measure.feed_rate(loader, seconds)), 2)
            out.decode_clips_per_s = round(float(measure.decode_only_rate(loader, seconds)), 2)
    except (MegavidError, RuntimeError) as e:  # DALI reports its failures as RuntimeError
        lines = str(e).strip().splitlines()
        out.error = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    finally:
        del loader
        gc.collect()  # a DALI pipeline frees its threads and buffers here
    return out


def get_best(results: list[PathResult]) -> PathResult | None:
    """The measured path with the most clips/s (the first of equals), or None."""
    ok = [r for r in results if r.error is None and r.clips_per_s is not None]
    return max(ok, key=lambda r: r.clips_per_s) if ok else None


def format_summary(best: PathResult | None) -> str:
    """The machine-readable last line."""
    if best is None:
        return ("bench-loader: best=none clips_per_s=n/a feed_clips_per_cpu_s=n/a "
                "pipeline_builds=n/a")
    return (f"bench-loader: best={best.path} clips_per_s={_num(best.clips_per_s)} "
            f"feed_clips_per_cpu_s={_num(best.feed_clips_per_cpu_s)} "
            f"pipeline_builds={_num(best.pipeline_builds)}")


def _num(x: float | int | None) -> str:
    if x is None:
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.2f}"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
TABLE_HEADER = ("path", "clips/s", "feed clips/CPU-s", "decode-only clips/s", "pipeline builds",
                "passes", "batches timed", "first batch s")


def format_report(report: dict[str, Any]) -> list[str]:
    """The text report (the table, the paths not measured, auto's pick, the summary line)."""
    s = report
    lines = [f"bench-loader: {s['shards']}: {s['samples']} {s['shard_kind']} samples "
             f"({s['codec']}), batch {s['batch']}, {NUM_FRAMES}x{IMG_SIZE}^2 clips, "
             f"{s['cpu_cores']} CPU cores, {s['gpus']} CUDA GPU(s), {s['workers']} loader "
             f"workers / DALI threads, {s['seconds']:g} s per measurement",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in s["paths"]:
        if r["error"] is not None:
            lines.append(f"| {r['path']} | FAILED: {r['error']} |" + " |" * (len(TABLE_HEADER) - 2))
            continue
        cells = (r["path"], _num(r["clips_per_s"]), _num(r["feed_clips_per_cpu_s"]),
                 _num(r["decode_clips_per_s"]), _num(r["pipeline_builds"]), str(r["passes"]),
                 str(r["batches"]), _num(r["first_batch_s"]))
        lines.append("| " + " | ".join(cells) + " |")
    for path, why in s["not_measured"].items():
        lines.append(f"not measured: {path} ({why})")
    if measure is None:
        lines.append("feed and decode-only columns: n/a until megavid.data.dali.measure exists")
    auto = s["auto"]
    lines.append(f"data.backend=auto picks here: {auto['path']}: {auto['reason']} "
                 f"[{auto['source']}]")
    best = s["best"]
    if best is not None and auto["path"] != best:
        lines.append(f"note: {best} measured faster than auto's pick on these shards here")
    lines.append(s["summary"])
    return lines


def run_bench(shards: str, *, backend: str | None = None, device: str | None = None,
              seconds: float = 10.0, batch: int = 16,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the decode paths on ``shards``; the report as a dict (``--json``'s object).

    Args:
        shards: a shard folder (or a glob / tar).
        backend: None (every usable path), 'auto', 'pyav', 'decord' or 'dali'.
        device: None, 'cpu' or 'mixed' (restricts the DALI paths).
        seconds: wall time of each measurement.
        batch: clips per batch.
        progress: called with a line before each path is measured.
    """
    if seconds <= 0 or batch < 1:
        raise ConfigError(f"--seconds {seconds:g} and --batch {batch} must be positive")
    scan = scan_shards(shards)
    samples = sum(len(v) for v in scan.index.values())
    if batch > samples:
        raise ConfigError(f"--batch {batch} is more than the {samples} samples of {shards}: "
                          "a train pass would yield no batch; lower --batch")
    plan = plan_decode(scan.shard_kind, scan.codec)
    has_dali, has_cuda, has_decord = dali_available(), torch.cuda.is_available(), decord_available()
    paths, skipped = get_paths(scan.shard_kind, scan.codec, backend=backend, device=device,
                               plan=plan, has_dali=has_dali, has_cuda=has_cuda,
                               has_decord=has_decord)
    cores = len(os.sched_getaffinity(0))
    results = []
    for p in paths:
        progress(f"bench-loader: measuring {p} for {seconds:g} s ...")
        results.append(measure_path(shards, p, seconds=seconds, batch=batch, workers=cores))
    best = get_best(results)
    return {
        "shards": shards, "shard_kind": scan.shard_kind, "codec": scan.codec,
        "samples": samples, "batch": batch,
        "seconds": seconds, "num_frames": NUM_FRAMES, "img_size": IMG_SIZE,
        "cpu_cores": cores, "gpus": torch.cuda.device_count() if has_cuda else 0,
        "workers": cores, "paths": [dataclasses.asdict(r) for r in results],
        "not_measured": skipped,
        "auto": {"path": plan.path, "backend": plan.backend, "device": plan.device,
                 "reason": plan.reason, "source": plan.source},
        "best": None if best is None else best.path, "summary": format_summary(best),
    }


def build_parser() -> Parser:
    """``megavid bench-loader``'s parser (tests/unit/test_cli.py pins its flags)."""
    p = Parser(prog="megavid bench-loader", description=doc_summary(__doc__))
    p.add_argument("shards", metavar="SHARDS", help="a shard folder (or a glob / .tar)")
    p.add_argument("--backend", choices=("auto", "pyav", "decord", "dali"), default=None,
                   help="measure only this backend ('auto': the path data.backend=auto picks "
                        "here); default: every path that can read the shards here")
    p.add_argument("--device", choices=("cpu", "mixed"), default=None,
                   help="measure DALI only on this device")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="wall time of each measurement (default 10)")
    p.add_argument("--batch", type=int, default=16, help="clips per batch (default 16)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (the text report goes to stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``megavid bench-loader``: returns 0 when some path was measured, 1 when every one failed.

    Args:
        argv: see ``megavid bench-loader --help``.
    """
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    text = sys.stderr if ns.json else sys.stdout
    report = run_bench(ns.shards, backend=ns.backend, device=ns.device, seconds=ns.seconds,
                       batch=ns.batch, progress=lambda line: print(line, file=sys.stderr,
                                                                    flush=True))
    for line in format_report(report):
        print(line, file=text)
    if ns.json:
        print(json.dumps(report, indent=1))
    return 0 if report["best"] is not None else 1
