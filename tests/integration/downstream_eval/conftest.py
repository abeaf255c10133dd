"""Session fixtures of the downstream evaluation command tests: a small synthetic dataset (the
shared ``make_synthetic`` of tests/integration/conftest.py) and a briefly pretrained tiny VideoLM
(its DeepSpeed checkpoint is what the evaluation commands load)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 32 px, 4 frames: 4 patches per frame keeps every command a few seconds on 2 loaded cores
BASE = ["model=timesformer_tiny", "data=synthetic", "model.video.img_size=32",
        "model.video.num_frames=4", "data.num_workers=0", "data.batch_size=16",
        "data.eval_batch_size=32", "train.precision=fp32", "train.zero_stage=0",
        "train.tensorboard=false", "train.log_every=5", "run.device=cpu"]
# 256 train / 64 val / 256 test clips, 8 frames of 32x32 VP9: the linear probe's evidence needs
# a few hundred clips (its train and held-out test); the other tests use parts
DOWNSTREAM_SYNTH = {"num_train": 256, "num_val": 64, "num_test": 256, "frames": 8, "size": 32, "fps": 8}


@pytest.fixture(scope="session")
def downstream_root(make_synthetic) -> Path:
    """The dataset of these tests (``DOWNSTREAM_SYNTH``, 40 clips per shard)."""
    return make_synthetic(40, **DOWNSTREAM_SYNTH)


@pytest.fixture(scope="session")
def base_args(downstream_root, tmp_path_factory) -> list[str]:
    runs = tmp_path_factory.mktemp("downstream_runs")
    return BASE + [f"data.root={downstream_root}", f"run.output_dir={runs}"]


@pytest.fixture(scope="session")
def pretrained(base_args) -> Path:
    """Run dir of a tiny VideoLM pretrained (VTC) for a few steps through `megavid pretrain`."""
    from megavid.cli import main
    from megavid.config import compose

    # 24 steps: at 12 the encoder's colour features beat a random encoder's by under 3 SE
    args = base_args + ["run.name=pre", "train.max_steps=24", "optim.lr=5e-4", "optim.warmup_steps=2"]
    assert main(["pretrain", *args, "--overwrite"]) == 0
    return compose(args).run_dir
