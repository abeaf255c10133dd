"""Optional Weights & Biases logging: off by default, a clear error when asked for without the
package, offline unless WANDB_MODE says otherwise, rank 0 only.

wandb is not a megavid dependency and is not installed here, so the "installed" case uses a
recording stand-in module exposing the three calls megavid makes (init, log, finish); the
absent case is real (and forced, in case wandb gets installed one day)."""

from __future__ import annotations

import sys
import types

import pytest

from megavid.config import compose
from megavid.engine.logging import MetricsLogger
from megavid.errors import ConfigError


class _Run:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, dict(data)))

    def finish(self) -> None:
        self.calls.append(("finish",))


def _recording_wandb(calls: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _Run(calls)

    mod.init = init
    return mod


def test_wandb_is_off_by_default():
    assert compose(["model=timesformer_tiny"]).train.wandb is False


def test_wandb_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    for rank in (0, 1):  # every rank fails the same way, not only the one that logs
        with pytest.raises(ConfigError, match="pip install wandb"):
            MetricsLogger(tmp_path, rank, 10, wandb=True, progress=False)
    # off: never imported
    MetricsLogger(tmp_path, 0, 10, wandb=False, tensorboard=False, progress=False).close()


@pytest.mark.parametrize("env_mode, want", [(None, "offline"), ("online", "online"), ("disabled", "disabled")])
def test_wandb_offline_unless_env_says_otherwise(tmp_path, monkeypatch, env_mode, want):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _recording_wandb(calls))
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    logger = MetricsLogger(tmp_path, 0, 10, wandb=True, tensorboard=False, progress=False,
                           run_name="exp1", config={"train": {"wandb": True}})
    logger.log(2, {"loss": 1.5, "lr": 1e-3, "note": "text", "flag": True})
    logger.log(2, {"acc": 0.5}, prefix="eval")
    logger.close()
    init = calls[0]
    assert init[0] == "init" and init[1]["mode"] == want and init[1]["name"] == "exp1"
    assert init[1]["dir"] == str(tmp_path) and init[1]["config"] == {"train": {"wandb": True}}
    assert calls[1:] == [("log", 2, {"train/loss": 1.5, "train/lr": 1e-3}), ("log", 2, {"eval/acc": 0.5}),
                         ("finish",)]


def test_wandb_only_on_rank0(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _recording_wandb(calls))
    logger = MetricsLogger(tmp_path, 1, 10, wandb=True, tensorboard=False, progress=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert calls == []
