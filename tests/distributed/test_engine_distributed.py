"""Engine acceptance on CPU with 2 processes (torchrun + gloo, fp32), against independent references:

- ZeRO 0/1/2/3 loss curves == plain single-process torch training of the same global batches;
  each rank's optimizer state == the ZeRO partitioning formula.
- Exported fp32 weights (from ZeRO-3 shards) in a fresh model == the engine's outputs.
- kill -9 mid-run, resume: per-step losses bitwise equal to the uninterrupted run (fp32), within
  BF16_RESUME_RTOL in bf16, sample keys neither repeated nor skipped.
- Universal checkpoint 2 -> 1 process (grad accumulation keeps the global batch): same losses
  within tolerance, same keys.
- A NaN loss on one rank is skipped on every rank (== reference training without that batch);
  N in a row aborts with a clear error.

Five launches shared by the tests (module fixture) keep the wall time down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers.engine_worker import gather_x
from tests.helpers.megavid_toy import ToyLoader, ToyModel, reference_losses
from tests.helpers.multiprocess import python_module, run_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MICRO = 8
FP32 = ["train.precision=fp32", "train.tensorboard=false", "train.log_every=1", f"data.batch_size={MICRO}",
        "train.grad_clip=1.0"]
# ZeRO equivalence: constant LR after warmup, so the hand-written reference schedule is simple.
ZERO_OPTS = ["train.max_steps=20", "optim.lr=5e-3", "optim.weight_decay=0.1", "optim.schedule=constant",
             "optim.warmup_steps=3"]
ZERO_SAMPLES = 256
# Resume runs: cosine schedule (scheduler state must be restored), epochs of 6 steps (96 samples
# / global batch 16) so the run crosses an epoch boundary after the checkpoint.
RESUME_OPTS = ["train.zero_stage=2", "train.max_steps=10", "train.ckpt_every=5", "train.keep_last=0",
               "optim.lr=5e-3", "optim.warmup_steps=2", "optim.schedule=cosine"]
RESUME_SAMPLES = 96
# bf16 kill/resume: same runs with DeepSpeed bf16 (bf16 weights/activations, fp32 master copy).
BF16 = [o for o in FP32 if o != "train.precision=fp32"] + ["train.precision=bf16"]
# Stated tolerance for bf16 resume: losses within 1e-3 relative. Nothing in the resume path
# rounds (the fp32 master weights and Adam state are checkpointed exactly, bf16 weights are
# re-derived from them), so on CPU the curves are in fact bitwise equal; the tolerance leaves
# room for non-deterministic reduction order of GPU kernels, one bf16 ulp (2^-8) / 4.
BF16_RESUME_RTOL = 1e-3
NAN_OPTS = ["train.zero_stage=2", "train.max_steps=6", "optim.lr=5e-3", "optim.weight_decay=0.1",
            "optim.schedule=constant", "optim.warmup_steps=0"]


def _launch(tmp: Path, name: str, nproc: int, runs: list[dict], convert: str | None = None,
            expect_fail: bool = False, gather_check: bool = False) -> list[list[dict]]:
    spec = {"out": str(tmp / name / "res"), "output_dir": str(tmp / "runs"), "runs": runs, "convert": convert,
            "gather_check": gather_check}
    (tmp / name).mkdir(parents=True, exist_ok=True)
    spec_path = tmp / name / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_job(python_module("tests.helpers.engine_worker", str(spec_path)), nproc=nproc, timeout=420)
    (tmp / name / "log.txt").write_text(proc.stdout + proc.stderr)
    if expect_fail:
        assert proc.returncode != 0, f"{name}: expected the launch to die"
        return []
    assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return [json.loads((tmp / name / f"res.rank{r}.json").read_text()) for r in range(nproc)]


def _losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out[rec["step"]] = rec["loss"]  # later records (after a resume) win
    return out


def _keys(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _global_batches(n: int, count: int, world: int = 2, skip: set[int] = frozenset()):
    """The global batches (x, y) the loader protocol gives ``world`` ranks, skipping indices."""
    loader = ToyLoader(n, MICRO * world, rank=0, world_size=1, seed=0)
    out, i, epoch = [], 0, 0
    while len(out) < count:
        loader.set_epoch(epoch)
        for batch in loader:
            if i not in skip:
                out.append((batch["x"], batch["y"]))
            i += 1
            if len(out) == count:
                break
        epoch += 1
    return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_dist")
    runs_dir = tmp / "runs"
    zero_runs = [{"name": f"zero{s}", "overrides": FP32 + ZERO_OPTS + [f"train.zero_stage={s}"], "overwrite": True,
                  "task": {"num_samples": ZERO_SAMPLES}, "probe": s in (0, 3), "export": s in (0, 3)}
                 for s in (0, 1, 2, 3)]
    resume_task = {"num_samples": RESUME_SAMPLES}
    # the kill/resume pair trains with dropout, so the per-rank RNG state must be restored too
    drop_task = {**resume_task, "dropout": 0.2}
    main_runs = zero_runs + [
        {"name": "full", "overrides": FP32 + RESUME_OPTS, "overwrite": True,
         "task": {**resume_task, "keys_dir": str(tmp / "keys_full")}},
        {"name": "full_dropout", "overrides": FP32 + RESUME_OPTS, "overwrite": True,
         "task": {**drop_task, "keys_dir": str(tmp / "keys_full_dropout")}},
        {"name": "full_bf16", "overrides": BF16 + RESUME_OPTS, "overwrite": True,
         "task": {**drop_task, "keys_dir": str(tmp / "keys_full_bf16")}},
        {"name": "nan_once", "overrides": FP32 + NAN_OPTS, "overwrite": True,
         "task": {"num_samples": RESUME_SAMPLES, "nan_calls": [2], "nan_ranks": [1]}},
        {"name": "nan_once_zero3", "overrides": FP32 + NAN_OPTS + ["train.zero_stage=3"], "overwrite": True,
         "task": {"num_samples": RESUME_SAMPLES, "nan_calls": [2], "nan_ranks": [0]}},
        {"name": "nan_abort", "overrides": FP32 + NAN_OPTS + ["train.max_nonfinite=3"], "overwrite": True,
         "task": {"num_samples": RESUME_SAMPLES, "nan_calls": list(range(2, 10))}, "expect_error": True},
    ]
    main = _launch(tmp, "main", 2, main_runs, gather_check=True)
    # kill -9 inside step 8 (call 7): the last checkpoint is step 5
    _launch(tmp, "killed", 2, [{"name": "killed", "overrides": FP32 + RESUME_OPTS, "overwrite": True,
                                 "task": {**drop_task, "kill_call": 7, "keys_dir": str(tmp / "keys_killed")}}],
            expect_fail=True)
    # the same in bf16 (a second launch: a SIGKILL ends the process, so one kill per launch)
    _launch(tmp, "killed_bf16", 2, [{"name": "killed_bf16", "overrides": BF16 + RESUME_OPTS, "overwrite": True,
                                      "task": {**drop_task, "kill_call": 7,
                                               "keys_dir": str(tmp / "keys_killed_bf16")}}],
            expect_fail=True)
    ckpts_after_kill = sorted(p.name for p in (runs_dir / "killed" / "checkpoints").glob("step_*"))
    ckpts_after_kill_bf16 = sorted(p.name for p in (runs_dir / "killed_bf16" / "checkpoints").glob("step_*"))
    # both resumes share one launch
    resumed = _launch(tmp, "resumed", 2, [
        {"name": "killed", "overrides": FP32 + RESUME_OPTS,
         "task": {**drop_task, "keys_dir": str(tmp / "keys_resumed")}},
        {"name": "killed_bf16", "overrides": BF16 + RESUME_OPTS,
         "task": {**drop_task, "keys_dir": str(tmp / "keys_resumed_bf16")}}])
    universal = _launch(tmp, "universal", 1, [{
        "name": "universal", "overrides": FP32 + RESUME_OPTS + ["train.grad_accum=2"], "overwrite": True,
        "resume": str(runs_dir / "full" / "checkpoints" / "step_5_universal"),
        "task": {**resume_task, "keys_dir": str(tmp / "keys_universal")}}],
        convert=str(runs_dir / "full" / "checkpoints" / "step_5"))
    return {"tmp": tmp, "runs": runs_dir, "main": main, "resumed": resumed, "universal": universal,
            "ckpts_after_kill": ckpts_after_kill, "ckpts_after_kill_bf16": ckpts_after_kill_bf16}


def _rec(launch: list[list[dict]], rank: int, name: str) -> dict:
    return next(r for r in launch[rank] if r["name"] == name)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(launches, stage):
    ref, _ = reference_losses(_global_batches(ZERO_SAMPLES, 20), lr=5e-3, weight_decay=0.1, warmup=3)
    got = _losses(launches["runs"] / f"zero{stage}")
    assert sorted(got) == list(range(1, 21))
    # fp32: only the summation order of the cross-rank gradient average differs
    for step, want in enumerate(ref, 1):
        assert got[step] == pytest.approx(want, rel=2e-5, abs=2e-6), (stage, step)
    assert got[20] < 0.6 * got[1]  # and it actually trained


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_optimizer_state_is_partitioned(launches, stage):
    n = sum(p.numel() for p in ToyModel().parameters())
    n_tensors = len(list(ToyModel().parameters()))
    world = 2
    states = [_rec(launches["main"], r, f"zero{stage}")["optimizer_state"] for r in range(world)]
    for st in states:
        assert st["param_numel"] == n
        assert st["exp_avg"] == st["exp_avg_sq"]
        if stage == 0:
            # no partitioning: every rank holds Adam's m and v for all N params (8N bytes fp32)
            assert st["exp_avg"] == n
            assert st["bytes"] == 8 * n
        else:
            # ZeRO-1/2/3 (Rajbhandari et al.): optimizer state per rank = K*N/Nd; here fp32 m, v
            # -> 8 bytes * N / world, up to alignment padding of the partitions
            pad = 2 * world * n_tensors if stage == 3 else 2 * world
            assert n / world <= st["exp_avg"] <= n / world + pad, st
            assert st["bytes"] == 8 * st["exp_avg"]
        if stage == 3:
            assert n / world <= st["param_partition_numel"] <= n / world + pad
    if stage > 0:
        assert sum(s["exp_avg"] for s in states) >= n


@pytest.mark.parametrize("stage", [0, 3])
def test_exported_fp32_weights_reproduce_engine_outputs(launches, stage):
    rec = _rec(launches["main"], 0, f"zero{stage}")
    sd = torch.load(rec["exported"], map_location="cpu", weights_only=True)["state_dict"]
    model = ToyModel()
    model.load_state_dict(sd, strict=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, torch.tensor(rec["probe_out"]), rtol=1e-5, atol=1e-6)
    # and the weights are those of plain training (independent reference)
    _, ref_model = reference_losses(_global_batches(ZERO_SAMPLES, 20), lr=5e-3, weight_decay=0.1, warmup=3)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-5)


def test_kill9_resume_repeats_losses_bitwise(launches):
    assert launches["ckpts_after_kill"] == ["step_5"]
    full = _losses(launches["runs"] / "full_dropout")
    resumed = _losses(launches["runs"] / "killed")
    assert sorted(full) == sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == full[step], step  # bitwise (fp32)
    tmp = launches["tmp"]
    for r in range(2):
        full_keys = _keys(tmp / "keys_full_dropout" / f"keys_rank{r}.jsonl")
        killed_keys = _keys(tmp / "keys_killed" / f"keys_rank{r}.jsonl")
        resumed_keys = _keys(tmp / "keys_resumed" / f"keys_rank{r}.jsonl")
        assert len(killed_keys) == 7  # calls 0..6 ran before the kill at call 7
        # steps 1-5 from the killed run (6-7 were lost with it) + the resumed run == uninterrupted
        assert killed_keys[:5] + resumed_keys == full_keys
    all_keys = [k for r in range(2) for b in _keys(tmp / "keys_full" / f"keys_rank{r}.jsonl") for k in b]
    assert len(all_keys) == 10 * 2 * MICRO
    # 96 samples per epoch: epoch 0 (steps 1-6) has each sample exactly once
    first_epoch = [k for r in range(2) for b in _keys(tmp / "keys_full" / f"keys_rank{r}.jsonl")[:6] for k in b]
    assert len(set(first_epoch)) == RESUME_SAMPLES


def test_kill9_resume_in_bf16_repeats_losses_within_tolerance(launches):
    assert launches["ckpts_after_kill_bf16"] == ["step_5"]
    full = _losses(launches["runs"] / "full_bf16")
    resumed = _losses(launches["runs"] / "killed_bf16")
    assert sorted(full) == sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(full[step], rel=BF16_RESUME_RTOL), step
    # bf16 really ran: its curve is not the fp32 one (same data, dropout and seed)
    fp32 = _losses(launches["runs"] / "full_dropout")
    assert any(abs(full[s] - fp32[s]) > 1e-6 * abs(fp32[s]) for s in range(2, 11))
    tmp = launches["tmp"]
    for r in range(2):
        full_keys = _keys(tmp / "keys_full_bf16" / f"keys_rank{r}.jsonl")
        killed_keys = _keys(tmp / "keys_killed_bf16" / f"keys_rank{r}.jsonl")
        resumed_keys = _keys(tmp / "keys_resumed_bf16" / f"keys_rank{r}.jsonl")
        assert len(killed_keys) == 7
        assert killed_keys[:5] + resumed_keys == full_keys  # no sample repeated or skipped


def test_universal_checkpoint_resumes_on_one_process(launches):
    full = _losses(launches["runs"] / "full")
    uni = _losses(launches["runs"] / "universal")
    assert sorted(uni) == list(range(6, 11))
    for step in range(6, 11):
        # one rank with grad accumulation 2 == two ranks: same global batch, same mean loss
        assert uni[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    tmp = launches["tmp"]
    full0 = _keys(tmp / "keys_full" / "keys_rank0.jsonl")
    full1 = _keys(tmp / "keys_full" / "keys_rank1.jsonl")
    uni_keys = _keys(tmp / "keys_universal" / "keys_rank0.jsonl")
    expected = [b for i in range(5, 10) for b in (full0[i], full1[i])]
    assert uni_keys == expected


@pytest.mark.parametrize("name", ["nan_once", "nan_once_zero3"])
def test_nan_loss_on_one_rank_is_skipped_everywhere(launches, name):
    for r in range(2):
        assert _rec(launches["main"], r, name)["summary"]["nonfinite_skipped"] == 1
    # reference: the same training without global batch 2 (the one whose loss was NaN on rank 1)
    ref, _ = reference_losses(_global_batches(RESUME_SAMPLES, 6, skip={2}), lr=5e-3, weight_decay=0.1)
    got = _losses(launches["runs"] / name)
    for step, want in enumerate(ref, 1):
        assert got[step] == pytest.approx(want, rel=2e-5, abs=2e-6), step
    assert all(math.isfinite(v) for v in got.values())


def test_nan_losses_in_a_row_abort(launches):
    for r in range(2):
        rec = _rec(launches["main"], r, "nan_abort")
        assert rec["error"].startswith("NonFiniteLossError: 3 non-finite losses in a row")
        assert "train.max_nonfinite=3" in rec["error"]
        assert rec["nonfinite"] == 3
    # the two good steps before the NaNs were logged, nothing after
    assert sorted(_losses(launches["runs"] / "nan_abort")) == [1, 2]


def test_all_gather_with_grad_matches_single_process_autograd(launches):
    # reference: one process holding both ranks' inputs; total loss = sum of the ranks' losses
    xs = [gather_x(r) for r in range(2)]
    x_all = torch.cat(xs).requires_grad_(True)
    total = sum(torch.logsumexp(x_all[3 * r:3 * (r + 1)] @ x_all.t(), dim=1).sum() * (r + 1) for r in range(2))
    total.backward()
    for r in range(2):
        rec = _rec(launches["main"], r, "gather")
        torch.testing.assert_close(torch.tensor(rec["gathered"]), x_all.detach())
        torch.testing.assert_close(torch.tensor(rec["grad"]), x_all.grad[3 * r:3 * (r + 1)])
