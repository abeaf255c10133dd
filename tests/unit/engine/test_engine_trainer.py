"""Single-process Trainer (the demo's path): DeepSpeed ZeRO-2 bf16 on CPU, run-dir artefacts read
back with independent readers (tensorboard's EventAccumulator, yaml), resume, debug mode,
SIGTERM -> checkpoint and clean exit. Each case runs in a fresh process (a process group is
process-wide state)."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from megavid.engine.checkpoint import load_exported
from tests.helpers.drive import driver_argv, drive
from tests.helpers.megavid_toy import ToyModel
from tests.helpers.multiprocess import start_job

pytestmark = pytest.mark.slow







def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero2_bf16_single_process_run_dir_resume_and_debug(tmp_path):
    base = [f"run.output_dir={tmp_path}", "data.batch_size=8", "train.zero_stage=2", "train.precision=bf16",
            "train.log_every=2", "optim.lr=1e-2", "optim.warmup_steps=2", "train.ckpt_every=3", "train.keep_last=2"]
    # results of an older run in the folder the "ep" run below overwrites
    (tmp_path / "ep" / "eval").mkdir(parents=True)
    (tmp_path / "ep" / "eval" / "zeroshot_test_step8.json").write_text("{}")
    results = drive([
        {"overrides": base + ["run.name=a", "train.max_steps=8", "train.grad_accum=2"], "overwrite": True},
        # same run dir, more steps: resumes from step 8 (latest) and continues to 10
        {"overrides": base + ["run.name=a", "train.max_steps=10", "train.grad_accum=2"], "probe": True},
        # `megavid export-checkpoint` on the run (ZeRO-2 bf16 shards -> fp32), then again without --overwrite
        {"cli": ["export-checkpoint", "model=timesformer_tiny", f"run.output_dir={tmp_path}", "run.name=a"]},
        {"cli": ["export-checkpoint", "model=timesformer_tiny", f"run.output_dir={tmp_path}", "run.name=a"]},
        # a different global batch cannot resume silently
        {"overrides": base + ["run.name=a", "train.max_steps=12", "train.grad_accum=1"], "expect_error": True},
        {"overrides": base + ["run.name=dbg", "run.debug=true", "train.max_steps=50"], "overwrite": True},
        # eval every 2 steps; the scripted score peaks at step 4, which survives keep_last=1
        {"overrides": [f"run.output_dir={tmp_path}", "run.name=best", "data.batch_size=8", "train.max_steps=8",
                       "train.eval_every=2", "train.keep_last=1", "train.ckpt_every=2", "train.best_metric=score",
                       "train.tensorboard=false"],
         "overwrite": True, "task": {"eval_scores": [0.1, 0.5, 0.3, 0.2]}},
        # schedule in epochs: max_steps=0, 2 epochs of 64 samples / (batch 8 x accum 2) = 4 steps
        # each, warmup half an epoch = 2 steps
        {"overrides": [f"run.output_dir={tmp_path}", "run.name=ep", "data.batch_size=8", "train.max_steps=0",
                       "train.epochs=2", "train.grad_accum=2", "optim.warmup_epochs=0.5", "optim.lr=1e-2",
                       "optim.schedule=cosine", "train.log_every=1", "train.tensorboard=false",
                       "train.precision=fp32"],
         "overwrite": True, "task": {"num_samples": 64, "keys_dir": str(tmp_path / "keys_ep")}},
        # W&B asked for but not installed: a clear error; in debug mode it is forced off
        {"overrides": base + ["run.name=wb", "train.wandb=true", "train.max_steps=2"], "overwrite": True,
         "expect_error": True, "block_modules": ["wandb"]},
        {"overrides": base + ["run.name=dbgwb", "run.debug=true", "train.wandb=true", "train.max_steps=5"],
         "overwrite": True, "block_modules": ["wandb"]},
    ])
    first, resumed, export_rc, export_again_rc, mismatch, debug, best, epochs, wandb_missing, debug_wandb = results
    assert first["summary"]["step"] == 8 and first["summary"]["nonfinite_skipped"] == 0
    run = tmp_path / "a"
    # checkpoints: every 3 steps + the end, last 2 kept, `latest` names the newest
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_10", "step_9"]  # 3, 6, 8 (end), 9, 10 (end) saved; 2 kept
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    assert resumed["summary"]["step"] == 10
    m = [r for r in _metrics(run) if r["split"] == "train"]
    assert [r["step"] for r in m] == [2, 4, 6, 8, 10]  # the resumed run continued, not restarted
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 and r["grad_norm"] > 0 for r in m)
    # tokens/s from the task's tokens_per_sample (16 per toy sample), over the same interval
    assert all(r["tokens_per_s"] == pytest.approx(16 * r["samples_per_s"]) for r in m)
    assert m[-1]["loss"] < m[0]["loss"]
    assert "mfu" not in m[0]  # no MFU on CPU
    assert m[0]["lr"] == pytest.approx(1e-2)  # warmup 2 steps: step 2 used the full lr
    # resolved config and environment, read back independently
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 10 and saved["train"]["precision"] == "bf16"
    env = json.loads((run / "env.json").read_text())
    assert env["world"]["world_size"] == 1 and env["versions"]["deepspeed"]
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"]
    assert (run / "logs" / "rank0.log").is_file()
    # tensorboard scalars, read with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_pct",
            "train/peak_memory_gib", "train/tokens_per_s"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    # exported fp32 weights in a fresh model reproduce the engine (which ran in bf16)
    assert export_rc["rc"] == 0 and export_again_rc["rc"] == 2  # exists: needs --overwrite
    sd = load_exported(run)
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = ToyModel()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = model(torch.randn(4, 16, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(out, torch.tensor(resumed["probe_out"]), rtol=0.05, atol=0.05)
    assert "global batch 16" in mismatch["error"] and "train.grad_accum" in mismatch["error"]
    assert debug["summary"]["step"] == 3  # debug: a tiny run ...
    assert not (tmp_path / "dbg").exists()  # ... that leaves nothing behind
    assert best["summary"]["eval"]["score"] == 0.2 and 0.0 <= best["summary"]["eval"]["acc"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "best" / "checkpoints").glob("step_*")) == ["step_4", "step_8"]
    assert (tmp_path / "best" / "checkpoints" / "best").read_text().strip() == "step_4"
    evals = [r for r in _metrics(tmp_path / "best") if r["split"] == "eval"]
    assert [(r["step"], r["score"]) for r in evals] == [(2, 0.1), (4, 0.5), (6, 0.3), (8, 0.2)]
    # epochs: 8 steps, LR = the hand-written warmup (2 steps) + cosine over the remaining 6;
    # the LR logged at step k is the one step k+1 uses, i.e. the multiplier at index k
    es = epochs["summary"]
    assert (es["total_steps"], es["steps_per_epoch"], es["step"]) == (8, 4, 8)
    em = {r["step"]: r for r in _metrics(tmp_path / "ep") if r["split"] == "train"}
    assert sorted(em) == list(range(1, 9))
    want = [1e-2 * ((k + 1) / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 6))) for k in range(1, 9)]
    assert [em[k]["lr"] for k in range(1, 9)] == pytest.approx(want, abs=1e-12)
    assert [em[k]["epoch"] for k in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]  # steps 5-8: epoch 1
    keys = [k for line in (tmp_path / "keys_ep" / "keys_rank0.jsonl").read_text().splitlines()
            for k in json.loads(line)]
    assert len(keys) == 128 and len(set(keys[:64])) == len(set(keys[64:])) == 64  # each epoch: every sample once
    # an --overwrite run keeps its own log (the old run's logs/ is cleared before it is opened)
    assert "run finished: step 8/8" in (tmp_path / "ep" / "logs" / "rank0.log").read_text()
    assert not (tmp_path / "ep" / "eval").exists()  # the old run's results went with its checkpoints
    assert "pip install wandb" in wandb_missing["error"] and wandb_missing["error"].startswith("ConfigError")
    assert debug_wandb["summary"]["step"] == 3 and not (tmp_path / "dbgwb").exists()


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    runs = [{"overrides": [f"run.output_dir={tmp_path}", "run.name=t", "data.batch_size=8", "train.precision=fp32",
                           "train.max_steps=100000", "train.log_every=1", "train.tensorboard=false"],
             "overwrite": True, "task": {"num_samples": 64}}]
    job = start_job(driver_argv(runs))
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert job.poll() is None, job.wait(timeout=60).stderr[-3000:]
    job.send_signal(signal.SIGTERM)
    proc = job.wait(timeout=120)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    summary = result["summary"]
    assert summary["interrupted"] == "SIGTERM" and result["exit_code"] == 128 + signal.SIGTERM
    step = summary["step"]
    assert 3 <= step < 100000
    assert (tmp_path / "t" / "checkpoints" / f"step_{step}").is_dir()
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    assert summary["epoch"] == (step - 1) // 8  # 64 samples / batch 8 = 8 steps per epoch
