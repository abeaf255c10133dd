"""The derived DeepSpeed config: batch math, precision mapping, user JSON merge and conflicts."""

import json

import pytest

from megavid.config import compose
from megavid.engine.deepspeed_setup import build_ds_config, merge_user_config, resolve_precision
from megavid.errors import ConfigError


def _cfg(*overrides):
    return compose(["model=timesformer_tiny", *overrides])


def test_batch_math_and_zero_sections():
    ds = build_ds_config(_cfg("data.batch_size=6", "train.grad_accum=3", "train.zero_stage=3",
                              "train.grad_clip=0.5"), world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds


def test_fp32_has_no_mixed_precision_section():
    ds = build_ds_config(_cfg("train.precision=fp32"), world_size=1)
    assert "bf16" not in ds and "fp16" not in ds


def test_fp16_is_gpu_only():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU.*bf16 or fp32"):
        build_ds_config(_cfg("train.precision=fp16"), world_size=1, device_type="cpu")
    ds = build_ds_config(_cfg("train.precision=fp16"), world_size=1, device_type="cuda")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("request_, want", [("--fp16", "fp16"), ("half", "fp16"), ("bfloat16", "bf16"),
                                            ("--bf16", "bf16"), ("float32", "fp32")])
def test_precision_aliases(request_, want):
    assert resolve_precision(request_, "cuda") == want


@pytest.mark.parametrize("request_", ["O1", "O2", "apex", "amp"])
def test_apex_amp_is_rejected_with_the_replacement(request_):
    with pytest.raises(ConfigError, match="apex.*train.precision=bf16"):
        resolve_precision(request_, "cuda")


def test_offload_needs_the_right_stage():
    with pytest.raises(ConfigError, match="offload_params=true needs train.zero_stage=3"):
        build_ds_config(_cfg("train.offload_params=true", "train.zero_stage=2"), 1)
    ds = build_ds_config(_cfg("train.offload_optimizer=true", "train.offload_params=true", "train.zero_stage=3"), 1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_user_json_merges_extra_keys(tmp_path):
    user = {"zero_optimization": {"reduce_bucket_size": 12345, "stage": 2}, "comms_logger": {"enabled": True},
            "train_micro_batch_size_per_gpu": 4}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = build_ds_config(_cfg("data.batch_size=4", f"train.deepspeed_json={path}"), world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345
    assert ds["zero_optimization"]["stage"] == 2  # same as derived: not a conflict
    assert ds["comms_logger"] == {"enabled": True}
    assert ds["train_batch_size"] == 8


def test_user_json_conflicts_are_reported(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1024, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as e:
        build_ds_config(_cfg(f"train.deepspeed_json={path}", "train.zero_stage=2"), world_size=2)
    msg = str(e.value)
    assert "train_batch_size=1024" in msg and "zero_optimization.stage=3" in msg and "train.zero_stage" in msg


@pytest.mark.parametrize("user, match", [({"amp": {"enabled": True}}, "apex"),
                                         ({"optimizer": {"type": "Adam"}}, "optim")])
def test_user_json_sections_megavid_owns(user, match):
    with pytest.raises(ConfigError, match=match):
        merge_user_config({"train_batch_size": 8}, user)


def test_user_json_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(_cfg(f"train.deepspeed_json={tmp_path / 'nope.json'}"), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(_cfg(f"train.deepspeed_json={bad}"), 1)


def test_batch_plan_is_the_one_batch_math():
    from megavid.engine.deepspeed_setup import BatchPlan

    cfg = _cfg("data.batch_size=6", "train.grad_accum=3")
    plan = BatchPlan.from_config(cfg, world_size=4)
    assert (plan.micro, plan.accumulation, plan.world, plan.global_batch) == (6, 3, 4, 72)
    ds = build_ds_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        plan.micro, plan.accumulation, plan.global_batch)
    # 10 micro-batches per rank -> 3 steps of 3; capped by samples: 150 // 72 = 2, 10 // 72 -> at least 1
    assert plan.steps_per_epoch(10) == 3
    assert plan.steps_per_epoch(10, max_samples=150) == 2 and plan.steps_per_epoch(10, max_samples=10) == 1
    with pytest.raises(ConfigError, match="2 micro-batches per rank, fewer than train.grad_accum=3"):
        plan.steps_per_epoch(2)
    with pytest.raises(ConfigError, match="data.batch_size=0 must be >= 1"):
        BatchPlan.from_config(_cfg("data.batch_size=0"), world_size=1)
