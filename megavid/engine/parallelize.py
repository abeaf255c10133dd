"""Activation checkpointing and torch.compile of the model, applied by the engine before DeepSpeed
wraps it (torchtitan's ``parallelize.py`` order: AC first, then compile, then the data-parallel
wrapper).

- Activation checkpointing (``model.grad_checkpointing`` = every N blocks,
  ``model.grad_checkpointing_mode`` = what those blocks recompute): the model's
  ``set_grad_checkpointing(every_n, mode=...)`` (timm's API); the blocks checkpoint themselves
  (non-reentrant), so a compiled block traces its checkpoint as part of its graph.
- Compilation (``model.compile``): ``blocks`` compiles each transformer block in place
  (``nn.Module.compile``: parameters, names and the state dict are unchanged). Dynamo caches by
  the code object of the block's ``forward`` with guards on its attributes and input shapes,
  so every block of one class and shape runs one compiled graph: TimeSformer-B compiles one
  graph for its 12 blocks, not 12. ``full`` compiles the whole model's forward.

ZeRO-3 is refused with compilation: its parameters are partitioned between forward passes and
gathered by module hooks that would run inside the compiled code. Tried on CPU (DeepSpeed,
gloo, one process, the tests' tiny VideoLM, 3 steps): ``full`` fails in dynamo (the patch
embedding reads its partitioned weight, shape [0], by attribute); ``blocks`` gives the right
losses but breaks the graph at the hooks (82 graph breaks and 33 graphs for 5 blocks, against
0 and 4 under ZeRO 0-2), so nothing worth compiling is left.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from torch import nn

from megavid.errors import ConfigError
from megavid.models import get_blocks

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "blocks", "full")


def apply_activation_checkpointing(model: nn.Module, every_n: int, mode: str = "full") -> None:
    """Checkpoint every ``every_n``-th block of each tower (0: off), recomputing ``mode``.

    Args:
        model: the model, before DeepSpeed wraps it.
        every_n: ``model.grad_checkpointing``.
        mode: ``model.grad_checkpointing_mode``: "full", "attention" or "mlp".

    Raises:
        ConfigError: a negative ``every_n``; a selective mode without checkpointing; a model
            without ``set_grad_checkpointing`` (or without selective modes); a selective mode
            on fused divided space-time blocks.
    """
    if every_n < 0:
        raise ConfigError(f"model.grad_checkpointing={every_n} must be >= 0 (0: off, N: every N blocks)")
    if every_n == 0:
        if mode != "full":
            raise ConfigError(f"model.grad_checkpointing_mode={mode} has no effect with model.grad_checkpointing=0; "
                              "set model.grad_checkpointing=1 (every block) or N (every N blocks)")
        return
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise ConfigError(f"model.grad_checkpointing={every_n}: {type(model).__name__} has no activation "
                          "checkpointing (set_grad_checkpointing); set model.grad_checkpointing=0")
    if mode == "full":
        setter(every_n)
        return
    if "mode" not in inspect.signature(setter).parameters:
        raise ConfigError(f"model.grad_checkpointing_mode={mode}: {type(model).__name__} only checkpoints whole "
                          "blocks; use model.grad_checkpointing_mode=full")
    fused = [b for b in get_blocks(model)
             if getattr(b, "attention_type", None) == "divided_space_time" and b.kernel_impl != "torch"]
    if fused:
        raise ConfigError(f"model.grad_checkpointing_mode={mode} recomputes part of each block, but "
                          f"model.kernel_impl={fused[0].kernel_impl} runs each divided space-time block as one fused "
                          "function; use model.grad_checkpointing_mode=full or model.kernel_impl=torch")
    setter(every_n, mode=mode)


def check_compile(mode: str, zero_stage: int) -> None:
    """Raise ConfigError for an unknown ``model.compile`` or one that cannot work (ZeRO-3)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile={mode!r} is unknown; valid: {', '.join(COMPILE_MODES)}")
    if mode != "none" and zero_stage == 3:
        raise ConfigError(f"model.compile={mode} does not work with train.zero_stage=3 (ZeRO-3 partitions the "
                          "parameters and gathers them in module hooks inside the compiled code); use "
                          "train.zero_stage=2 (or 0/1), or model.compile=none")


def apply_compile(model: nn.Module, mode: str, *, zero_stage: int, backend: str = "inductor") -> int:
    """torch.compile the model's blocks (``mode="blocks"``) or its whole forward (``"full"``).

    Compilation is lazy: the first forward of each block class and input shape compiles (a
    second shape, e.g. the fusion layers' 3B VTM rows then B MLM rows, recompiles once with a
    dynamic batch dimension; grad on/off and train/eval are separate graphs).

    Args:
        model: the model, after activation checkpointing, before DeepSpeed wraps it.
        mode: ``model.compile``: "none", "blocks" or "full".
        zero_stage: ``train.zero_stage`` (3 is refused).
        backend: torch.compile backend ("inductor"; tests count graphs with others).

    Returns:
        the number of modules compiled (0 for "none").

    Raises:
        ConfigError: an unknown mode, ZeRO-3, or ``blocks`` on a model without blocks.
    """
    check_compile(mode, zero_stage)
    if mode == "none":
        return 0
    if mode == "full":
        model.compile(backend=backend)
        return 1
    blocks = get_blocks(model)
    if not blocks:
        raise ConfigError(f"model.compile=blocks: {type(model).__name__} has no transformer blocks "
                          "(TimeSformer Block / BertLayer); use model.compile=full or none")
    for blk in blocks:
        blk.compile(backend=backend)
    return len(blocks)


def apply_model_options(model: nn.Module, model_cfg: Any, *, zero_stage: int, backend: str = "inductor") -> dict:
    """Activation checkpointing, then compilation, from the ``model`` config section.

    Args:
        model: the model, before DeepSpeed wraps it.
        model_cfg: ``cfg.model`` (``grad_checkpointing``, ``grad_checkpointing_mode``, ``compile``).
        zero_stage: ``train.zero_stage``.
        backend: torch.compile backend.

    Returns:
        ``{"grad_checkpointing": N, "grad_checkpointing_mode": mode, "compile": mode,
        "compiled_modules": n}`` (logged by the trainer).
    """
    check_compile(model_cfg.compile, zero_stage)  # before any change to the model
    apply_activation_checkpointing(model, model_cfg.grad_checkpointing, model_cfg.grad_checkpointing_mode)
    n = apply_compile(model, model_cfg.compile, zero_stage=zero_stage, backend=backend)
    info = {"grad_checkpointing": model_cfg.grad_checkpointing,
            "grad_checkpointing_mode": model_cfg.grad_checkpointing_mode,
            "compile": model_cfg.compile, "compiled_modules": n}
    if n or model_cfg.grad_checkpointing:
        log.info("model options: %s", info)
    return info
