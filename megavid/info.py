"""`megavid info`: versions, devices, which decode backends work here, and the decode plan
``data.backend=auto`` makes for a shard folder (shard kind, codec, backend, device, the reason
and the ``bench/results/`` file it rests on; the plan a run logs at start-up).

Every decode check really decodes: a tiny clip is encoded in memory with PyAV (VP9, and H.264
for NVDEC) and decoded by each backend, and the frames are compared with PyAV's, so "ok" means
"this machine decodes correct pixels with it", not "the module imports".

Usage::

    megavid info                         # versions, devices, backends, /dev/shm
    megavid info --shards data/synthetic/shards/train --workers 8
    megavid info experiment=demo         # shard folder and workers from a config
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from megavid.parser import Parser, doc_summary
from megavid.errors import DataError, MegavidError

GIB = 1 << 30
SHM_PER_WORKER = 1 * GIB
"""Shared memory a loader worker needs (decoded uint8 clips travel through /dev/shm between
worker and main process; PyTorch errors with 'bus error' when it runs out)."""

# distribution names whose versions are reported (module, [distribution names to try])
_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "deepspeed": ("deepspeed",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110",
                    "nvidia-dali"),
    "av (PyAV)": ("av",),
    "decord": ("decord",),
    "webdataset": ("webdataset",),
    "transformers": ("transformers",),
}


@dataclass(slots=True)
class CheckResult:
    """The outcome of one decode check."""

    name: str
    ok: bool | None
    """True: works; False: failed; None: not applicable here (skipped)."""
    detail: str


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------
def get_versions() -> dict[str, str]:
    """Installed versions of Python and the stack's packages ('not installed' when absent).

    Read from package metadata, so that nothing heavy (DeepSpeed's accelerator probe) is
    imported just to print a version.
    """
    out = {"python": platform.python_version()}
    for label, dists in _PACKAGES.items():
        version = "not installed"
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                if label == "nvidia-dali" and dist != "nvidia-dali":
                    version += f" ({dist})"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        out[label] = version
    return out


def get_devices() -> list[str]:
    """One line per CUDA GPU (name, memory, compute capability), or the CPU."""
    import torch

    if torch.cuda.is_available():
        lines = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / GIB:.1f} GiB, "
                         f"sm_{p.major}{p.minor}")
        return lines
    return [f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            "(no CUDA GPU visible)"]


def get_shm_bytes(path: str = "/dev/shm") -> int | None:
    """Size of the shared-memory filesystem in bytes (None when it does not exist)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


def check_shm(shm_bytes: int | None, workers: int) -> str | None:
    """A warning when /dev/shm is smaller than ``SHM_PER_WORKER`` per loader worker.

    Args:
        shm_bytes: size of /dev/shm (None: missing).
        workers: loader worker processes per rank x ranks on this machine.
    """
    if workers <= 0:
        return None
    need = workers * SHM_PER_WORKER
    if shm_bytes is None:
        return (f"/dev/shm does not exist: {workers} loader workers need shared memory; "
                "mount a tmpfs there or set data.num_workers=0")
    if shm_bytes < need:
        return (f"/dev/shm is {shm_bytes / GIB:.2f} GiB, less than ~1 GiB per loader worker "
                f"({workers} workers: {need / GIB:.0f} GiB); in Docker pass --shm-size="
                f"{max(1, need // GIB)}g (or --ipc=host), or lower data.num_workers")
    return None


# --------------------------------------------------------------------------------------------
# Decode checks
# --------------------------------------------------------------------------------------------
# The decode checks' clip size: NVDEC decodes nothing smaller than 48x16 (H.264) or 128x128
# (VP9), so a smaller clip makes the GPU checks fail on a GPU that works.
CHECK_SIZE = 128


def _test_frames(n: int = 8, size: int = CHECK_SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        frames[t, ..., 0] = (xx * 6 + 10 * t) % 256
        frames[t, ..., 1] = (yy * 6) % 256
        frames[t, ..., 2] = 20 * t
    return frames


def _reference(video: bytes, indices: list[int]) -> np.ndarray:
    import io

    import av

    with av.open(io.BytesIO(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([frames[i] for i in indices])


def _encode(codec: str) -> bytes:
    from megavid.shards.synthetic import encode_clip

    return encode_clip(_test_frames(), 8, codec)


def check_pyav(codec: str = "vp9", backend: str = "pyav") -> CheckResult:
    """Decode a tiny clip with megavid's PyAV backend (seeking path), or with the decord
    backend (``backend="decord"``, the same decode-function contract), and compare pixels
    with a full PyAV decode."""
    name = f"{'PyAV' if backend == 'pyav' else backend} CPU ({codec})"
    try:
        if backend == "decord":
            from megavid.data.decord_backend import decode_clip, decord_available

            if not decord_available():
                return CheckResult(name, None, "decord is not installed (pip install "
                                   "megavid[decord])")
        else:
            from megavid.data.pyav_backend import decode_clip

        video = _encode(codec)
        ts = np.array([0.0, 0.5, 0.875])  # frames 0, 4, 7 at 8 fps
        got = decode_clip(video, ts, fps=8.0, num_video_frames=8)
        err = float(np.abs(got.astype(float) - _reference(video, [0, 4, 7])).mean())
    except Exception as e:  # noqa: BLE001 - the check reports whatever breaks
        return CheckResult(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return CheckResult(name, err < 1.0,
                       f"frames 0/4/7 decoded, mean |diff| vs full decode {err:.2f}")


def _dali_unusable(name: str, device: str) -> "CheckResult | None":
    """A skip result when DALI is missing or a "mixed" check has no GPU; None when usable."""
    import torch

    from megavid.data.dali.devices import dali_available

    if not dali_available():
        return CheckResult(name, None, "nvidia-dali is not installed (pip install megavid[dali])")
    if device == "mixed" and not torch.cuda.is_available():
        return CheckResult(name, None, "skipped: no CUDA GPU")
    return None


def check_dali(device: str, codec: str) -> CheckResult:
    """Decode a tiny clip with megavid's DALI pipeline on ``device`` ('cpu' or 'mixed')."""
    name = f"DALI {device} ({codec})"
    try:
        from megavid.data.dali import pipelines
    except ImportError as e:
        return CheckResult(name, False, f"cannot import: {e}")
    skipped = _dali_unusable(name, device)
    if skipped is not None:
        return skipped
    try:
        video = _encode(codec)
        frames = [0, 4, 7]
        inputs = ([np.frombuffer(video, np.uint8)], [np.array(frames, np.int32)],
                  [np.zeros(2, np.float32)], [np.full(2, float(CHECK_SIZE), np.float32)],
                  [np.array(0, np.int32)])
        pipe = pipelines.build_video_pipeline(pipelines.one_batch_source(inputs), batch_size=1,
                                         img_size=CHECK_SIZE,
                                         device=device, prefetch=1)
        (out,) = pipe.run()
        got = pipelines.dali_to_torch(out).cpu().numpy()[0].transpose(0, 2, 3, 1)  # T, H, W, C
        err = float(np.abs(got.astype(float) - _reference(video, frames)).mean())
    except Exception as e:  # noqa: BLE001 - the check reports whatever breaks
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        msg = pipelines._first_error_line(e) if lines else type(e).__name__
        return CheckResult(name, False, f"{type(e).__name__}: {msg}")
    # YUV->RGB conversion and chroma upsampling differ slightly between FFmpeg builds
    return CheckResult(name, err < 4.0, f"frames 0/4/7 decoded, mean |diff| vs PyAV {err:.2f}")


def check_dali_frames(device: str) -> CheckResult:
    """Decode JPEG frames with megavid's frames pipeline (``fn.decoders.image``) on ``device``
    ('cpu' or 'mixed': hardware JPEG decoder) and compare with PIL's decode."""
    name = f"DALI {device} (jpeg frames)"
    try:
        from megavid.data.dali import pipelines
        from megavid.data.frames import decode_jpeg
        from megavid.shards.ingest.frames import encode_jpeg
    except ImportError as e:
        return CheckResult(name, False, f"cannot import: {e}")
    skipped = _dali_unusable(name, device)
    if skipped is not None:
        return skipped
    try:
        jpegs = [encode_jpeg(f) for f in _test_frames(3)]
        inputs = ([np.frombuffer(j, np.uint8) for j in jpegs], [np.zeros(2, np.float32)] * 3,
                  [np.full(2, float(CHECK_SIZE), np.float32)] * 3, [np.array(0, np.int32)] * 3)
        pipe = pipelines.build_frames_pipeline(pipelines.one_batch_source(inputs), batch_size=3,
                                          img_size=CHECK_SIZE,
                                          device=device, prefetch=1)
        (out,) = pipe.run()
        got = pipelines.dali_to_torch(out).cpu().numpy().transpose(0, 2, 3, 1)  # N, H, W, C
        ref = np.stack([decode_jpeg(j) for j in jpegs])
        err = float(np.abs(got.astype(float) - ref).mean())
    except Exception as e:  # noqa: BLE001 - the check reports whatever breaks
        return CheckResult(name, False, f"{type(e).__name__}: {pipelines._first_error_line(e)}")
    # IDCT and chroma upsampling differ slightly between libjpeg-turbo, nvJPEG and the hardware
    return CheckResult(name, err < 4.0, f"3 JPEG frames decoded, mean |diff| vs PIL {err:.2f}")


def get_decode_checks() -> list[CheckResult]:
    """Run every decode check: PyAV VP9 and H.264, decord H.264 (where installed), DALI CPU
    VP9, DALI mixed H.264 and VP9, DALI JPEG frames on the CPU and the GPU."""
    checks: list[Callable[[], CheckResult]] = [
        lambda: check_pyav("vp9"), lambda: check_pyav("h264"),
        lambda: check_pyav("h264", backend="decord"),
        lambda: check_dali("cpu", "vp9"),
        lambda: check_dali("mixed", "h264"), lambda: check_dali("mixed", "vp9"),
        lambda: check_dali_frames("cpu"), lambda: check_dali_frames("mixed"),
    ]
    return [c() for c in checks]


def check_dali_reader(shard_dir: str | Path) -> CheckResult:
    """Read the first tar of a shard folder with DALI's ``fn.readers.webdataset`` through its
    ``.idx`` file and compare every sample with ``index.jsonl`` (bytes and JSON)."""
    name = "DALI webdataset reader"
    where = str(shard_dir)
    try:
        from megavid.data.dali.devices import dali_available
        from megavid.data.dali.readers import iter_dali_reader
        from megavid.shards.format import is_frames_shard_dir, list_shards, read_index, read_sample

        if not dali_available():
            return CheckResult(name, None, "nvidia-dali is not installed")
        tar = list_shards(str(shard_dir))[0]
        where = tar.name
        entries = {e["key"]: e for e in read_index(tar.parent) if e["shard"] == tar.name}
        if is_frames_shard_dir(tar.parent):
            return _check_dali_frames_reader(tar, entries)
        n = 0
        for meta, video in iter_dali_reader(tar):
            entry = entries.get(meta.get("key"))
            if entry is None:
                return CheckResult(name, False, f"{tar.name}: DALI read {meta.get('key')!r}, "
                                   "which index.jsonl does not list; re-create the shards")
            ref_video, ref_meta = read_sample(tar.parent, entry)
            if video != ref_video or meta != ref_meta:
                return CheckResult(name, False, f"{tar.name}:{meta['key']}: DALI's bytes differ "
                                   f"from index.jsonl's offsets; regenerate {tar.stem}.idx")
            n += 1
        if n != len(entries):
            return CheckResult(name, False, f"{tar.name}: DALI read {n} samples, index.jsonl "
                               f"lists {len(entries)}")
    except Exception as e:  # noqa: BLE001 - the check reports whatever breaks
        return CheckResult(name, False, f"{where}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}")
    return CheckResult(name, True, f"{tar.name}: {n} samples via {tar.stem}.idx match index.jsonl")


def _check_dali_frames_reader(tar: Path, entries: dict[str, dict]) -> CheckResult:
    """``check_dali_reader`` for a frames shard: every frame DALI's reader returns equals the
    bytes at the offsets of ``index.jsonl``."""
    from megavid.data.dali.readers import iter_dali_frames_reader
    from megavid.shards.format import is_frame_ext

    name = "DALI webdataset reader"
    n = 0
    with open(tar, "rb") as f:
        for meta, frames in iter_dali_frames_reader(tar):
            entry = entries.get(meta.get("key"))
            if entry is None:
                return CheckResult(name, False, f"{tar.name}: DALI read {meta.get('key')!r}, "
                                   "which index.jsonl does not list; re-create the shards")
            spans = [entry["members"][x] for x in sorted(entry["members"]) if is_frame_ext(x)]
            ref = []
            for off, size in spans:
                f.seek(off)
                ref.append(f.read(size))
            if frames != ref:
                return CheckResult(name, False, f"{tar.name}:{meta['key']}: DALI's frames differ "
                                   f"from index.jsonl's offsets; regenerate {tar.stem}.idx")
            n += 1
    if n != len(entries):
        return CheckResult(name, False, f"{tar.name}: DALI read {n} samples, index.jsonl "
                           f"lists {len(entries)}")
    return CheckResult(name, True, f"{tar.name}: {n} frames samples via {tar.stem}.idx match "
                       "index.jsonl")


def describe_auto(shard_dir: str | Path) -> dict[str, str]:
    """What ``data.backend=auto`` picks for a shard folder on this machine: the
    :class:`megavid.data.build.DecodePlan` of one scan of the folder, as a dict (shard_kind,
    codec, backend, device, path, reason, source).

    For a PyAV plan of video shards the reason adds the shards' keyframe interval (from the
    same scan): PyAV decodes only the GOPs of the sampled frames, so it sets PyAV's cost."""
    from megavid.data.build import plan_decode, scan_shards

    scan = scan_shards(str(shard_dir))
    plan = plan_decode(scan.shard_kind, scan.codec)
    reason = plan.reason
    if plan.backend == "pyav" and plan.shard_kind == "video":
        gops = {e.get("gop") for entries in scan.index.values() for e in entries}
        reason += (f"; keyframes every {gops.pop()} frames (make-shards --gop): PyAV decodes "
                   "only the GOPs of the sampled frames" if len(gops) == 1 and None not in gops
                   else "; re-making the shards with make-shards --gop 8 cuts PyAV's decode "
                   "~2-3x (bench/loader_gpu.py)")
    return {"shard_kind": plan.shard_kind, "codec": plan.codec, "backend": plan.backend,
            "device": plan.device, "path": plan.path, "reason": reason, "source": plan.source}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    """``megavid info``'s parser; config tokens are left over (see :func:`_parse`)."""
    p = Parser(
        prog="megavid info", description=doc_summary(__doc__),
        epilog="Config tokens (experiment=demo, data.train=...) name the shards and workers.")
    p.add_argument("--shards", action="append", default=[], metavar="DIR",
                   help="a shard folder (repeatable): print the decode plan data.backend=auto "
                        "makes for it here, and its reason")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers on this machine, for the /dev/shm check "
                        "(default: data.num_workers x visible GPUs)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode checks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = build_parser()
    ns, tokens = p.parse_known_args(argv)
    if any(t.startswith("-") for t in tokens):
        p.error(f"unrecognized arguments: {' '.join(t for t in tokens if t.startswith('-'))}")
    return ns, tokens


def main(argv: list[str] | None = None) -> int:
    """``megavid info``: print the report; returns 1 when no decode backend works, else 0.

    Args:
        argv: options (see ``megavid info --help``) and optional config tokens.
    """
    ns, tokens = _parse(list(sys.argv[1:] if argv is None else argv))
    import torch

    shard_dirs = [Path(d) for d in ns.shards]
    workers = ns.workers
    if tokens:
        from megavid.config import compose
        from megavid.shards.format import list_shards

        cfg = compose(tokens)
        try:
            shard_dirs.append(list_shards(cfg.data.train, cfg.data.root)[0].parent)
        except DataError as e:
            print(f"note: {e}", file=sys.stderr)
        if workers is None:
            workers = cfg.data.num_workers * max(1, torch.cuda.device_count())
    if workers is None:
        workers = max(1, torch.cuda.device_count())

    report: dict[str, Any] = {"versions": get_versions(), "devices": get_devices()}
    checks = [] if ns.no_decode else get_decode_checks()
    report["decode"] = {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}
    report["auto"] = {}
    for d in shard_dirs:
        try:
            report["auto"][str(d)] = describe_auto(d)
            if not ns.no_decode:
                r = check_dali_reader(d)
                report["auto"][str(d)]["dali_reader"] = {"ok": r.ok, "detail": r.detail}
        except MegavidError as e:
            report["auto"][str(d)] = {"error": str(e)}
    shm = get_shm_bytes()
    report["shm"] = {"bytes": shm, "workers": workers, "warning": check_shm(shm, workers)}

    if ns.json:
        print(json.dumps(report, indent=1))
    else:
        _print_text(report)
    if checks and not any(c.ok for c in checks):
        return 1
    return 0


def _print_text(report: dict[str, Any]) -> None:
    print("versions")
    for k, v in report["versions"].items():
        print(f"  {k:<14} {v}")
    print("devices")
    for line in report["devices"]:
        print(f"  {line}")
    if report["decode"]:
        print("decode backends")
        for name, r in report["decode"].items():
            status = {True: "ok", False: "FAILED", None: "n/a"}[r["ok"]]
            print(f"  {name:<26} {status:<7} {r['detail']}")
    for d, a in report["auto"].items():
        if "error" in a:
            print(f"data.backend=auto for {d}: cannot tell ({a['error']})")
        else:
            print(f"data.backend=auto for {d}: {a['backend']} ({a['device']}); codec "
                  f"{a['codec']} ({a['shard_kind']} shards): {a['reason']}")
            print(f"  decode plan rests on: {a['source']}")
            if "dali_reader" in a:
                r = a["dali_reader"]
                status = {True: "ok", False: "FAILED", None: "n/a"}[r["ok"]]
                print(f"  DALI webdataset reader: {status}: {r['detail']}")
    shm = report["shm"]
    size = "missing" if shm["bytes"] is None else f"{shm['bytes'] / GIB:.1f} GiB"
    print(f"/dev/shm: {size} for {shm['workers']} loader worker(s)")
    if shm["warning"]:
        print(f"WARNING: {shm['warning']}")
