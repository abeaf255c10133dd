"""The ``model`` section of the configuration: the video tower, the text tower and the
objectives of the combined model (:class:`ModelConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megavid.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class VideoEncoderConfig:
    """TimeSformer video encoder."""

    img_size: int = 224
    """Frame height and width in pixels that the tower is built for (square clips; data.img_size
    must equal it, and follows it when 0). A multiple of ``patch_size``; the position embedding has
    (img_size / patch_size)^2 + 1 entries, resized bicubically for weights or clips of another
    size."""
    patch_size: int = 16
    """Side in pixels of the square patches each frame is cut into, one token per patch: a clip is
    num_frames x (img_size / patch_size)^2 video tokens plus the cls token."""
    num_frames: int = 8
    """Frames per training clip (1..96), the length of the learnt time embedding; data.num_frames
    must equal it (and follows it when 0). Evaluation may use another length (eval.num_frames)."""
    in_chans: int = 3
    """Input channels per frame: 3, the RGB clips every loader produces (with ``rgb_diff`` the patch
    embedding takes twice as many)."""
    embed_dim: int = 768
    """Token width of the video tower; a multiple of ``num_heads``. The VTC video projection, the QA
    head and the fusion layers' cross-attention (unless model.text.encoder_width is set) take tokens
    of this width."""
    depth: int = 12
    """Number of TimeSformer blocks."""
    num_heads: int = 12
    """Attention heads of every block (spatial and temporal attention alike); must divide
    ``embed_dim``."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP as a multiple of ``embed_dim`` (4.0: 3072 for 768)."""
    qkv_bias: bool = True
    """Learnt biases on the query / key / value projections of every attention (ViT and TimeSformer
    checkpoints have them)."""
    attention_type: Literal["divided_space_time", "space_only", "joint_space_time"] = (
        "divided_space_time"
    )
    """How a block attends: 'divided_space_time' (temporal attention among the frames of each patch
    position, then spatial attention within each frame: TimeSformer's default); 'space_only' (a
    per-frame ViT without time embedding, its cls token averaged over frames); 'joint_space_time'
    (one attention over the patches of all frames, its cost quadratic in frames x patches)."""
    drop_path_rate: float = 0.0
    """Stochastic depth in training: each block skips its residual branches for a random part of the
    batch, at a rate rising linearly from 0 at the first block to this at the last (0: off)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the video tower's LayerNorms (1e-6, as in timm's ViT)."""
    rgb_diff: bool = False
    """Append the frame differences x[t] - x[t-1] (zero for the first frame) to each frame as
    ``in_chans`` extra input channels (TSN's "RGB difference"). A TimeSformer trained from
    scratch only sees motion once its temporal attention has learnt to compare frames, which
    a small model on a short budget never gets to (the synthetic demo's direction stayed at
    chance, even as a supervised 4-way label); with the differences it reads direction off
    single tokens. Imported RGB weights get zero weights for these channels."""

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.video.img_size={self.img_size} is not a multiple of "
                f"model.video.patch_size={self.patch_size}; pick sizes that divide"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.video.embed_dim={self.embed_dim} is not divisible by "
                f"model.video.num_heads={self.num_heads}"
            )
        if not 1 <= self.num_frames <= 96:
            raise ConfigError(f"model.video.num_frames={self.num_frames} must be in 1..96")


