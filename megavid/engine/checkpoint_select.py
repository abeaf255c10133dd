"""Which weights an evaluation uses: a run's newest (its fp32 export when current, else
re-exported from a newer ``step_<N>`` checkpoint, else that folder), or the concrete weights a
user's path names, with the training step they come from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megavid.engine.checkpoint_export import export_fp32, export_source
from megavid.engine.checkpoint_paths import EXPORT_NAME, get_latest_tag, resolve_checkpoint, tag_step
from megavid.engine.safe_pickle import one_line
from megavid.errors import CheckpointError

log = logging.getLogger(__name__)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of the weights at ``path`` (a tag folder, run dir or exported file);
    None when it is not recorded."""
    p = Path(path)
    if p.is_file():
        return export_source(p)[1]
    if p.is_dir() and (p / EXPORT_NAME).is_file() and not (p / "checkpoints").is_dir():
        return export_source(p / EXPORT_NAME)[1]
    return tag_step(resolve_checkpoint(p)[1])


def _newest_mtime(folder: Path) -> float:
    times = [f.stat().st_mtime for f in folder.rglob("*") if f.is_file()]
    return max(times, default=folder.stat().st_mtime)


@dataclass
class Selected:
    """The weights an evaluation uses.

    Attributes:
        path: exported file or DeepSpeed tag folder.
        step: its training step (None: not recorded).
        note: what was done to get there (e.g. a stale export re-exported), or "".
    """

    path: str
    step: int | None
    note: str = ""


def _select_in_run(run_dir: Path, refresh_export: bool = True) -> Selected | None:
    ckpt_dir = run_dir / "checkpoints"
    tag = get_latest_tag(ckpt_dir)
    export = run_dir / EXPORT_NAME
    if not export.is_file():
        return Selected(str(ckpt_dir / tag), tag_step(tag)) if tag else None
    source, step = export_source(export)
    if tag is None:
        return Selected(str(export), step)
    newest = tag_step(tag)
    if step is not None and newest is not None:  # the source step the export records
        stale = step < newest
        was = f"step {step}"
    else:  # unknown source: the files' times decide
        stale = export.stat().st_mtime < _newest_mtime(ckpt_dir / tag)
        was = "an unknown step"
    if not stale:
        return Selected(str(export), step)
    note = f"{export} was exported from {was} but {tag} is newer"
    if refresh_export:
        try:
            export_fp32(ckpt_dir / tag, export)
            log.warning("%s: re-exported it from %s", note, tag)
            return Selected(str(export), newest, f"{note}: re-exported it from {tag}")
        except OSError as e:  # e.g. a read-only run dir: evaluate the folder itself
            log.warning("%s; cannot rewrite it (%s): using %s directly", note, one_line(e), tag)
    return Selected(str(ckpt_dir / tag), newest, f"{note}: using {tag}")


def find_checkpoint(run_dir: str | Path, *, refresh_export: bool = True) -> str | None:
    """The weights to evaluate for a run: the newest. Its exported fp32 file when that is
    current; when a newer ``step_<N>`` checkpoint exists (compared by the export's recorded
    source step, or by file times when unknown) the export is rewritten from it first (or, with
    ``refresh_export=False`` or a read-only run dir, the folder itself is returned); else the
    latest DeepSpeed checkpoint folder; None when the run has neither.

    Args:
        run_dir: the run directory.
        refresh_export: re-export a stale ``model_fp32.pt``.
    """
    sel = _select_in_run(Path(run_dir), refresh_export)
    return sel.path if sel else None


def select_checkpoint(path: str | Path, *, refresh_export: bool = True) -> Selected:
    """The concrete weights named by a user's path: a file as it is, a tag folder as it is, a
    checkpoints dir's latest tag, a run directory's newest weights (:func:`find_checkpoint`).

    Raises:
        CheckpointError: nothing there to evaluate.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass eval.checkpoint=<run dir, "
                              "step_<N> folder or exported file>")
    if p.is_file():
        return Selected(str(p), export_source(p)[1])
    if (p / "checkpoints").is_dir() or (p / EXPORT_NAME).is_file():
        sel = _select_in_run(p, refresh_export)
        if sel is None:
            raise CheckpointError(f"no checkpoint found in run directory {p}")
        return sel
    ckpt_dir, tag = resolve_checkpoint(p)
    return Selected(str(ckpt_dir / tag), tag_step(tag))
