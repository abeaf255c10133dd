"""What every evaluation job shares, written once: the weights it evaluates
(:func:`select_eval_weights`), the set-up task and model holding them (:func:`open_eval`: world
info, process group, device, ``task.setup``, model built and loaded, eval mode), encoding every
sample of a split across ranks (:func:`encode_split`) and encoding texts
(:func:`encode_texts`).

The jobs themselves (eval-zeroshot, eval-zeroshot-cls, linear-probe, extract-features,
eval-egocentric, and the test after finetune-cls) only arrange what these return.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megavid.config import Config
from megavid.errors import CheckpointError
from megavid.tasks.base import VideoTextTask, get_initial_weights, load_model_weights


@dataclass
class EvalWeights:
    """The weights an evaluation job evaluates (:func:`select_eval_weights`).

    Attributes:
        path: the checkpoint (DeepSpeed folder or exported file) loaded into the built model;
            with ``imported``, the ``model.weights`` file the built model imported (None when
            only tower weights are imported, and for a random-init model).
        step: its training step (None: not recorded).
        note: what selecting it did (e.g. a stale export re-exported), or "".
        imported: the weights the model config imports, evaluated as they are (no training
            run): ``{"model.<key>": file or folder}``; empty when a checkpoint is loaded.
    """

    path: str | None
    step: int | None = None
    note: str = ""
    imported: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What results are named by without a step (``megavid.eval.results.results_path``):
        the weights' path, 'imported' (tower weights only) or 'random' (random init)."""
        return self.path or ("imported" if self.imported else "random")

    def describe(self) -> str:
        """``<what> (step N)`` for the "evaluating ..." line."""
        if self.path is None and not self.imported:
            return "a randomly initialised model (run.seed)"
        what = self.path or ", ".join(f"{k}={v}" for k, v in self.imported.items())
        step = "an unrecorded step" if self.step is None else f"step {self.step}"
        return f"{what} ({step})" + (f"; {self.note}" if self.note else "")


def select_eval_weights(cfg: Config, resume: str | None = None, *, allow_random: bool = False) -> EvalWeights:
    """The weights an evaluation job uses, in order: ``--resume`` or ``eval.checkpoint`` (a run
    directory means its newest weights); the run's newest weights (a stale export is
    re-exported); else, in a run folder without weights, the weights the model config imports
    (``model.weights``, ``model.text_weights``, ``model.video_weights``) as they are, with no
    training run. ``eval.checkpoint=random`` (where ``allow_random``) is a randomly
    initialised model (seeded by ``run.seed``).

    Args:
        cfg: the resolved job config.
        resume: the job's ``--resume`` path.
        allow_random: accept ``random``.

    Raises:
        CheckpointError: nothing to evaluate (one line naming the ways to give weights).
    """
    from megavid.engine.checkpoint import EXPORT_NAME, get_latest_tag, select_checkpoint

    named = resume or cfg.eval.checkpoint
    if allow_random and named == "random":
        return EvalWeights(None)
    run_dir = Path(cfg.run_dir)
    if named or get_latest_tag(run_dir / "checkpoints") or (run_dir / EXPORT_NAME).is_file():
        sel = select_checkpoint(named or run_dir)
        return EvalWeights(sel.path, sel.step, sel.note)
    imported = get_initial_weights(cfg)
    if "model.weights" in imported:
        if not imported["model.weights"].exists():
            raise CheckpointError(f"model.weights={cfg.model.weights} does not exist; pass an exported "
                                  "file, a run directory or a step_<N> folder")
        # a run directory means its newest weights, recorded as the file or folder they are in
        sel = select_checkpoint(imported["model.weights"], refresh_export=False)
        imported["model.weights"] = Path(sel.path)
        return EvalWeights(sel.path, sel.step, sel.note, imported)
    if imported:
        return EvalWeights(None, imported=imported)
    raise CheckpointError(
        f"no checkpoint to evaluate in {run_dir}; train first (megavid pretrain ...), pass "
        "eval.checkpoint=PATH, or evaluate imported weights (model.weights=PATH, "
        "model.text_weights, model.video_weights)"
        + (" (or eval.checkpoint=random for a random-init baseline)" if allow_random else ""))


def load_eval_model(task: VideoTextTask, weights: EvalWeights) -> nn.Module:
    """The task's model in eval mode on its device, holding ``weights`` (strict): the model
    config's imported weights as built, with the checkpoint (if any) loaded over them.

    Args:
        task: the set-up task (device, config).
        weights: from :func:`select_eval_weights`.
    """
    from megavid.engine.trainer import seed_everything

    seed_everything(task.cfg.run.seed)  # the random-init baseline is reproducible
    model = task.build_model()
    if weights.path is not None and not weights.imported:
        load_model_weights(model, weights.path, task.cfg)
    return model.to(task.device).eval()