@dataclass(kw_only=True, slots=True)
class TextEncoderConfig:
    """BERT text encoder; the last ``fusion_layers`` layers cross-attend to video tokens."""

    vocab_size: int = 30522
    """Rows of the word embedding, whose matrix is also the MLM output layer (tied); must exceed
    every id the tokenizer (data.tokenizer) produces. 30522: the uncased BERT / MiniLM WordPiece
    vocabulary."""
    hidden_size: int = 768
    """Width of the text tower; a multiple of ``num_heads``. The VTC text projection and the VTM,
    MLM and QA heads read states of this width."""
    num_layers: int = 12
    """BERT layers in all: the first ``num_layers - fusion_layers`` read text only (their output
    gives the VTC text feature), the last ``fusion_layers`` also cross-attend to the video
    tokens."""
    fusion_layers: int = 6
    """How many of ``num_layers`` are fusion layers (cross-attention to video)."""
    num_heads: int = 12
    """Attention heads of every text layer's self- and cross-attention; must divide
    ``hidden_size``."""
    intermediate_size: int = 3072
    """Hidden width of each text layer's feed-forward block (BERT-base: 3072 = 4 x hidden_size)."""
    max_position_embeddings: int = 512
    """Rows of the learnt absolute position embedding: the longest text the tower accepts
    (data.max_text_len must not exceed it)."""
    type_vocab_size: int = 2
    """Rows of the token-type (segment) embedding. megavid feeds every token as type 0; 2 matches
    BERT checkpoints, so they load."""
    layer_norm_eps: float = 1e-12
    """Epsilon of the text tower's LayerNorms and the MLM head's (1e-12, as in BERT)."""
    hidden_dropout: float = 0.0
    """Dropout probability in training on the text embeddings and on every residual branch
    (self-attention, cross-attention and feed-forward outputs) of the text tower (0: off; BERT used
    0.1)."""
    attention_dropout: float = 0.0
    """Dropout probability in training on the attention weights of the text tower's self- and
    cross-attention (0: off)."""
    encoder_width: int = 0
    """Width of the video tokens the fusion layers attend to (0: model.video.embed_dim)."""

    def __post_init__(self) -> None:
        if not 0 <= self.fusion_layers <= self.num_layers:
            raise ConfigError(
                f"model.text.fusion_layers={self.fusion_layers} must be between 0 and "
                f"model.text.num_layers={self.num_layers}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.text.hidden_size={self.hidden_size} is not divisible by "
                f"model.text.num_heads={self.num_heads}"
            )


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The combined video-language model and its objectives."""

    name: str = "videolm"
    """Registered model builder."""
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    proj_dim: int = 256
    """Dimension of the VTC projection space."""
    temperature: float = 0.07
    """Initial VTC temperature (learnable)."""
    video_pool: Literal["cls", "mean"] = "cls"
    """Video feature for VTC: the cls output (TimeSformer) or the mean of the patch tokens."""
    text_pool: Literal["cls", "mean"] = "cls"
    """Text feature for VTC: the [CLS] state (BERT/ALPRO) or the masked token mean (MiniLM)."""
    attn_impl: Literal["sdpa", "math"] = "sdpa"
    """'sdpa': torch scaled_dot_product_attention; 'math': plain reference path."""
    kernel_impl: Literal["torch", "triton", "apex", "auto"] = "torch"
    """Fused kernels (megavid.kernels: add+LayerNorm, bias+GELU, divided space-time attention):
    'torch' (off), 'triton', 'apex' (LayerNorm only), 'auto' (Triton on CUDA, else torch)."""
    grad_checkpointing: int = 0
    """Activation checkpointing every N blocks in both towers (0: off)."""
    grad_checkpointing_mode: Literal["full", "attention", "mlp"] = "full"
    """What the blocks chosen by ``grad_checkpointing`` recompute in backward: 'full' (the whole
    block), 'attention' (only the attention branches: norm, qkv, attention, output projection;
    the MLP's activations stay saved) or 'mlp' (only norm + MLP). Selective modes save memory
    between none and full for less recompute; they need grad_checkpointing > 0, and
    kernel_impl=torch for divided space-time blocks (the fused block is one function)."""
    compile: Literal["none", "blocks", "full"] = "none"
    """torch.compile, applied by the engine before DeepSpeed wraps the model: 'none';
    'blocks' (regional: each TimeSformer block and BERT layer, compiled once per block class
    and input shape and shared by all blocks of that shape); 'full' (the whole model's forward,
    with graph breaks where it must). Needs train.zero_stage <= 2."""
    vtc_weight: float = 1.0
    """Weight of the video-text contrastive loss (symmetric InfoNCE between the projected video and
    text features) in the training loss (0: off). VTC needs text-only layers
    (model.text.fusion_layers < num_layers); model.momentum > 0 needs it on."""
    vtm_weight: float = 0.0
    """Weight of the video-text matching loss (0: off): the fusion layers classify each positive
    pair, and per pair a hard negative video and a hard negative text drawn from the VTC
    similarities, as match / no match. Needs fusion layers. When > 0, retrieval evaluation
    (eval-zeroshot, the retrieval task) re-ranks each query's top ``eval.k_test`` candidates with
    the VTM head."""
    mlm_weight: float = 0.0
    """Weight of the masked language modelling loss (0: off): caption tokens masked at
    ``mlm_probability`` are predicted from the output of the fusion layers, which see the video.
    Needs fusion layers."""
    mlm_probability: float = 0.15
    """Fraction of the real, non-special text tokens that MLM predicts; of those, 80% become [MASK],
    10% a random token and 10% stay as they are (BERT's recipe)."""
    momentum: float = 0.0
    """EMA coefficient of the momentum encoders (ALBEF/BLIP; 0: off, 0.995 typical). The
    momentum towers give VTC soft targets and fill the feature queues."""
    queue_size: int = 0
    """Momentum features kept as extra VTC negatives (0: none; needs model.momentum > 0)."""
    distill_alpha: float = 0.4
    """Weight of the momentum similarities in the VTC targets (the rest is one-hot)."""
    num_answers: int = 0
    """Size of the QA answer vocabulary (0: no QA head)."""
    qa_weight: float = 1.0
    """Weight of the QA loss (used when the batch carries answer labels)."""
    mask_token_id: int = 103
    """[MASK] id of the tokenizer, for MLM (103 in the uncased BERT / MiniLM vocabulary)."""
    pad_token_id: int = 0
    """[PAD] id of the tokenizer (0 in the uncased BERT / MiniLM vocabulary); never masked by
    MLM."""
    cls_token_id: int = 101
    """[CLS] id of the tokenizer (101 in the uncased BERT / MiniLM vocabulary); never masked by
    MLM."""
    sep_token_id: int = 102
    """[SEP] id of the tokenizer (102 in the uncased BERT / MiniLM vocabulary); never masked by
    MLM."""
    text_weights: str = ""
    """Optional HF BertModel checkpoint (folder, .safetensors or .bin) for the text tower, or a
    Hugging Face model name (``bert-base-uncased``, ``org/name``) from the Hugging Face cache."""
    video_weights: str = ""
    """Optional timm ViT / HF TimeSformer checkpoint for the video tower, or a Hugging Face
    model name / timm name (``vit_base_patch16_224.augreg_in21k``) from the Hugging Face cache."""
    weights: str = ""
    """Optional full-model weights to start from: a megavid checkpoint or exported fp32 state
    dict, or a BLIP/ALPRO pretraining checkpoint (recognised by its keys and converted); the
    eval commands evaluate it as it is in a run folder without weights of its own."""
