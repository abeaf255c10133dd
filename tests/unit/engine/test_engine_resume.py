"""Resume that tells the truth (megavid.engine.resume): every config key classified, refused
changes name each key in one line, allowed changes take effect for real (checked against
independent references: the schedule by hand and through ``build_scheduler``, the losses by
plain torch AdamW training), and the run folder keeps config.yaml = the running config plus a
config_history.yaml."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from megavid.config import Config, compose, to_dict, to_yaml
from megavid.engine import resume
from megavid.engine.logging import read_metrics
from megavid.engine.optim import build_optimizer, build_param_groups, build_scheduler, get_lr_scale
from megavid.errors import CheckpointError
from tests.helpers.drive import drive
from tests.helpers.megavid_toy import ToyLoader, ToyModel
from tests.helpers.multiprocess import python_module, run_job

TINY = ["model=timesformer_tiny"]


# --------------------------------------------------------------------------------------------
# Classification and comparison (no engine)
# --------------------------------------------------------------------------------------------
def test_every_config_key_is_classified_exactly_once():
    """Adding a config key without deciding whether a resume may change it fails here."""
    import dataclasses
    import typing

    def leaves(cls, prefix=""):  # written out here, independent of resume.leaf_keys
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    keys = list(leaves(Config))
    assert len(keys) > 100 and "model.video.depth" in keys and "optim.lr" in keys
    tables = {"FIXED": resume.FIXED, "CONDITIONAL": resume.CONDITIONAL, "MAY_CHANGE": resume.MAY_CHANGE}
    for key in keys:
        where = [name for name, table in tables.items() if key in table]
        assert len(where) == 1, f"config key {key} is in {where or 'no table'}: classify it in megavid/engine/resume.py"
    stale = [k for t in tables.values() for k in t if k not in keys]
    assert not stale, f"resume.py classifies keys the config no longer has: {stale}"
    assert sorted(resume.leaf_keys()) == sorted(keys)
    # the brief's fixed core, by name
    for key in ("run.seed", "model.video.depth", "model.text.hidden_size", "train.precision", "data.tokenizer",
                "data.max_text_len", "task.name", "model.num_answers"):
        assert resume.classify(key) == "fixed", key
    for key in ("optim.lr", "optim.schedule", "optim.weight_decay", "train.max_steps", "train.ckpt_every",
                "data.num_workers", "model.grad_checkpointing", "model.attn_impl", "model.kernel_impl",
                "model.grad_checkpointing_mode", "model.compile"):
        assert resume.classify(key) == "may_change", key
    assert resume.classify("model.some_future_key") == "fixed"  # unclassified: refused (safe)


def _cmp(old: list[str], new: list[str], **kw):
    kw.setdefault("world_size", 1)
    kw.setdefault("universal", False)
    return resume.compare(to_dict(compose(TINY + old)), compose(TINY + new), **kw)


def test_compare_refuses_fixed_and_allows_the_rest():
    ok, refused, _ = _cmp([], ["optim.lr=1e-2", "train.max_steps=50", "data.num_workers=3"])
    assert ok == {"optim.lr": (1e-4, 1e-2), "train.max_steps": (1000, 50), "data.num_workers": (1, 3)}
    assert refused == []
    ok, refused, _ = _cmp([], ["run.seed=5", "model.video.depth=2", "optim.lr=1e-2"])
    assert ok == {"optim.lr": (1e-4, 1e-2)}
    assert [r.split(" (")[0] for r in refused] == ["run.seed 0 -> 5", "model.video.depth 4 -> 2"]
    # the global batch decides data.batch_size / train.grad_accum
    ok, refused, _ = _cmp(["data.batch_size=16"], ["data.batch_size=8", "train.grad_accum=2"])
    assert set(ok) == {"data.batch_size", "train.grad_accum"} and refused == []
    ok, refused, _ = _cmp([], ["train.grad_accum=2"])
    assert len(refused) == 1 and "global batch 32 -> 64" in refused[0]
    ok, refused, _ = _cmp(["data.batch_size=16"], ["data.batch_size=8"], world_size=2, saved_world_size=1)
    assert refused == [] and "data.batch_size" in ok  # 16 x 1 rank == 8 x 2 ranks
    # ZeRO stage: only through a universal checkpoint
    assert _cmp([], ["train.zero_stage=1"])[1] and not _cmp([], ["train.zero_stage=1"], universal=True)[1]
    # on/off rules
    assert _cmp(["optim.backbone_lr=1e-5"], ["optim.backbone_lr=2e-5"])[1] == []
    assert "backbone" in _cmp([], ["optim.backbone_lr=1e-5"])[1][0]
    assert _cmp(["model.vtm_weight=1"], ["model.vtm_weight=0.5"])[1] == []
    assert "model.vtm_weight 0.0 -> 1.0" in _cmp([], ["model.vtm_weight=1"])[1][0]


def _fake_checkpoint(tmp_path: Path, client_state: dict, config_yaml: str | None) -> tuple[Path, str]:
    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / "step_7"
    tag_dir.mkdir(parents=True)
    torch.save({"rng": {}, "client_state": client_state}, tag_dir / "rng_rank0.pt")
    if config_yaml is not None:
        (run / "config.yaml").write_text(config_yaml)
    return run / "checkpoints", "step_7"


def test_saved_config_comes_from_the_checkpoint_else_config_yaml_else_skipped(tmp_path, caplog):
    trained = compose(TINY + ["optim.lr=1e-3", "run.seed=1"])
    now = compose(TINY + ["optim.lr=1e-2", "run.seed=1"])
    # 1. stored in the checkpoint: it wins over a config.yaml that says otherwise
    d, tag = _fake_checkpoint(tmp_path / "a", {"world_size": 1, "config": to_dict(trained)},
                              to_yaml(compose(TINY + ["run.seed=9"])))
    plan = resume.check_resume_config(now, d, tag, world_size=1, universal=False)
    assert plan.source == "checkpoint" and plan.changes == {"optim.lr": (1e-3, 1e-2)}
    # 2. an older checkpoint without it: the run's config.yaml (read with yaml.safe_load)
    d, tag = _fake_checkpoint(tmp_path / "b", {"world_size": 1}, to_yaml(compose(TINY + ["run.seed=9"])))
    with pytest.raises(CheckpointError) as e:
        resume.check_resume_config(now, d, tag, world_size=1, universal=False)
    msg = str(e.value)
    assert "\n" not in msg and "run.seed 9 -> 1" in msg and "--overwrite" in msg and "run.name" in msg
    # 2b. no RNG file: DeepSpeed's model-states file holds the client state too
    folder = tmp_path / "s" / "checkpoints" / "step_3"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "megavid": {"world_size": 1, "config": to_dict(trained)}},
               folder / "mp_rank_00_model_states.pt")
    plan = resume.check_resume_config(now, folder.parent, "step_3", world_size=1, universal=False)
    assert plan.source == "checkpoint" and plan.changes == {"optim.lr": (1e-3, 1e-2)}
    # 3. neither: no comparison, said in the log
    d, tag = _fake_checkpoint(tmp_path / "c", {"world_size": 1}, None)
    plan = resume.check_resume_config(now, d, tag, world_size=1, universal=False)
    assert plan.saved is None and plan.changes == {}
    with caplog.at_level(logging.INFO, logger="megavid"):
        plan.log_changes(7)
    assert "not comparing the config" in caplog.text and "config.yaml does not exist" in caplog.text


def test_group_hparams_match_the_optimizer_megavid_builds():
    """resume.group_hparams re-derives each group's settings from its name; they must equal
    what build_optimizer gives a fresh run (all four groups: backbone/new x decay/no decay)."""
    cfg = compose(TINY + ["optim.lr=3e-3", "optim.backbone_lr=2e-4", "optim.weight_decay=0.2",
                          "optim.betas=[0.8,0.9]", "optim.eps=1e-6", "optim.reference_batch_size=4"])
    model = ToyModel()
    opt = build_optimizer(model, cfg.optim, 8)
    names = [g["name"] for g in opt.param_groups]
    assert sorted(names) == ["backbone_decay", "backbone_no_decay", "new_decay", "new_no_decay"]
    for g in opt.param_groups:
        h = resume.group_hparams(g["name"], cfg, 8)
        assert h["lr"] == g["lr"] and h["weight_decay"] == g["weight_decay"], g["name"]
        assert h["betas"] == tuple(g["betas"]) and h["eps"] == g["eps"]
    assert [g["lr"] for g in build_param_groups(model, cfg.optim, get_lr_scale(cfg.optim, 8))] == \
           [g["lr"] for g in opt.param_groups]


def test_apply_optim_gives_a_fresh_schedule_fast_forwarded():
    """As on resume: the engine is built from the new config, DeepSpeed loads the old
    optimizer/scheduler state over it, apply_optim makes the new settings win."""
    old = compose(TINY + ["optim.lr=1e-3", "optim.schedule=cosine", "optim.warmup_steps=2",
                          "optim.backbone_lr=1e-4"])
    new = compose(TINY + ["optim.lr=1e-2", "optim.schedule=linear", "optim.warmup_steps=3",
                          "optim.backbone_lr=5e-4", "optim.min_lr_ratio=0.1", "optim.weight_decay=0.3"])
    k = 5
    o1 = build_optimizer(ToyModel(), old.optim, 8)
    s1 = build_scheduler(o1, old.optim, 10)
    for _ in range(k):
        o1.step()
        s1.step()
    o2 = build_optimizer(ToyModel(), new.optim, 8)
    s2 = build_scheduler(o2, new.optim, 20)
    o2.load_state_dict(o1.state_dict())
    s2.load_state_dict(s1.state_dict())
    assert s2.get_last_lr() == s1.get_last_lr()  # the bug: the old schedule came back
    resume.apply_optim(s2, new, total_steps=20, steps_per_epoch=0, global_batch=8)
    # reference: a fresh run with the new settings, stepped k times
    o3 = build_optimizer(ToyModel(), new.optim, 8)
    s3 = build_scheduler(o3, new.optim, 20)
    for _ in range(k):
        o3.step()
        s3.step()
    assert s2.get_last_lr() == s3.get_last_lr()
    for g2, g3 in zip(o2.param_groups, o3.param_groups):
        assert (g2["name"], g2["lr"], g2["weight_decay"], tuple(g2["betas"]), g2["eps"]) == \
               (g3["name"], g3["lr"], g3["weight_decay"], tuple(g3["betas"]), g3["eps"])
    # by hand: linear after 3 warmup steps over 17, floor 0.1; new_decay group at lr 1e-2
    assert s2.get_last_lr()[0] == pytest.approx(1e-2 * (0.1 + 0.9 * (1 - (k - 3) / 17)), rel=1e-12)
    # and it keeps stepping like the fresh one
    for _ in range(4):
        o2.step(), s2.step(), o3.step(), s3.step()
    assert s2.get_last_lr() == s3.get_last_lr()


# --------------------------------------------------------------------------------------------
# Real DeepSpeed engines (fresh processes)
# --------------------------------------------------------------------------------------------
SAMPLES = 64  # 8 steps per epoch at batch 8: the changed run crosses an epoch boundary
OLD = dict(lr=1e-3, warmup=2, total=8, wd=0.05, betas=(0.9, 0.98))
NEW = dict(lr=1e-2, warmup=2, total=12, wd=0.1, betas=(0.8, 0.95), min_ratio=0.1)


def _old_mult(i: int) -> float:  # cosine, by hand
    return (i + 1) / OLD["warmup"] if i < OLD["warmup"] else \
        0.5 * (1 + math.cos(math.pi * (i - OLD["warmup"]) / (OLD["total"] - OLD["warmup"])))


def _new_mult(i: int) -> float:  # linear to min_ratio, by hand
    if i < NEW["warmup"]:
        return (i + 1) / NEW["warmup"]
    return NEW["min_ratio"] + (1 - NEW["min_ratio"]) * (1 - (i - NEW["warmup"]) / (NEW["total"] - NEW["warmup"]))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader, out, epoch = ToyLoader(SAMPLES, 8, seed=0), [], 0
    while len(out) < count:
        loader.set_epoch(epoch)
        out += [(b["x"], b["y"]) for b in loader]
        epoch += 1
    return out[:count]


def _reference_losses(count: int, switch_at: int | None) -> list[float]:
    """Plain torch AdamW on the same batches; from step index ``switch_at`` on, NEW's lr /
    schedule / weight decay / betas (groups written out as in megavid_toy.reference_losses)."""
    torch.manual_seed(0)
    model = ToyModel()
    decay = [model.stem.weight, model.head.weight]
    no_decay = [model.stem.bias, model.norm.weight, model.norm.bias, model.offset, model.head.bias,
                model.cls.weight]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=1.0, eps=1e-8, foreach=False)
    losses = []
    for i, (x, y) in enumerate(_batches(count)):
        hp, mult = (NEW, _new_mult(i)) if switch_at is not None and i >= switch_at else (OLD, _old_mult(i))
        for g, wd in zip(opt.param_groups, (hp["wd"], 0.0)):
            g.update(lr=hp["lr"] * mult, weight_decay=wd, betas=hp["betas"])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_resume_changes_take_effect_or_are_refused(tmp_path):
    base = [f"run.output_dir={tmp_path}", "data.batch_size=8", "train.zero_stage=2", "train.precision=fp32",
            "train.log_every=1", "train.tensorboard=false", "train.ckpt_every=4", "train.keep_last=0",
            f"optim.lr={OLD['lr']}", f"optim.warmup_steps={OLD['warmup']}", "optim.schedule=cosine",
            f"optim.weight_decay={OLD['wd']}", "optim.betas=[0.9,0.98]", f"train.max_steps={OLD['total']}"]
    task = {"num_samples": SAMPLES}
    step4 = str(tmp_path / "u" / "checkpoints" / "step_4")
    new = [f"optim.lr={NEW['lr']}", f"train.max_steps={NEW['total']}", "optim.schedule=linear",
           f"optim.min_lr_ratio={NEW['min_ratio']}", f"optim.weight_decay={NEW['wd']}", "optim.betas=[0.8,0.95]"]
    results = drive([
        {"overrides": base + ["run.name=u"], "overwrite": True, "task": task},  # uninterrupted
        {"overrides": base + ["run.name=v"], "resume": step4, "task": task},  # unchanged resume
        {"overrides": base + ["run.name=w"] + new, "resume": step4, "task": task},  # optim changes
        # same global batch as micro 4 x accumulation 2: may change
        {"overrides": base + ["run.name=ga", "data.batch_size=4", "train.grad_accum=2"], "resume": step4,
         "task": task},
        {"overrides": base + ["run.name=seed", "run.seed=5"], "resume": step4, "task": task, "expect_error": True},
        {"overrides": base + ["run.name=z1", "train.zero_stage=1", "train.precision=bf16"], "resume": step4,
         "task": task, "expect_error": True},
    ])
    u, v, w, ga, seed, z1 = results
    assert (u["summary"]["step"], v["summary"]["step"], w["summary"]["step"]) == (8, 8, 12)
    mu, mv, mw, mga = (read_metrics(tmp_path / n) for n in ("u", "v", "w", "ga"))

    # the uninterrupted run follows the independent reference (so the reference is right)
    ref_old = _reference_losses(8, None)
    assert [mu[s]["loss"] for s in range(1, 9)] == pytest.approx(ref_old, rel=2e-5, abs=2e-6)
    # (4) an unchanged resume repeats the uninterrupted run exactly (fp32: bitwise)
    assert sorted(mv) == [5, 6, 7, 8]
    assert [mv[s]["loss"] for s in mv] == [mu[s]["loss"] for s in mv]
    assert [mv[s]["lr"] for s in mv] == [mu[s]["lr"] for s in mv]

    # (1) changed optim.*: the logged lr at step s (the one step s+1 uses) is the new schedule's
    assert sorted(mw) == list(range(5, 13))
    by_hand = [NEW["lr"] * _new_mult(s) for s in range(5, 13)]
    assert [mw[s]["lr"] for s in range(5, 13)] == pytest.approx(by_hand, rel=1e-12)
    cfg_w = compose(TINY + base + ["run.name=w"] + new)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=NEW["lr"])
    fresh = build_scheduler(dummy, cfg_w.optim, NEW["total"])
    fresh_lrs = {}
    for s in range(1, 13):
        dummy.step()
        fresh.step()
        fresh_lrs[s] = fresh.get_last_lr()[0]
    assert [mw[s]["lr"] for s in range(5, 13)] == [fresh_lrs[s] for s in range(5, 13)]
    # ... and the new lr, weight decay and betas are what the optimizer used: losses == plain
    # torch training that switches to them after step 4
    ref_new = _reference_losses(12, switch_at=4)
    assert [mw[s]["loss"] for s in range(5, 13)] == pytest.approx(ref_new[4:], rel=2e-5, abs=2e-6)
    assert mw[5]["loss"] == mu[5]["loss"]  # step 5's forward ran on the restored weights
    assert all(abs(mw[s]["loss"] - mu[s]["loss"]) > 1e-4 for s in (6, 7, 8))  # not the old run
    # config.yaml is the running config; the history keeps the original and the change
    saved = yaml.safe_load((tmp_path / "w" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == NEW["lr"] and saved["train"]["max_steps"] == 12
    hist = yaml.safe_load((tmp_path / "w" / "config_history.yaml").read_text())
    assert [(h["event"], h["step"]) for h in hist] == [("start", 0), ("resume", 4)]
    assert hist[0]["config"]["optim"]["lr"] == OLD["lr"] and hist[0]["config"]["optim"]["schedule"] == "cosine"
    changed = hist[1]["changed"]
    assert changed["optim.lr"] == {"old": OLD["lr"], "new": NEW["lr"]}
    assert changed["train.max_steps"] == {"old": 8, "new": 12}
    assert changed["optim.betas"] == {"old": [0.9, 0.98], "new": [0.8, 0.95]}
    assert set(changed) == {"run.name", "optim.lr", "train.max_steps", "optim.schedule", "optim.min_lr_ratio",
                            "optim.weight_decay", "optim.betas"}
    assert hist[1]["checkpoint"] == step4
    log_text = (tmp_path / "w" / "logs" / "rank0.log").read_text()
    assert "resume: optim.lr 0.001 -> 0.01 takes effect from step 5" in log_text
    assert "resume: train.max_steps 8 -> 12 takes effect from step 5" in log_text
    # the unchanged resume records a resume with only the new run name
    hist_v = yaml.safe_load((tmp_path / "v" / "config_history.yaml").read_text())
    assert hist_v[1]["changed"] == {"run.name": {"old": "u", "new": "v"}}
    # a new run starts its history with its own config
    hist_u = yaml.safe_load((tmp_path / "u" / "config_history.yaml").read_text())
    assert len(hist_u) == 1 and hist_u[0]["event"] == "start" and hist_u[0]["config"]["run"]["name"] == "u"

    # micro 4 x accumulation 2 == micro 8: the same training (fp32 summation order aside)
    assert [mga[s]["loss"] for s in range(5, 9)] == pytest.approx([mu[s]["loss"] for s in range(5, 9)],
                                                                    rel=1e-5, abs=1e-6)

    # (3) run.seed: refused in one line naming it, nothing trained
    err = seed["error"]
    assert err.startswith("CheckpointError") and "\n" not in err
    assert "run.seed 0 -> 5" in err and "--overwrite" in err
    assert not (tmp_path / "seed" / "metrics.jsonl").exists()
    # ZeRO stage (not universal) and precision: both named in the same line
    err = z1["error"]
    assert "\n" not in err and "train.zero_stage 2 -> 1" in err and "train.precision 'fp32' -> 'bf16'" in err


@pytest.mark.slow
def test_cli_refuses_a_changed_model_in_one_line(tmp_path):
    """(2) A real model whose depth changed: DeepSpeed never sees it (no state-dict dump), the CLI
    exits 2 with one stderr line naming the key."""
    over = ["model=timesformer_tiny", "data.name=synthetic", "task.name=pretrain", "run.name=m",
            f"run.output_dir={tmp_path}", "model.video.img_size=32", "model.video.num_frames=2",
            "model.video.depth=1", "model.video.embed_dim=32", "model.text.hidden_size=32",
            "model.text.num_layers=2", "model.text.fusion_layers=1", "model.text.intermediate_size=64",
            "model.proj_dim=16", "data.img_size=32", "data.num_frames=2", "data.batch_size=2",
            "data.max_text_len=16", "train.precision=fp32", "train.max_steps=1", "train.tensorboard=false"]
    first = run_job(python_module("megavid.cli", "pretrain", *over, "--overwrite"), timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert (tmp_path / "m" / "checkpoints" / "step_1").is_dir()
    second = run_job(python_module("megavid.cli", "pretrain", *over, "model.video.depth=2", "train.max_steps=2"),
                     timeout=300)
    assert second.returncode == 2, (second.stdout + second.stderr)[-4000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("megavid pretrain: error: cannot resume from")
    assert "model.video.depth 1 -> 2" in lines[0] and "--overwrite" in lines[0]
    assert "train.max_steps" not in lines[0]  # an allowed change is not in the refusal
    # nothing of the refused run reached the run folder: config.yaml is still the trained one
    assert yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["model"]["video"]["depth"] == 1
