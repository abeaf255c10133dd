"""AdamW parameter groups and the LR schedule, against hand-computed values."""

import math

import pytest
import torch

from megavid.config import OptimConfig
from megavid.errors import ConfigError
from megavid.engine.optim import (LRSchedule, build_optimizer, build_param_groups, build_scheduler,
                                  get_lr_scale, get_model_order, get_param_order, get_warmup_steps)
from tests.helpers.megavid_toy import ToyModel


def _names(groups, name):
    return set(next(g for g in groups if g["name"] == name)["param_names"])


def test_no_decay_for_norms_biases_embeddings_and_listed_names():
    groups = build_param_groups(ToyModel(), OptimConfig(lr=1e-3, weight_decay=0.05))
    assert [g["name"] for g in groups] == ["new_decay", "new_no_decay"]
    assert _names(groups, "new_decay") == {"stem.weight", "head.weight"}
    # biases, LayerNorm, the 2-D `offset` listed in no_weight_decay(), the nn.Embedding weight
    assert _names(groups, "new_no_decay") == {"stem.bias", "norm.weight", "norm.bias", "offset", "head.bias",
                                              "cls.weight"}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_backbone_lr_and_lr_scaling():
    cfg = OptimConfig(lr=12e-5, backbone_lr=3e-5, weight_decay=0.1, reference_batch_size=256)
    scale = get_lr_scale(cfg, 512)
    assert scale == 2.0
    groups = {g["name"]: g for g in build_param_groups(ToyModel(), cfg, scale)}
    assert set(groups["backbone_decay"]["param_names"]) == {"stem.weight"}
    assert set(groups["backbone_no_decay"]["param_names"]) == {"stem.bias"}
    assert groups["backbone_decay"]["lr"] == pytest.approx(6e-5)
    assert groups["new_decay"]["lr"] == pytest.approx(24e-5)
    assert get_lr_scale(OptimConfig(), 512) == 1.0


def test_groups_put_odd_sized_parameters_last():
    """Sizes that are multiples of 8 elements first, in model order, then the rest, largest
    first: in a ZeRO flat buffer every evenly sized parameter then stays 16-byte aligned."""
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(1, 1))   # a temperature (2-D: one group)
    model.b = torch.nn.Parameter(torch.zeros(4, 8))
    model.c = torch.nn.Parameter(torch.zeros(1, 3))   # a 3-way head's bias
    model.d = torch.nn.Parameter(torch.zeros(16, 2))
    model.e = torch.nn.Parameter(torch.zeros(5, 3))
    (group,) = build_param_groups(model, OptimConfig(weight_decay=0.0))
    assert group["param_names"] == ["b", "d", "e", "c", "a"]
    assert [id(p) for p in group["params"]] == [id(getattr(model, n)) for n in group["param_names"]]
    # what a checkpoint records, and the model order that checkpoints written before held
    order = get_param_order(model, OptimConfig(weight_decay=0.0))
    assert order == {"new_decay": ["b", "d", "e", "c", "a"]}
    assert get_model_order(model, order) == {"new_decay": ["a", "b", "c", "d", "e"]}


def test_frozen_parameters_are_left_out():
    model = ToyModel()
    model.stem.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(), 8)
    names = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.stem.weight) not in names and id(model.head.weight) in names


def test_cosine_schedule_values():
    f = LRSchedule(total_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    lin = LRSchedule(total_steps=20, warmup_steps=0, schedule="linear")
    assert [lin(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    const = LRSchedule(total_steps=20, warmup_steps=4, schedule="constant")
    assert [const(s) for s in (0, 1, 3, 10)] == pytest.approx([0.25, 0.5, 1.0, 1.0])


def test_warmup_ratio_and_scheduler_on_optimizer():
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.25, schedule="cosine")
    assert get_warmup_steps(cfg, 40) == 10
    assert get_warmup_steps(OptimConfig(warmup_steps=3, warmup_ratio=0.5), 40) == 3
    opt = build_optimizer(ToyModel(), cfg, 8)
    sched = build_scheduler(opt, cfg, 40)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[25] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    # the schedule survives a state_dict round trip (resume)
    sd = sched.state_dict()
    opt2 = build_optimizer(ToyModel(), cfg, 8)
    sched2 = build_scheduler(opt2, cfg, 40)
    sched2.load_state_dict(sd)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_adamw_groups_match_a_hand_built_optimizer():
    torch.manual_seed(0)
    a = ToyModel()
    b = ToyModel()
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.5, betas=(0.9, 0.99))
    opt_a = build_optimizer(a, cfg, 8)
    decay = [b.stem.weight, b.head.weight]
    no_decay = [p for n, p in b.named_parameters() if n not in ("stem.weight", "head.weight")]
    opt_b = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.99))
    x = torch.randn(4, 16)
    for m, o in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=n)


def test_warmup_epochs_from_the_epoch_length():
    cfg = OptimConfig(warmup_epochs=1.5)
    assert get_warmup_steps(cfg, 100, steps_per_epoch=6) == 9
    # warmup_steps wins over epochs, epochs over ratio
    assert get_warmup_steps(OptimConfig(warmup_steps=3, warmup_epochs=2.0), 100, steps_per_epoch=6) == 3
    assert get_warmup_steps(OptimConfig(warmup_epochs=0.5, warmup_ratio=0.5), 100, steps_per_epoch=6) == 3
    with pytest.raises(ConfigError, match="optim.warmup_epochs needs the epoch length"):
        get_warmup_steps(cfg, 100)
    with pytest.raises(ConfigError, match="must be >= 0"):
        get_warmup_steps(OptimConfig(warmup_epochs=-1.0), 100, steps_per_epoch=6)
    opt = build_optimizer(ToyModel(), OptimConfig(lr=1e-3, warmup_epochs=0.5, schedule="constant"), 8)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, warmup_epochs=0.5, schedule="constant"), 40, 8)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # 4 warmup steps
