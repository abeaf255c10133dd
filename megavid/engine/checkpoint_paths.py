"""Where checkpoints are: the layout of ``<run_dir>/checkpoints``, its ``step_<N>`` tags and the
``latest`` pointer, and the (checkpoint dir, tag) a user's path names.

Layout: DeepSpeed tags ``step_<N>/`` (model + optimizer shards, ``rng_rank<R>.pt``), ``latest``
(a text file naming the newest tag), ``step_<N>_universal/`` after
:func:`megavid.engine.checkpoint.convert_to_universal`, and the fp32 export
``<run_dir>/model_fp32.pt`` (:data:`EXPORT_NAME`) next to ``checkpoints/``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from megavid.errors import CheckpointError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")
STEP_RE = re.compile(r"^step_(\d+)(?:_universal)?$")
UNIVERSAL_SUFFIX = "_universal"
EXPORT_NAME = "model_fp32.pt"


def get_step_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every ``step_<N>`` checkpoint in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def get_latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (None when there is no checkpoint)."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_bytes()[:256].decode("utf-8", errors="replace").strip()
        if tag and "\x00" not in tag and "\n" not in tag and (ckpt_dir / tag).is_dir():
            return tag
        log.warning("%s names %r, which does not exist; using the newest step_* folder", latest, tag)
    tags = get_step_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) from a run dir, a checkpoints dir, or a tag folder.

    Args:
        path: ``runs/x``, ``runs/x/checkpoints`` or ``runs/x/checkpoints/step_100``.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory or a step_<N> folder")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (any(p.glob("*model_states.pt")) or any(p.glob("*optim_states.pt")) or (p / "zero").is_dir()
            or (STEP_RE.match(p.name) and any(p.glob("rng_rank*.pt")))):
        return p.parent, p.name  # a tag folder (its missing files are reported by the loader)
    tag = get_latest_tag(p)
    if tag is None:
        raise CheckpointError(f"no checkpoint found in {p} (no 'latest' file and no step_<N> folders)")
    return p, tag


def is_universal(ckpt_dir: Path, tag: str) -> bool:
    """True for a folder written by DeepSpeed's ds_to_universal (``zero/<param>/fp32.pt``)."""
    return (ckpt_dir / tag / "zero").is_dir()


def tag_step(tag: str | Path) -> int | None:
    """The step of a ``step_<N>`` / ``step_<N>_universal`` tag or folder (None otherwise)."""
    m = STEP_RE.match(Path(tag).name)
    return int(m.group(1)) if m else None