def setup_task(task: VideoTextTask) -> None:
    """Sets ``task`` up for this process: its rank and world size from the launcher's
    environment (the process group initialised when there are several), the device of
    ``run.device`` (:func:`megavid.engine.trainer.get_device`, as training picks it) and fp32.

    Args:
        task: the task to set up.
    """
    from megavid.engine.dist import get_world_info, init_distributed
    from megavid.engine.trainer import get_device

    info = get_world_info()
    device = get_device(task.cfg, info.local_rank)
    if info.world_size > 1:
        init_distributed(device_type=device.type)
    task.setup(device, torch.float32, info.rank, info.world_size)


def open_eval(cfg: Config, weights: EvalWeights, task_cls: type[VideoTextTask] = VideoTextTask
              ) -> tuple[VideoTextTask, nn.Module]:
    """The set-up task of an evaluation job and its model holding ``weights``, in eval mode.

    Args:
        cfg: the resolved config.
        weights: from :func:`select_eval_weights`.
        task_cls: the task that builds the model (the plain video-text model by default).
    """
    task = task_cls(cfg)
    setup_task(task)
    return task, load_eval_model(task, weights)


@torch.no_grad()
def encode_split(loader: Any, encode: Callable[[dict[str, Any]], dict[str, torch.Tensor]], *,
                 store: torch.device | str = "cpu") -> dict[str, Any]:
    """Every sample of an evaluation loader once, in dataset order, whatever the number of
    ranks: each rank reads its own part of the split (not a contiguous block), and the batches'
    dataset indices put the gathered rows back in the order one process would give them; the
    sampler's padding (``batch["valid"]`` False) is dropped.

    Args:
        loader: an evaluation loader (``task.build_eval_loader``).
        encode: batch -> ``{name: tensor [B, ...]}``, one row per sample of the batch.
        store: where the tensors are kept.

    Returns:
        ``{name: tensor [N, ...]}`` for every name ``encode`` returns, plus ``keys``, ``meta``
        and ``captions`` (lists of N), on every rank.
    """
    from megavid.eval.gather import gather_features, gather_objects

    tensors: dict[str, list[torch.Tensor]] = defaultdict(list)
    objects: dict[str, list[Any]] = {"keys": [], "meta": [], "captions": []}
    valids, indices = [], []
    for batch in loader:
        for name, value in encode(batch).items():
            tensors[name].append(value.to(store))
        objects["keys"] += batch["keys"]
        objects["meta"] += batch["meta"]
        objects["captions"] += batch["captions"]
        valids.append(batch.get("valid", torch.ones(len(batch["keys"]), dtype=torch.bool)))
        indices.append(batch.get("indices"))
    valid = torch.cat(valids).to(store)
    index = torch.cat(indices) if indices and all(i is not None for i in indices) else None
    out: dict[str, Any] = {name: gather_features(torch.cat(v), valid, indices=index)
                           for name, v in tensors.items()}
    for name, objs in objects.items():
        out[name] = gather_objects(objs, valid, indices=index)
    return out


@torch.no_grad()
def encode_texts(model: nn.Module, texts: list[str], task: VideoTextTask, *, keep_tokens: bool = False,
                 store: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Encodes texts with the task's tokenizer in blocks of ``data.eval_batch_size``, the
    blocks dealt to the ranks in turn and gathered back in order.

    A text is encoded in the same block (same neighbours, same shapes) whatever the number of
    ranks, so 1 and N ranks give the same features. Every rank runs the same number of
    forward passes (one short of blocks re-encodes one, marked invalid): ZeRO-3 gathers
    parameters collectively in each.

    Args:
        model: the model (or a DeepSpeed engine wrapping it).
        texts: the texts (every rank passes the same list).
        task: the task (device, rank, world size, tokenizer, ``data.max_text_len``).
        keep_tokens: also return the text states and masks (for VTM re-ranking).
        store: where the results are kept.

    Returns:
        (features float32 [Q, P], states [Q, L, Dt] or None, masks [Q, L] or None).
    """
    from megavid.data.text import tokenize
    from megavid.eval.gather import gather_features, get_eval_shard

    size = task.cfg.data.eval_batch_size
    blocks, good = get_eval_shard(-(-len(texts) // size), task.rank, task.world_size)
    feats, hids, masks, rows, valid = [], [], [], [], []
    for blk, ok in zip(blocks.tolist(), good.tolist()):
        part = texts[blk * size : (blk + 1) * size]
        ids, mask = tokenize(task.tokenizer, part, task.cfg.data.max_text_len)
        hidden, t = model.encode_text(ids.to(task.device), mask.to(task.device))
        feats.append(t.float().to(store))
        if keep_tokens:
            # kept in the compute dtype (bf16 in bf16 runs): the VTM scorer casts to it anyway
            hids.append(hidden.to(store))
            masks.append(mask.to(store))
        rows.append(torch.arange(blk * size, blk * size + len(part)))
        valid.append(torch.full((len(part),), ok, dtype=torch.bool))
    index, keep = torch.cat(rows), torch.cat(valid)
    feat = gather_features(torch.cat(feats), keep, indices=index, num_samples=len(texts))
    if not keep_tokens:
        return feat, None, None
    return (feat, gather_features(torch.cat(hids), keep, indices=index),
            gather_features(torch.cat(masks), keep, indices=index))
