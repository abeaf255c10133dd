"""``megavid verify-shards DIR``: check a shard folder against the format, decoding the media.

Every tar readable by webdataset, every sample's JSON, video (decoded completely by PyAV) or
JPEG frames (decoded by PIL), each ``.idx`` equal to the DALI index of its tar, each stats file
consistent with its tar, and ``index.jsonl`` listing exactly the samples of the tars.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from megavid.parser import Parser, doc_summary
from megavid.errors import DataError
from megavid.shards.format import (
    VIDEO_EXTS,
    format_idx,
    get_frame_exts,
    get_frame_times,
    is_frame_ext,
    list_shards,
    read_index,
    scan_tar,
)
from megavid.shards.ingest.probe import VideoProbeError, probe_video


def _verify_sample(tar_name: str, key: str, sample: dict, problems: list[str], decode: bool) -> None:
    where = f"{tar_name}:{key}"
    if "json" not in sample:
        problems.append(f"{where}: no .json member")
        return
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{where}.json: not valid JSON ({e})")
        return
    if not isinstance(meta, dict):
        problems.append(f"{where}.json: not a JSON object")
        return
    if meta.get("key") != key:
        problems.append(f"{where}.json: key {meta.get('key')!r} differs from the member name")
    caps = meta.get("captions")
    if not (isinstance(caps, list) and caps and all(isinstance(c, str) and c.strip() for c in caps)):
        problems.append(f"{where}.json: 'captions' must be a non-empty list of strings")
    if any(is_frame_ext(e) for e in sample):
        verify_frames_sample(where, meta, sample, problems, decode)
        return
    vexts = [e for e in sample if e in VIDEO_EXTS]
    if len(vexts) != 1:
        problems.append(f"{where}: expected one video member, found {vexts or 'none'}")
        return
    if not decode:
        return
    try:
        info = probe_video(sample[vexts[0]], decode=True)
    except VideoProbeError as e:
        problems.append(f"{where}.{vexts[0]}: video does not decode ({e})")
        return
    if "num_frames" in meta and meta["num_frames"] != info.num_frames:
        problems.append(
            f"{where}: json says num_frames={meta['num_frames']}, PyAV decoded {info.num_frames}"
        )


def verify_frames_sample(where: str, meta: dict[str, Any], sample: dict[str, bytes],
                         problems: list[str], decode: bool) -> None:
    """``verify-shards`` checks of one frames sample (appends to ``problems``).

    Frame members numbered 0..n-1 without gaps, n equal to the JSON's ``num_frames`` and to its
    ``frame_times`` (increasing), every JPEG decoding (with ``decode``) to width x height.
    """
    exts = sorted(e for e in sample if is_frame_ext(e))
    if exts != get_frame_exts(len(exts)):
        problems.append(f"{where}: frame members are not numbered 0000.. without gaps")
    others = [e for e in sample if e != "json" and not is_frame_ext(e) and e != "txt"]
    if others:
        problems.append(f"{where}: unexpected members in a frames sample: {others}")
    try:
        times = get_frame_times(meta)
    except DataError as e:
        problems.append(f"{where}.json: {e}")
        return
    if len(times) != len(exts):
        problems.append(f"{where}: json lists {len(times)} frame_times, the tar holds "
                        f"{len(exts)} frames")
    if np.any(np.diff(times) <= 0):
        problems.append(f"{where}.json: frame_times are not increasing")
    if not decode:
        return
    want = (int(meta.get("height", -1)), int(meta.get("width", -1)))
    for e in exts:
        try:
            img = _decode_jpeg(sample[e])
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad data
            problems.append(f"{where}.{e}: JPEG does not decode ({type(err).__name__}: {err})")
            continue
        if img.shape[:2] != want:
            problems.append(f"{where}.{e}: JPEG is {img.shape[1]}x{img.shape[0]}, json says "
                            f"{want[1]}x{want[0]}")


def _decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a JPEG, decoded by PIL (the verifier's reference decoder)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def verify_shards(shard_dir: str | Path, *, decode: bool = True) -> list[str]:
    """Check a shard folder; returns the problems found (empty: all good).

    Checks: every tar is readable by ``webdataset.WebDataset``; each sample has a JSON that
    parses (with its key and captions) and one video that PyAV decodes completely (frame count
    equal to the JSON's ``num_frames``), or, in frames shards, JPEG members ``0000.jpg``...
    numbered without gaps, one per entry of the JSON's ``frame_times``, that all decode to the
    JSON's width x height; each ``.idx`` equals the DALI index of its tar; each
    stats file matches its tar (successes, bytes); ``index.jsonl`` lists exactly the samples of
    the tars with the right member offsets.

    Args:
        shard_dir: the folder written by :func:`megavid.shards.writer.write_shards`.
        decode: decode every video (the slow part).
    """
    import webdataset as wds

    shard_dir = Path(shard_dir)
    tars = list_shards(str(shard_dir))
    problems: list[str] = []
    tar_entries: dict[tuple[str, str], dict[str, list[int]]] = {}
    for tar in tars:
        name = tar.name
        try:
            scanned = scan_tar(tar)
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: not a readable tar ({e})")
            continue
        for key, bundle in scanned:
            tar_entries[(name, key)] = {ext: [off, size] for ext, off, size, _ in bundle}
        # the DALI index
        idx = tar.with_suffix(".idx")
        expected = format_idx([b for _, b in scanned]) if scanned else None
        if not idx.is_file():
            problems.append(f"{name}: missing DALI index {idx.name}")
        elif expected is not None and idx.read_text() != expected:
            problems.append(f"{name}: {idx.name} does not match the tar (re-run wds2idx or re-shard)")
        # stats
        stats_path = tar.with_name(f"{tar.stem}_stats.json")
        if not stats_path.is_file():
            problems.append(f"{name}: missing {stats_path.name}")
        else:
            try:
                st = json.loads(stats_path.read_text())
                if st.get("successes") != len(scanned):
                    problems.append(
                        f"{name}: stats say {st.get('successes')} samples, the tar holds {len(scanned)}"
                    )
                if st.get("bytes") != tar.stat().st_size:
                    problems.append(f"{name}: stats say {st.get('bytes')} bytes, the tar has {tar.stat().st_size}")
            except json.JSONDecodeError as e:
                problems.append(f"{stats_path.name}: not valid JSON ({e})")
        # read through webdataset (the reader loaders use), then check each sample
        seen = []
        try:
            ds = wds.WebDataset(str(tar), shardshuffle=False, handler=wds.reraise_exception, empty_check=False)
            for sample in ds:
                key = sample["__key__"]
                seen.append(key)
                _verify_sample(name, key, {k: v for k, v in sample.items() if not k.startswith("__")}, problems, decode)
        except Exception as e:  # noqa: BLE001 - any reader failure is a problem to report
            problems.append(f"{name}: webdataset cannot read it ({type(e).__name__}: {e})")
        if [k for k, _ in scanned] != seen and not any(p.startswith(f"{name}: webdataset") for p in problems):
            problems.append(f"{name}: webdataset saw {len(seen)} samples, tar headers list {len(scanned)}")
        if [k for k, _ in scanned] != sorted(k for k, _ in scanned):
            problems.append(f"{name}: members are not sorted by key")
    # the global index
    try:
        entries = read_index(shard_dir)
    except DataError as e:
        problems.append(str(e))
        return problems
    listed = set()
    for e in entries:
        k = (e.get("shard"), e.get("key"))
        if k in listed:
            problems.append(f"index.jsonl: {k[1]} listed twice")
        listed.add(k)
        if k not in tar_entries:
            problems.append(f"index.jsonl: {k[1]} in {k[0]} is not in any tar")
        elif tar_entries[k] != e.get("members"):
            problems.append(f"index.jsonl: {k[1]} member offsets {e.get('members')} != tar {tar_entries[k]}")
    for k in tar_entries:
        if k not in listed:
            problems.append(f"index.jsonl: {k[0]}:{k[1]} is missing")
    return problems


def build_parser() -> Parser:
    """``megavid verify-shards``'s parser."""
    p = Parser(prog="megavid verify-shards", description=doc_summary(__doc__))
    p.add_argument("dirs", nargs="+", metavar="DIR", help="shard folder(s)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding the videos")
    return p


def verify_main(argv: list[str] | None = None) -> int:
    """``megavid verify-shards DIR [DIR ...]``: print problems; exit 1 if any."""
    args = build_parser().parse_args(argv)
    bad = 0
    for d in args.dirs:
        if not Path(d).is_dir():
            raise DataError(f"shard folder '{d}' does not exist; pass a folder written by make-shards")
        problems = verify_shards(d, decode=not args.no_decode)
        n = len(read_index(d)) if (Path(d) / "index.jsonl").is_file() else 0
        if problems:
            bad += 1
            print(f"{d}: {len(problems)} problem(s)")
            for prob in problems:
                print(f"  {prob}")
        else:
            print(f"{d}: OK ({len(list_shards(d))} shards, {n} samples)")
    return 1 if bad else 0
