"""Analytic training FLOPs against torch.utils.flop_counter.FlopCounterMode (within 5%)."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from megavid.models import build_model
from megavid.models.flops import videolm_train_flops


def _count(model, video, ids, mask) -> int:
    with FlopCounterMode(display=False) as fc:
        model(video, ids, mask)["loss"].backward()
    return fc.get_total_flops()


@pytest.mark.slow  # FlopCounterMode dispatches every op through Python
@pytest.mark.parametrize(
    "attention_type,objectives",
    [
        ("divided_space_time", {"vtm_weight": 1.0, "mlm_weight": 1.0}),
        ("joint_space_time", {"vtm_weight": 1.0}),
        ("space_only", {"mlm_weight": 1.0}),
    ],
)
def test_analytic_flops_within_5_percent(make_cfg, make_batch, attention_type: str, objectives: dict) -> None:
    # The math path runs attention as explicit matmuls, which the counter sees (the CPU SDPA
    # kernel is not in its registry); the model FLOPs are the same for both paths.
    cfg = make_cfg(attn_impl="math", **objectives, **{"video.attention_type": attention_type})
    model = build_model(cfg)
    B, L = 3, 16
    video, ids, mask = make_batch(cfg, B=B, L=L)
    mask[:] = 1  # the analytic count is per padded length; padding costs the same FLOPs anyway
    # The number of MLM-masked tokens is random: record how many reach the MLM head.
    seen: list[int] = []
    model.mlm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    measured = _count(model, video, ids, mask)
    if cfg.mlm_weight > 0:
        assert seen and seen[0] > 0  # the draw masked something: the head's FLOPs are checked
    mlm_tokens = seen[0] / B if cfg.mlm_weight > 0 else None
    analytic = B * videolm_train_flops(model, L, mlm_tokens=mlm_tokens)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_flops_per_sample_default_uses_expected_mask_count(make_cfg) -> None:
    cfg = make_cfg(mlm_weight=1.0)
    model = build_model(cfg)
    expected = videolm_train_flops(model, 32, mlm_tokens=cfg.mlm_probability * 30)
    assert model.flops_per_sample(32) == pytest.approx(expected)
    assert model.flops_per_sample(64) > model.flops_per_sample(32) > 0
