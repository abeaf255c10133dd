"""Checkpoint safety end to end, through ``python -m megavid.cli`` in a subprocess (the exit code
and the whole stderr a user sees), on a tiny VideoLM pretrained for 2 steps with DeepSpeed:

- crafted pickles (``os.system('touch MARKER')``) as ``eval.checkpoint`` (an exported file, a
  DeepSpeed folder whose model or optimizer states were replaced), ``model.weights`` (a file and
  a folder), ``model.text_weights``, ``export-checkpoint --resume`` and ``pretrain --resume``
  (``rng_rank0.pt``): exit code 2, one stderr line naming the file, the marker never created;
- random bytes, a truncated export, and a model of another depth or width: one line each;
- a run whose export is older than its newest checkpoint: eval-zeroshot re-exports, says which
  step it evaluates and records it; the weights are DeepSpeed's own consolidation of that step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from megavid import cli
from megavid.config import compose
from tests.helpers.multiprocess import JobResult, python_module, run_job

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

_TRAINED: dict = {}


class _System:
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _craft(path: Path, marker: Path, base: dict | None = None) -> Path:
    """``base`` (a real checkpoint's content, default a small state dict) plus the payload."""
    obj = dict(base if base is not None else {"w": torch.zeros(2)})
    obj["payload"] = _System(marker)
    torch.save(obj, path)
    return path


@pytest.fixture
def trained(base_tokens) -> tuple[list[str], Path]:
    """(config tokens, run dir) of a tiny VideoLM pretrained 2 steps (ZeRO-2 fp32, checkpoints
    step_1 and step_2); trained once, by the first test that asks (its tmp_path outlives it)."""
    if "run" not in _TRAINED:
        tokens = base_tokens + ["run.name=safety", "eval.split=val"]
        assert cli.main(["pretrain", *tokens, "train.max_steps=2", "train.ckpt_every=1",
                         "train.keep_last=0"]) == 0
        _TRAINED["run"] = (tokens, compose(tokens).run_dir)
    return _TRAINED["run"]


def _megavid(*args: str) -> JobResult:
    return run_job(python_module("megavid.cli", *args), timeout=300)


def _one_line_error(proc: JobResult, command: str, path: Path) -> str:
    """Exit code 2 and one error line, the last on stderr, naming ``path``; no traceback. (With
    stderr not a terminal, as here, a job's INFO lines, e.g. its decode plan, come before it.)"""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("megavid ") or " ERROR " in ln or " WARNING " in ln]
    assert errors == lines[-1:], proc.stderr[-3000:]
    assert lines[-1].startswith(f"megavid {command}: error: ") and str(path) in lines[-1], lines[-1]
    return lines[-1]


def _copy_tag(run_dir: Path, dst: Path, tag: str = "step_2") -> Path:
    folder = dst / "checkpoints" / tag
    shutil.copytree(run_dir / "checkpoints" / tag, folder)
    (dst / "checkpoints" / "latest").write_text(tag)
    return folder


def _craft_in_place(f: Path, marker: Path) -> Path:
    base = torch.load(f, map_location="cpu", weights_only=False)  # written by this test: trusted
    return _craft(f, marker, base)


def test_crafted_checkpoints_never_run_and_fail_in_one_line(trained, tmp_path):
    tokens, run = trained
    marker = tmp_path / "MARKER"
    refusal = r"refusing to load .*: it would import posix\.system; megavid loads only tensors"

    export = tmp_path / "dl" / "model_fp32.pt"
    export.parent.mkdir()
    _craft(export, marker)
    for arg in (f"eval.checkpoint={export}", f"eval.checkpoint={export.parent}"):
        line = _one_line_error(_megavid("eval-zeroshot", *tokens, arg), "eval-zeroshot", export)
        assert re.search(refusal, line), line

    for victim in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        folder = _copy_tag(run, tmp_path / victim.split(".")[0])
        f = _craft_in_place(folder / victim, marker)
        line = _one_line_error(_megavid("eval-zeroshot", *tokens, f"eval.checkpoint={folder}"),
                               "eval-zeroshot", f)
        assert re.search(refusal, line), line
        line = _one_line_error(_megavid("export-checkpoint", *tokens, f"run.output_dir={tmp_path / 'exp'}",
                                        "--resume", str(folder)), "export-checkpoint", f)
        assert re.search(refusal, line), line

    ft = [*tokens, f"run.output_dir={tmp_path / 'ft'}", "run.name=ft", "train.max_steps=1"]
    for arg in (f"model.weights={export}", f"model.weights={export.parent}", f"model.text_weights={export}"):
        line = _one_line_error(_megavid("finetune-retrieval", *ft, arg, "--overwrite"), "finetune-retrieval", export)
        assert re.search(refusal, line), line
        assert not (tmp_path / "ft" / "ft").exists(), "a job that failed before its first step left its run folder"
    assert not marker.exists()


