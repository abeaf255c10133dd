"""Fixtures of the task integration tests: small moving-shapes datasets made once per session
(real VP9 files and real webdataset shards, made by megavid.shards.synthetic.generate_synthetic)
and the config tokens of a tiny CPU model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# 8 frames of 64x64 at 8 fps, the demo's picture size: every frame is sampled (segment k is
# frame k), "slow" moves 1 px and "fast" 3 px per frame, and the 15-26 px wide shapes span a
# few 16 px patches (32x32 clips with 8 px patches cost the same tokens, but their 4-6 px
# motions and shapes were beyond the tiny model in the QA test's budget). 2048 training clips:
# with 384 the QA model memorised the training shapes (shape below the majority baseline).
SYNTH = {"num_train": 2048, "num_val": 16, "num_test": 64, "frames": 8, "size": 64, "fps": 8,
         "codec": "vp9", "seed": 0}

# A tiny TimeSformer (divided space-time) + a 2+1-layer BERT with the real MiniLM vocabulary.
TINY_MODEL = [
    "model=timesformer_tiny", "model.video.img_size=64", "model.video.patch_size=16",
    "model.video.depth=2", "model.video.embed_dim=96", "model.video.num_heads=4",
    "model.text.num_layers=3", "model.text.fusion_layers=1", "model.text.hidden_size=96",
    "model.text.num_heads=4", "model.text.intermediate_size=384", "model.proj_dim=64",
]


@pytest.fixture(scope="session")
def tiny_model_tokens() -> list[str]:
    """The tiny model's config tokens alone, for tests that bring their own data."""
    return list(TINY_MODEL)


@pytest.fixture(scope="session")
def synthetic_spec() -> dict:
    """The SyntheticConfig values of the session's dataset (split sizes for the tests)."""
    return dict(SYNTH)


@pytest.fixture(scope="session")
def make_synthetic(tmp_path_factory) -> Callable[..., Path]:
    """``make_synthetic(shard_max_count, **values)``: the folder of a dataset (raw videos +
    shards for train/val/test) with those SyntheticConfig values and samples per shard, made
    the first time a test of the session asks for it."""
    from megavid.config import SyntheticConfig
    from megavid.shards.synthetic import generate_synthetic

    made: dict[tuple, Path] = {}

    def make(shard_max_count: int, **values) -> Path:
        key = (shard_max_count, tuple(sorted(values.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic")
            generate_synthetic(root, SyntheticConfig(**values), workers=2, shard_max_count=shard_max_count)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def synthetic_root(make_synthetic) -> Path:
    """The dataset folder of the task tests (``SYNTH``), made once per session."""
    return make_synthetic(128, **SYNTH)


@pytest.fixture
def base_tokens(synthetic_root, tmp_path) -> list[str]:
    """Config tokens every task test starts from: the tiny model, the session's data, a run dir
    under tmp_path, DeepSpeed ZeRO-2 in fp32 on the CPU."""
    return TINY_MODEL + [
        "data=synthetic", f"data.root={synthetic_root}", "data.num_workers=0",
        "data.batch_size=16", "data.eval_batch_size=32", "data.max_text_len=16",
        f"run.output_dir={tmp_path / 'runs'}", "run.device=cpu", "run.seed=0",
        "train.zero_stage=2", "train.precision=fp32", "train.tensorboard=false",
        "train.log_every=5", "optim.warmup_steps=5",
    ]
