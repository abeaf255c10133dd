"""TimeSformer variants by name (timm's ``create_model`` style), read from the model configs: a
variant is the ``video`` section of ``configs/model/<name>.yaml``, resolved as ``model=<name>``
resolves it, so a size such as TimeSformer-B (``timesformer_base``) is written once, in the
config a job loads, and both name it the same way. The one variant defined here,
``timesformer_tiny_test`` (2 blocks at 32², for tests), names no model config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megavid.config import CONFIG_DIR, VideoEncoderConfig, compose
from megavid.models.timesformer import TimeSformer, build_timesformer

TIMESFORMER_VARIANTS: dict[str, VideoEncoderConfig] = {
    **{p.stem: compose([f"model={p.stem}"]).model.video
       for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))},
    "timesformer_tiny_test": VideoEncoderConfig(img_size=32, patch_size=16, num_frames=4, embed_dim=64,
                                                depth=2, num_heads=2),
}
"""Variant name -> its video tower settings: every model config, plus the tiny test tower."""


def create_timesformer(name: str, *, attn_impl: str = "sdpa", kernel_impl: str = "torch",
                       **overrides: Any) -> TimeSformer:
    """Build a variant, e.g. ``create_timesformer("timesformer_tiny_test", num_frames=4)``.

    Args:
        name: a key of ``TIMESFORMER_VARIANTS``.
        attn_impl: ``model.attn_impl``.
        kernel_impl: ``model.kernel_impl``.
        **overrides: ``model.video`` settings replacing the variant's (checked like the config's).
    """
    if name not in TIMESFORMER_VARIANTS:
        raise ValueError(f"unknown TimeSformer variant {name!r}; valid: {', '.join(sorted(TIMESFORMER_VARIANTS))}")
    return build_timesformer(dataclasses.replace(TIMESFORMER_VARIANTS[name], **overrides), attn_impl, kernel_impl)


__all__ = ["TIMESFORMER_VARIANTS", "create_timesformer"]
