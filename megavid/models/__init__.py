"""Models: TimeSformer video encoder, BERT text/fusion encoder, the combined VideoLM.

``build_model(model_cfg)`` looks ``model_cfg.name`` up in ``MODEL_REGISTRY`` (a dict filled by
``@register_model``); TimeSformer variants by name are the model configs
(``configs/model/<name>.yaml``, :mod:`megavid.models.variants`).
Models are plain single-device modules: no torch.distributed, DeepSpeed or data code here.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from megavid.errors import ConfigError
from megavid.models.bert import BertLayer, BertSelfAttention
from megavid.models.timesformer import Block

BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, BertLayer)
"""Transformer block classes: the units of activation checkpointing and regional compilation."""

MODEL_REGISTRY: dict[str, Callable[[Any], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Register ``fn(model_cfg) -> nn.Module`` under ``name``; a duplicate name raises."""

    def deco(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"duplicate model name {name!r}")
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


def get_model_names() -> list[str]:
    return sorted(MODEL_REGISTRY)


def build_model(model_cfg: Any) -> nn.Module:
    """Build the model named by ``model_cfg.name`` (e.g. "videolm") from a ``ModelConfig``.

    ``model_cfg.kernel_impl`` reaches the TimeSformer blocks at construction (a constructor
    argument, like ``attn_impl``); the fused modules are swapped in afterwards
    (:func:`apply_kernels`). Activation checkpointing (``model.grad_checkpointing``,
    ``grad_checkpointing_mode``) and ``model.compile`` are training decisions the engine applies
    (``megavid.engine.parallelize.apply_model_options``). Weight files named in the config are
    loaded by the task (``megavid.tasks.base.load_initial_weights``), not here.

    Args:
        model_cfg: the ``model`` section of the config.
    """
    if model_cfg.name not in MODEL_REGISTRY:
        raise ConfigError(
            f"unknown model.name={model_cfg.name!r}; valid: {', '.join(get_model_names())}"
        )
    model = MODEL_REGISTRY[model_cfg.name](model_cfg)
    if model_cfg.kernel_impl != "torch":
        apply_kernels(model, model_cfg.kernel_impl)
    return model


def apply_kernels(model: nn.Module, impl: str) -> dict[str, int]:
    """Switch ``model`` to megavid.kernels' fused ops (before DeepSpeed wraps it).

    LayerNorms become residual-fused LayerNorms and timm-style MLPs bias+GELU-fused
    (``apply_fused_kernels``; parameters and names unchanged), BERT self-attention runs
    ``short_attention`` and BERT layers fuse each residual add into their post-norm. Divided
    space-time blocks run the fused block when they were built with ``kernel_impl=impl``
    (a TimeSformer constructor argument); a block built with another one is refused.

    Args:
        model: the model.
        impl: ``model.kernel_impl`` ("triton", "apex", "auto"; "torch" restores nothing).

    Returns:
        counts of swapped modules, plus "divided_block", "bert_attention" and "bert_layer".

    Raises:
        ValueError: a divided space-time block built with another ``kernel_impl``.
    """
    from megavid.kernels import apply_fused_kernels, get_impl

    get_impl(impl)  # unknown names raise ConfigError listing the valid ones
    blocks = [m for m in model.modules() if isinstance(m, Block) and m.attention_type == "divided_space_time"]
    other = sorted({b.kernel_impl for b in blocks} - {impl})
    if other:
        raise ValueError(f"apply_kernels({impl!r}): divided space-time blocks were built with kernel_impl="
                         f"{other[0]!r}; build the TimeSformer with kernel_impl={impl!r} (build_model does)")
    counts = apply_fused_kernels(model, impl)
    counts.update(divided_block=len(blocks), bert_attention=0, bert_layer=0)
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.kernel_impl = impl
            counts["bert_attention"] += 1
        elif isinstance(m, BertLayer):
            m.kernel_impl = impl
            counts["bert_layer"] += 1
    return counts


def get_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: every TimeSformer ``Block`` and ``BertLayer`` (text
    and fusion layers, momentum towers included), in module order. They are the units the
    engine checkpoints and compiles (``megavid.engine.parallelize``): blocks of one class and
    input shape run the same code.
    """
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]


@register_model("videolm")
def _build_videolm(model_cfg: Any) -> nn.Module:
    from megavid.models.videolm import VideoLM

    return VideoLM(model_cfg)


__all__ = ["BLOCK_TYPES", "MODEL_REGISTRY", "apply_kernels", "build_model", "get_blocks", "get_model_names",
           "register_model"]