def test_crafted_rng_file_is_refused_on_resume(trained, tmp_path):
    tokens, run = trained
    marker = tmp_path / "MARKER"
    folder = _copy_tag(run, tmp_path / "run")
    f = _craft_in_place(folder / "rng_rank0.pt", marker)
    proc = _megavid("pretrain", *tokens, f"run.output_dir={tmp_path / 'resumed'}", "run.name=r",
                    "train.max_steps=3", "--resume", str(folder))
    assert not marker.exists(), "a crafted rng_rank0.pt ran its code on --resume"
    line = _one_line_error(proc, "pretrain", f)
    assert "refusing to load" in line and "posix.system" in line
    assert not (tmp_path / "resumed" / "r").exists(), "a job that failed before its first step left its run folder"


def test_bad_and_wrong_model_checkpoints_fail_in_one_line(trained, tmp_path):
    from megavid.engine.checkpoint import export_fp32

    tokens, run = trained
    good = export_fp32(run / "checkpoints" / "step_2", tmp_path / "good.pt")
    data = good.read_bytes()
    cases = {"random.pt": (os.urandom(len(data)), "corrupted or not a torch checkpoint"),
             "truncated.pt": (data[: len(data) // 2], "truncated")}
    for name, (content, what) in cases.items():
        f = tmp_path / name
        f.write_bytes(content)
        line = _one_line_error(_megavid("eval-zeroshot", *tokens, f"eval.checkpoint={f}"), "eval-zeroshot", f)
        assert what in line, line

    # another model size: the first 3 keys with their shapes, the rest counted
    state = torch.load(good, weights_only=True)["state_dict"]
    for change, what in (("model.video.depth=3", "model tensors are missing"),
                         ("model.video.embed_dim=128", "tensors have other shapes")):
        line = _one_line_error(_megavid("eval-zeroshot", *tokens, change, f"eval.checkpoint={good}"),
                               "eval-zeroshot", good)
        assert f"checkpoint {good} does not fit the model" in line and what in line, line
        named = re.findall(r"\b((?:video_encoder|text_encoder|vision_proj|text_proj)[\w.]*)", line)
        assert 1 <= len(named) <= 3 and re.search(r"and \d+ more", line), line
        if "shapes" in what:
            k = named[0]
            assert f"{k}: checkpoint {tuple(state[k].shape)}" in line, line
        assert len(line) < 1000


def test_eval_uses_the_newest_checkpoint_when_the_export_is_older(trained, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tokens, src = trained
    run = tmp_path / "runs" / "stale"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("eval"))
    tokens = [*tokens, f"run.output_dir={tmp_path / 'runs'}", "run.name=stale"]
    proc = _megavid("export-checkpoint", *tokens, "--resume", str(run / "checkpoints" / "step_1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = run / "model_fp32.pt"
    assert torch.load(export, weights_only=True)["source"].endswith("step_1")

    proc = _megavid("eval-zeroshot", *tokens)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluating {export} (step 2)" in proc.stdout, proc.stdout
    assert "exported from step 1" in proc.stdout, proc.stdout
    doc = json.loads((run / "eval" / "zeroshot_val_step2.json").read_text())
    assert doc["checkpoint"]["step"] == 2 and Path(doc["checkpoint"]["path"]) == export.resolve()
    assert doc["checkpoint"]["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    # the evaluated weights are step 2's, as DeepSpeed's own zero_to_fp32 consolidates them
    ref = {s: get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{s}") for s in (1, 2)}
    sd = torch.load(export, weights_only=True)["state_dict"]
    assert sd.keys() == ref[2].keys()
    assert all(torch.equal(sd[k], ref[2][k].float()) for k in sd)
    assert not all(torch.equal(sd[k], ref[1][k].float()) for k in sd)

    # a named step folder is evaluated as named, and says so
    proc = _megavid("eval-zeroshot", *tokens, f"eval.checkpoint={run / 'checkpoints' / 'step_1'}")
    assert proc.returncode == 0 and "(step 1)" in proc.stdout, proc.stderr[-3000:]
    assert json.loads((run / "eval" / "zeroshot_val_step1.json").read_text())["checkpoint"]["step"] == 1
