"""Checkpoint folder bookkeeping (no DeepSpeed needed): latest pointer, keep-last-K, path
resolution, exported-weights loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from megavid.engine.checkpoint import (EXPORT_NAME, get_latest_tag, get_rng_state, get_step_tags, load_exported,
                                       prune_checkpoints, resolve_checkpoint, set_rng_state)
from megavid.errors import CheckpointError


def _fake_ckpt(ckpt_dir, step):
    d = ckpt_dir / f"step_{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"")
    return d


def test_latest_prune_and_resolve(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    for s in (5, 10, 20, 100):
        _fake_ckpt(ckpt, s)
    (ckpt / "step_5_universal").mkdir()
    assert [s for s, _ in get_step_tags(ckpt)] == [5, 10, 20, 100]  # numeric, not string order
    assert get_latest_tag(ckpt) == "step_100"  # no `latest` file: newest step
    (ckpt / "latest").write_text("step_20")
    assert get_latest_tag(ckpt) == "step_20"
    assert resolve_checkpoint(tmp_path / "run") == (ckpt, "step_20")
    assert resolve_checkpoint(ckpt / "step_10") == (ckpt, "step_10")
    removed = prune_checkpoints(ckpt, keep_last=2, keep=("step_5",))
    assert removed == ["step_10"]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_100", "step_20", "step_5",
                                                                     "step_5_universal"]
    prune_checkpoints(ckpt, keep_last=1)
    assert [t for _, t in get_step_tags(ckpt)] == ["step_100"]
    assert not (ckpt / "step_5_universal").exists()


def test_missing_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="export-checkpoint"):
        load_exported(tmp_path)


def test_load_exported_formats(tmp_path):
    sd = {"w": torch.randn(2, 3)}
    torch.save({"format": "megavid-fp32", "source": "x", "state_dict": sd}, tmp_path / EXPORT_NAME)
    torch.testing.assert_close(load_exported(tmp_path)["w"], sd["w"])
    torch.save(sd, tmp_path / "plain.pt")
    torch.testing.assert_close(load_exported(tmp_path / "plain.pt")["w"], sd["w"])
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_exported(tmp_path / "bad.pt")


def test_rng_round_trip():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_checkpoint_in_another_parameter_order_is_refused():
    from megavid.engine.checkpoint import check_param_order

    current = {"new_no_decay": ["pos", "bias", "temp"]}
    model_order = {"new_no_decay": ["temp", "pos", "bias"]}
    check_param_order(current, current, model_order, "ckpt/step_3")  # written by this megavid
    check_param_order(None, model_order, model_order, "ckpt/step_3")  # old, nothing moved
    with pytest.raises(CheckpointError, match="convert_to_universal"):
        check_param_order(None, current, model_order, "ckpt/step_3")  # old, groups reordered
    with pytest.raises(CheckpointError, match="ckpt/step_3 holds its optimizer state in another"):
        check_param_order({"new_no_decay": ["bias", "pos", "temp"]}, current, model_order, "ckpt/step_3")
