"""Helpers of the bad-sample tests (PyAV and DALI loaders): damage real shards the way a cluster
does (a tar cut short by an interrupted copy, random bytes overwritten inside video members) and
find the damaged samples independently of the loaders (tarfile streaming + a PyAV decode of
every frame of each member)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np


def truncate_in_member(shard_dir: Path, entry: dict, ext: str, frac: float = 0.5) -> int:
    """Cut the tar of index entry ``entry`` inside its member ``ext`` (``frac`` of the way into
    the member's data), as an interrupted copy leaves it. Returns the new tar size."""
    offset, size = entry["members"][ext]
    cut = offset + max(1, int(size * frac))
    with open(shard_dir / entry["shard"], "r+b") as f:
        f.truncate(cut)
    return cut


def patch_video_bytes(shard_dir: Path, entries: list[dict], ext: str, *, seed: int,
                      nbytes: int = 32, window: tuple[float, float] = (0.2, 1.0)
                      ) -> dict[str, tuple[int, bytes]]:
    """Overwrite a run of ``nbytes`` random bytes at a random place in each entry's ``ext``
    member, starting in the ``window`` (fractions of the member; the default skips the first
    fifth, the container header and the start of the keyframe), from RNG ``seed``. The tar
    stays valid; whether the video still decodes is for the reference to find out.
    Returns {key: (file offset, the bytes overwritten)} (see :func:`restore`)."""
    rng = np.random.default_rng(seed)
    old: dict[str, tuple[int, bytes]] = {}
    for e in entries:
        offset, size = e["members"][ext]
        lo, hi = int(size * window[0]), min(int(size * window[1]), size - nbytes)
        at = offset + int(rng.integers(lo, hi))
        with open(shard_dir / e["shard"], "r+b") as f:
            f.seek(at)
            old[e["key"]] = (at, f.read(nbytes))
            f.seek(at)
            f.write(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return old


def restore(shard_dir: Path, shard: str, at: int, data: bytes) -> None:
    """Write ``data`` back at ``at`` of tar ``shard`` (undo one patch)."""
    with open(shard_dir / shard, "r+b") as f:
        f.seek(at)
        f.write(data)


def classify_video(data: bytes, num_frames: int) -> str:
    """"good": PyAV decodes all ``num_frames`` frames without an error; "decode_error": not a
    single frame decodes; "partial": anything between (some frames, then an error or the end),
    which a loader may take or reject depending on the frames it samples."""
    got = 0
    try:
        with av.open(io.BytesIO(data)) as c:
            for _ in c.decode(video=0):
                got += 1
    except (av.FFmpegError, IndexError, EOFError, ValueError):
        return "decode_error" if got == 0 else "partial"
    return "good" if got == num_frames else ("decode_error" if got == 0 else "partial")


def read_members(shard_dir: Path) -> dict[str, dict[str, bytes | None]]:
    """{key: {ext: bytes}} of every member of the tars of ``shard_dir``, streamed with
    ``tarfile`` (no index): a member that ends early is None, members after a header cut short
    are missing."""
    members: dict[str, dict[str, bytes | None]] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with open(tar, "rb") as raw:
            try:
                with tarfile.open(fileobj=raw, mode="r|") as tf:
                    for m in tf:
                        key, ext = m.name.split(".", 1)
                        try:
                            data = tf.extractfile(m).read()
                        except tarfile.ReadError:
                            data = None  # the member ends where the file was cut
                        if data is not None and len(data) != m.size:
                            data = None
                        members.setdefault(key, {})[ext] = data
            except tarfile.ReadError:
                pass  # a header cut short: every later member is missing
    return members


def reference_failures(shard_dir: Path, keys: list[str]) -> dict[str, str]:
    """{key: reason} of the samples among ``keys`` that cannot be used, found without the
    loaders or index.jsonl (:func:`read_members`): a sample whose members are missing or end
    early is "truncated_shard", one whose JSON has no caption "no_caption", one whose video
    PyAV cannot decode at all "decode_error" (one that decodes only in part is reported as
    "partial": damage the tests avoid)."""
    members = read_members(shard_dir)
    out: dict[str, str] = {}
    for key in keys:
        got = members.get(key, {})
        video_ext = next((x for x in got if x not in ("json", "txt")), None)
        if video_ext is None or got.get("json") is None or got[video_ext] is None:
            out[key] = "truncated_shard"
            continue
        meta = json.loads(got["json"])
        if not meta.get("captions"):
            out[key] = "no_caption"
            continue
        kind = classify_video(got[video_ext], int(meta["num_frames"]))
        if kind != "good":
            out[key] = kind
    return out


def damage_split(shard_dir: Path, entries: list[dict], *, truncate: dict, patch: list[dict],
                 ext: str, seed: int, nbytes: int = 32,
                 window: tuple[float, float] = (0.2, 1.0)) -> dict[str, str]:
    """Cut the tar of ``truncate`` (an index entry) in the middle of its ``ext`` member and
    patch random bytes into the ``ext`` members of ``patch`` (entries of another tar;
    ``nbytes``, ``window``: :func:`patch_video_bytes`), undoing
    the patches that leave a partly decodable video (PyAV's verdict); returns the reference
    {key: reason} of the damaged split (:func:`reference_failures`)."""
    truncate_in_member(shard_dir, truncate, ext)
    old = patch_video_bytes(shard_dir, patch, ext, seed=seed, nbytes=nbytes, window=window)
    by_key = {e["key"]: e for e in entries}
    for key, kind in reference_failures(shard_dir, list(old)).items():
        if kind == "partial":
            restore(shard_dir, by_key[key]["shard"], *old[key])
    return reference_failures(shard_dir, [e["key"] for e in entries])


def assert_no_duplicate_keys(batches: list[dict]) -> None:
    for i, b in enumerate(batches):
        dup = sorted(k for k in set(b["keys"]) if b["keys"].count(k) > 1)
        assert not dup, f"batch {i} holds {dup} more than once: {b['keys']}"
