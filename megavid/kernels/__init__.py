"""Fused kernels for megavid, each with a torch reference (user guide: docs/kernels.md).

Ops (all differentiable, all computing in fp32 and returning the input dtype):

- :func:`layer_norm`: residual add + LayerNorm, ``(y, new_residual)``.
- :func:`bias_gelu`: ``gelu(x + bias)`` with the exact erf GELU.
- :func:`short_attention`: softmax attention over short sequences (T <= 128; the temporal
  attention of divided space-time TimeSformer, T = 8..96) with an optional key padding mask.
- :func:`divided_temporal_attention`: that temporal attention read straight out of the qkv
  projection of a ``[B, 1+N*T, 3*D]`` token tensor (no cls slicing, no permute copies).
- :func:`divided_spatial_attention`: the spatial attention of the same block, also on the
  ``[B, 1+N*T, 3*D]`` qkv and writing ``[B, 1+N*T, D]``: no cls repeat/cat, no (n t)<->(t n)
  permutations (index math inside the kernel).
- :func:`divided_block_forward`: a whole divided space-time block built from the above.

Implementations, chosen by name (:func:`get_impl`, or ``impl=`` on each op):

- ``"torch"``: torch's own fused ops (``F.layer_norm``, ``F.gelu``, SDPA).
- ``"triton"``: the Triton kernels of this package. They run on CUDA tensors; on CPU tensors
  only in a process that imported triton under ``TRITON_INTERPRET=1`` (Triton's interpreter,
  for tests); elsewhere they fall back to ``"torch"`` with a warning.
- ``"apex"``: NVIDIA apex's FusedLayerNorm for :func:`layer_norm` when apex is importable and
  the tensor is on CUDA (apex is never a dependency); the other ops behave as ``"auto"``.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable, ``"torch"`` otherwise.

The plain-math references (``*_ref``, :mod:`megavid.kernels.reference`) are the test oracles;
:mod:`megavid.kernels.aot` compiles every kernel for a GPU architecture without a GPU.

Modules: ``backends`` (names, availability, what runs where), ``norm``, ``gelu``, ``attention``
and ``block`` (the ops and modules), ``fuse`` (:func:`apply_fused_kernels`), ``selection``
(:func:`get_impl`), ``layout`` (the token layout's views); ``_triton``, ``_triton_attention``
and ``_triton_spatial`` hold the Triton kernels. This file only re-exports the public names.
"""

from .attention import (
    MAX_SHORT_T,
    divided_spatial_attention,
    divided_temporal_attention,
    short_attention,
)
from .backends import HAS_TRITON, IMPLS, get_backend, has_apex
from .block import divided_block_forward
from .fuse import apply_fused_kernels
from .gelu import LinearGELU, bias_gelu
from .layout import divided_temporal_qkv
from .norm import FusedLayerNorm, layer_norm
from .reference import (
    bias_gelu_ref,
    divided_spatial_attention_ref,
    divided_temporal_attention_ref,
    layer_norm_ref,
    short_attention_ref,
)
from .selection import KernelImpl, get_impl

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "MAX_SHORT_T",
    "FusedLayerNorm",
    "KernelImpl",
    "LinearGELU",
    "apply_fused_kernels",
    "bias_gelu",
    "bias_gelu_ref",
    "divided_block_forward",
    "divided_spatial_attention",
    "divided_spatial_attention_ref",
    "divided_temporal_attention",
    "divided_temporal_attention_ref",
    "divided_temporal_qkv",
    "get_backend",
    "get_impl",
    "has_apex",
    "layer_norm",
    "layer_norm_ref",
    "short_attention",
    "short_attention_ref",
]
