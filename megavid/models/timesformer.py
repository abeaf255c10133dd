"""TimeSformer video encoder.

Paper: "Is Space-Time Attention All You Need for Video Understanding?", Bertasius, Wang and
Torresani, ICML 2021 (https://arxiv.org/abs/2102.05095); reference code
facebookresearch/TimeSformer. Parameter names follow that code (and timm's ViT), so image ViT
checkpoints map onto it one to one; ``checkpoint_filter_fn`` also reads HF
``TimesformerModel`` state dicts and original TimeSformer checkpoints.

Token layout (identical to the reference and to ``transformers.TimesformerModel``): a cls token
followed by the patch tokens in patch-major, frame-minor order, i.e. ``x_BLD[:, 1 + n * T + t]``
is patch ``n`` of frame ``t``. Attention modes:

- ``divided_space_time``: per block, temporal attention over the T frames of each patch (cls
  excluded) followed by ``temporal_fc``, then spatial attention over the N patches of each
  frame together with a per-frame copy of the cls token; the T cls outputs are averaged.
  Between blocks the tower keeps the cls token and the patch tokens as two tensors (the
  "split" layout, ``Tokens``), so no block slices the token tensor or concatenates it back.
- ``space_only``: a per-frame ViT; the cls token is averaged over frames at the end.
- ``joint_space_time``: full attention over all 1 + N*T tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megavid.models.attention import CHECKPOINT_MODES, SelfAttention, build_layer_norm, checkpoint_part

ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")
Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A block's token input: packed [B, 1 + N*T, D], or the split (cls, patches) layout."""


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drops the residual branch."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Drop ``x``'s rows per sample; tensors in ``more`` (same leading batch size, e.g. the
        cls and patch parts of one token sequence) get the same per-sample mask."""
        if self.p == 0.0 or not self.training:
            return (x, *more) if more else x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if not more:
            return x * mask / keep
        return tuple(t * mask.view((t.shape[0],) + (1,) * (t.ndim - 1)) / keep for t in (x, *more))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Per-frame patch embedding: [B, T, C, H, W] -> [B*T, N, D].

    The parameters are a ``Conv2d``'s (kernel = stride = patch size: timm's, transformers' and
    the checkpoints' layout), but the forward is the same product written as a matmul over the
    cut-out patches. PyTorch 2.14's oneDNN bf16 convolution on CPUs with AMX returns wrong
    values for this shape (cosine 0.01 with the fp32 result for 6 input channels, 16x16, 128
    outputs, on a Xeon with amx_bf16; right on CPUs without AMX): a bf16 run trained through
    it, and its fp32 evaluation then saw other features (the demo fell to chance). A matmul
    runs the same on every CPU and GPU, and costs no more for non-overlapping patches.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BTCHW: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = x_BTCHW.shape
        p = self.patch_size
        gh, gw = H // p, W // p  # as the convolution: a remainder narrower than a patch is dropped
        x = x_BTCHW[..., : gh * p, : gw * p].reshape(B * T, C, gh, p, gw, p)
        # [B*T, gh, gw, C, p, p]: each patch flattened in the weight's (C, kh, kw) order
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B * T, gh * gw, C * p * p)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class Block(nn.Module):
    """One TimeSformer block (pre-norm).

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the qkv projections.
        attention_type: one of ``ATTENTION_TYPES``.
        drop_path: stochastic depth rate of this block.
        eps: LayerNorm epsilon.
        attn_impl: "sdpa" or "math".
        kernel_impl: megavid.kernels implementation the divided space-time block runs as one
            fused function ("triton", "apex", "auto"; "torch": the unfused path). Other
            attention types ignore it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention_type: str = "divided_space_time",
        drop_path: float = 0.0,
        eps: float = 1e-6,
        attn_impl: str = "sdpa",
        kernel_impl: str = "torch",
    ) -> None:
        super().__init__()
        self.attention_type = attention_type
        self.norm1 = build_layer_norm(dim, eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, impl=attn_impl)
        if attention_type == "divided_space_time":
            self.temporal_norm1 = build_layer_norm(dim, eps)
            self.temporal_attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, impl=attn_impl)
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = build_layer_norm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.kernel_impl = kernel_impl
        self.checkpoint_mode: str | None = None
        """Activation checkpointing of this block in training (set by the tower's
        ``set_grad_checkpointing``): None (off), 'full' (the whole block), 'attention' (each
        attention branch: norm, qkv, attention, projection), 'mlp' (norm2 and the MLP)."""

    def forward(self, x: Tokens, num_frames: int) -> Tokens:
        """Args:
        x: [B, 1 + N*T, D] (divided, joint) or [B*T, 1 + N, D] (space_only); divided blocks
            also take the split layout ``(cls [B, 1, D], patches [B, N*T, D])``, in which the
            tower runs them (no cls slicing or re-concatenation per block).
        num_frames: T.

        Returns:
            the block's output in the layout of ``x``.
        """
        return checkpoint_part(self, "full", self._forward, x, num_frames)

    def _forward(self, x: Tokens, T: int) -> Tokens:
        if self.attention_type != "divided_space_time":
            x = x + self.drop_path(checkpoint_part(self, "attention", self._attention, x))
            return x + checkpoint_part(self, "mlp", self._mlp, x)
        if self.kernel_impl != "torch":
            if self.checkpoint_mode in ("attention", "mlp"):
                raise ValueError(f"grad checkpointing mode {self.checkpoint_mode!r} needs the unfused "
                                 "divided block (kernel_impl='torch'); the fused block is one function")
            from megavid.kernels import divided_block_forward

            packed = x if isinstance(x, torch.Tensor) else torch.cat(x, dim=1)
            # The same block with fused kernels and no token-tensor copies (same parameters).
            out = divided_block_forward(
                packed, T, self.attn.num_heads,
                temporal_norm=self.temporal_norm1, temporal_qkv=self.temporal_attn.qkv,
                temporal_proj=self.temporal_attn.proj, temporal_fc=self.temporal_fc,
                norm1=self.norm1, qkv=self.attn.qkv, proj=self.attn.proj, norm2=self.norm2,
                fc1=self.mlp.fc1, fc2=self.mlp.fc2, drop_path=self.drop_path, impl=self.kernel_impl,
            )
            return out if isinstance(x, torch.Tensor) else (out[:, :1], out[:, 1:])
        if isinstance(x, torch.Tensor):
            cls_B1D, xt_BMD = self._divided(*x.split((1, x.shape[1] - 1), dim=1), T)
            return torch.cat((cls_B1D, xt_BMD), dim=1)
        return self._divided(*x, T)

    # -- branches (the units of selective activation checkpointing) --------------------------
    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.mlp(self.norm2(x)))

    def _mlp_split(self, cls_B1D: torch.Tensor, xt_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one drop-path mask per sample for its cls and patch rows, as on the packed sequence
        return self.drop_path(self.mlp(self.norm2(cls_B1D)), self.mlp(self.norm2(xt_BMD)))

    def _temporal(self, xt_BMD: torch.Tensor, T: int) -> torch.Tensor:
        """Temporal attention: each patch attends over its T frames (the cls token does not
        take part, as in the reference); patch-major layout makes this a free reshape."""
        B, M, D = xt_BMD.shape
        h = self.temporal_attn(self.temporal_norm1(xt_BMD.reshape(B * (M // T), T, D)))
        return self.temporal_fc(self.drop_path(h).reshape(B, M, D))

    def _spatial(self, cls_B1D: torch.Tensor, xt_BMD: torch.Tensor, T: int) -> torch.Tensor:
        """Spatial attention: each frame's N patches plus that frame's copy of the cls token;
        returns [B, T, 1 + N, D] (frame-major)."""
        B, M, D = xt_BMD.shape
        N = M // T
        # One strided cat builds the frame-major [B, T, 1+N, D] layout (no separate permute copy).
        s = torch.cat(
            (cls_B1D[:, None].expand(B, T, 1, D), xt_BMD.view(B, N, T, D).transpose(1, 2)), dim=2
        ).view(B * T, N + 1, D)
        return self.drop_path(self.attn(self.norm1(s))).view(B, T, N + 1, D)

    def _divided(self, cls_B1D: torch.Tensor, xt_BMD: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfused divided space-time block on the split layout: cls [B, 1, D] and the
        patch tokens [B, N*T, D] (patch-major) stay separate tensors, so neither the temporal
        reshape nor the residual updates copy the token tensor (and backward has no slice
        gradients to zero-fill and scatter)."""
        B, M, D = xt_BMD.shape
        N = M // T
        xt_BMD = xt_BMD + checkpoint_part(self, "attention", self._temporal, xt_BMD, T)
        s = checkpoint_part(self, "attention", self._spatial, cls_B1D, xt_BMD, T)
        # The T per-frame cls outputs are averaged back into one cls residual; the patch
        # residual is added through a strided (t n -> n t) view instead of a permuted copy.
        # split, not s[:, :, 0] and s[:, :, 1:]: its backward concatenates the two gradients,
        # where indexing and slicing each zero-fill a gradient the size of s and sum them.
        s_cls, s_patches = s.split((1, N), dim=2)
        cls_B1D = cls_B1D + s_cls.mean(dim=1)
        xt_BMD = (xt_BMD.view(B, N, T, D) + s_patches.transpose(1, 2)).reshape(B, M, D)
        h_cls, h = checkpoint_part(self, "mlp", self._mlp_split, cls_B1D, xt_BMD)
        return cls_B1D + h_cls, xt_BMD + h


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class TimeSformer(nn.Module):
    """TimeSformer video encoder.

    Args:
        img_size: input height and width (square clips).
        patch_size: patch side.
        num_frames: T of the clips (the time embedding's length).
        in_chans: input channels.
        embed_dim: width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on qkv projections.
        attention_type: "divided_space_time", "space_only" or "joint_space_time".
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this rate.
        layer_norm_eps: LayerNorm epsilon.
        attn_impl: "sdpa" or "math".
        kernel_impl: megavid.kernels implementation of the divided space-time blocks (see
            :class:`Block`; "torch": unfused).
        rgb_diff: also feed the frame differences x[t] - x[t-1] as ``in_chans`` extra input
            channels (:func:`add_rgb_diff`; TSN's RGB difference), a motion cue from step one.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 8,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention_type: str = "divided_space_time",
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
        kernel_impl: str = "torch",
        rgb_diff: bool = False,
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {attention_type!r}; valid: {', '.join(ATTENTION_TYPES)}")
        self.attention_type = attention_type
        self.num_frames = num_frames
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.rgb_diff = rgb_diff
        self.kernel_impl = kernel_impl
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans * (2 if rgb_diff else 1), embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                attention_type=attention_type, drop_path=dpr[i], eps=layer_norm_eps, attn_impl=attn_impl,
                kernel_impl=kernel_impl,
            )
            for i in range(depth)
        )
        self.norm = build_layer_norm(embed_dim, layer_norm_eps)
        self.grad_checkpointing = 0
        self.grad_checkpointing_mode = "full"
        init_weights(self)

    # -- API shared with the BERT tower ---------------------------------------------------------
    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        """Recompute (part of) every ``every_n``-th block in backward (0: off); non-reentrant.

        Args:
            every_n: blocks i with ``i % every_n == 0`` are checkpointed (1: all blocks).
            mode: what those blocks recompute: "full" (the whole block), "attention" (the
                attention branches) or "mlp" (the MLP); see ``CHECKPOINT_MODES``.
        """
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"unknown checkpointing mode {mode!r}; valid: {', '.join(CHECKPOINT_MODES)}")
        self.grad_checkpointing = int(every_n)
        self.grad_checkpointing_mode = mode
        for i, blk in enumerate(self.blocks):
            blk.checkpoint_mode = mode if every_n > 0 and i % every_n == 0 else None

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "time_embed"}

    def forward_features(self, x_BTCHW: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, 1 + N*T, D], cls first, patch-major."""
        B, T = x_BTCHW.shape[:2]
        if self.rgb_diff:
            x_BTCHW = add_rgb_diff(x_BTCHW)
        x = self.patch_embed(x_BTCHW)  # [B*T, N, D]
        N, D = x.shape[1], x.shape[2]
        pos = self.pos_embed
        if N + 1 != pos.shape[1]:
            pos = resize_pos_embed(pos, int(math.isqrt(N)))
        cls = (self.cls_token + pos[:, :1]).expand(B * T, 1, D)
        x = x + pos[:, 1:]
        if self.attention_type == "space_only":
            x = torch.cat((cls, x), dim=1)  # per-frame ViT
            for blk in self.blocks:
                x = blk(x, T)
            x = self.norm(x).reshape(B, T, N + 1, D)
            cls_out = x[:, :, 0].mean(dim=1, keepdim=True)
            return torch.cat((cls_out, x[:, :, 1:].transpose(1, 2).reshape(B, N * T, D)), dim=1)

        time = self.time_embed
        if T != time.shape[1]:
            # Clips longer (or shorter) than training, e.g. 96-frame evaluation of a 32-frame
            # model (eval.num_frames): resized per forward, never stored. The parameter keeps
            # its trained shape, so the checkpoint loads strictly, training resumes after an
            # in-training eval, and under ZeRO-3 the (gathered-for-this-forward) partitioned
            # parameter is never replaced; the cost is one [1, T, D] interpolation per call.
            time = resize_time_embed(time, T)
        # [B*T, N, D] -> [B, N, T, D] (+ time embed per frame) -> patch-major [B, N*T, D]
        patches = (x.reshape(B, T, N, D).transpose(1, 2) + time[:, None]).reshape(B, N * T, D)
        # a real [B, 1, D] tensor, not a stride-0 view: the blocks see the same strides at
        # every depth (a compiled block would otherwise compile a second graph for block 0)
        cls = cls[:B].contiguous()
        if self.attention_type == "divided_space_time" and self.kernel_impl == "torch":
            # Unfused divided blocks run on the split (cls, patches) layout: one concatenation
            # per forward instead of a slice + cat (and their backward copies) per block.
            x_split: Tokens = (cls, patches)
            for blk in self.blocks:
                x_split = blk(x_split, T)
            return self.norm(torch.cat(x_split, dim=1))
        x = torch.cat((cls, patches), dim=1)
        for blk in self.blocks:
            x = blk(x, T)
        return self.norm(x)

    def forward(self, x_BTCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x_BTCHW: normalised float clips [B, T, C, H, W].

        Returns:
            (tokens [B, 1 + N*T, D] after the final norm, pooled cls [B, D]).
        """
        tokens = self.forward_features(x_BTCHW)
        return tokens, tokens[:, 0]


# --------------------------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------------------------
def init_weights(model: TimeSformer) -> None:
    """timm ViT init: trunc-normal(0.02) linears and embeddings, zero temporal_fc.

    temporal_fc starts at zero so that a fresh (or ViT-inflated) model is exactly a per-frame
    image model; the temporal branch then learns from there (as in the reference code).
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    for blk in model.blocks:
        if hasattr(blk, "temporal_fc"):
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)


# --------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------
def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a [1, 1 + g*g, D] spatial position embedding to ``new_grid``² (cls kept)."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(grid.shape[1]))
    if old == new_grid:
        return pos_embed
    D = grid.shape[-1]
    g = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat((cls, g), dim=1)


def resize_time_embed(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Nearest-neighbour resize of a [1, T, D] time embedding (as the reference code does)."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    t = F.interpolate(time_embed.transpose(1, 2).float(), size=num_frames, mode="nearest")
    return t.transpose(1, 2).to(time_embed.dtype)


_HF_BLOCK_MAP = {
    "attention.attention.qkv": "attn.qkv",
    "attention.output.dense": "attn.proj",
    "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj",
    "temporal_dense": "temporal_fc",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "temporal_layernorm": "temporal_norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.time_embeddings": "time_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Keys of classification heads / poolers that a video encoder never uses.
_DROP_PREFIXES = ("head.", "classifier.", "fc_norm.", "head_drop.", "pre_logits.")


def _convert_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("timesformer.")
        if k in _HF_TOP_MAP:
            out[_HF_TOP_MAP[k]] = v
        elif k.startswith("encoder.layer."):
            idx, rest = k[len("encoder.layer."):].split(".", 1)
            name, leaf = rest.rsplit(".", 1)
            out[f"blocks.{idx}.{_HF_BLOCK_MAP.get(name, name)}.{leaf}"] = v
        else:
            out[k] = v
    return out


def add_rgb_diff(x_BTCHW: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, 2C, H, W]: each frame followed by its difference from the
    previous frame (zeros for the first), TSN's "RGB difference" as extra channels."""
    diff = torch.cat((torch.zeros_like(x_BTCHW[:, :1]), x_BTCHW[:, 1:] - x_BTCHW[:, :-1]), dim=1)
    return torch.cat((x_BTCHW, diff), dim=2)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: TimeSformer) -> dict[str, torch.Tensor]:
    """Convert a video or image checkpoint to this model's keys and sizes.

    Accepts (detected from the keys): HF ``TimesformerModel`` / ``TimesformerForVideoClassification``,
    the original TimeSformer (``model.`` prefix), timm ViT (``vit_*_patch16_224`` layout: the
    image model is inflated: attention and norm1 are copied into the temporal branch and
    ``temporal_fc`` is zeroed, so the result starts as the image model), and our own keys.
    ``pos_embed`` is resized to the model's image size and ``time_embed`` to its frame count.
    Heads are dropped. Shape checks and the missing/unexpected report are left to the loader.

    Args:
        state_dict: the source tensors (``state_dict``/``model`` wrappers already removed).
        model: the target model (decides attention type, grid and frame count).
    """
    sd = dict(state_dict)
    if any(k.startswith(("embeddings.", "timesformer.", "encoder.layer.")) for k in sd):
        sd = _convert_hf(sd)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}

    target = model.state_dict()
    divided = model.attention_type == "divided_space_time"
    is_image = not any(".temporal_" in k for k in sd) and "time_embed" not in sd
    if divided and is_image:
        # Inflate an image ViT: the temporal branch starts as a copy of the spatial one with a
        # zero output projection, so the video model initially equals the image model.
        for i in range(len(model.blocks)):
            p = f"blocks.{i}."
            for leaf in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"):
                if p + leaf in sd:
                    sd[p + "temporal_" + leaf] = sd[p + leaf].clone()
            for leaf in ("weight", "bias"):
                if p + "norm1." + leaf in sd:
                    sd[p + "temporal_norm1." + leaf] = sd[p + "norm1." + leaf].clone()
                if p + "temporal_fc." + leaf in target:
                    sd[p + "temporal_fc." + leaf] = torch.zeros_like(target[p + "temporal_fc." + leaf])
    if not divided:
        # space_only / joint models have no temporal branch: drop it from divided checkpoints.
        sd = {k: v for k, v in sd.items() if ".temporal_" not in k}
    if "time_embed" in target and "time_embed" not in sd and is_image:
        sd["time_embed"] = torch.zeros_like(target["time_embed"])
    if "time_embed" not in target:
        sd.pop("time_embed", None)

    w = sd.get("patch_embed.proj.weight")
    if (model.rgb_diff and w is not None and w.ndim == 4
            and 2 * w.shape[1] == target["patch_embed.proj.weight"].shape[1]):
        # an RGB checkpoint into an rgb_diff model: zero weights on the difference channels,
        # so the imported model starts as the RGB one
        sd["patch_embed.proj.weight"] = torch.cat((w, torch.zeros_like(w)), dim=1)
    if "pos_embed" in sd and sd["pos_embed"].ndim == 3 and sd["pos_embed"].shape[-1] == model.embed_dim:
        grid = model.patch_embed.grid
        if sd["pos_embed"].shape[1] != grid * grid + 1:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid)
    if "time_embed" in sd and "time_embed" in target and sd["time_embed"].shape[-1] == model.embed_dim:
        sd["time_embed"] = resize_time_embed(sd["time_embed"], model.num_frames)
    return sd


def build_timesformer(video_cfg: Any, attn_impl: str = "sdpa", kernel_impl: str = "torch") -> TimeSformer:
    """TimeSformer from a ``VideoEncoderConfig``.

    Args:
        video_cfg: ``model.video`` section.
        attn_impl: ``model.attn_impl``.
        kernel_impl: ``model.kernel_impl``.
    """
    return TimeSformer(
        img_size=video_cfg.img_size, patch_size=video_cfg.patch_size, num_frames=video_cfg.num_frames,
        in_chans=video_cfg.in_chans, embed_dim=video_cfg.embed_dim, depth=video_cfg.depth,
        num_heads=video_cfg.num_heads, mlp_ratio=video_cfg.mlp_ratio, qkv_bias=video_cfg.qkv_bias,
        attention_type=video_cfg.attention_type, drop_path_rate=video_cfg.drop_path_rate,
        layer_norm_eps=video_cfg.layer_norm_eps, attn_impl=attn_impl, kernel_impl=kernel_impl,
        rgb_diff=video_cfg.rgb_diff,
    )
