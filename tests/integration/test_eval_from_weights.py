"""Evaluation from weights alone: ``megavid eval-zeroshot model.weights=<exported fp32 file>`` (and
eval-zeroshot-cls) in a new, empty run folder, with no training run in it.

A tiny VideoLM is pretrained for 2 steps with DeepSpeed (ZeRO-2, real VP9 shards) and exported
with ``megavid export-checkpoint``. Oracle: the same commands evaluating the training run
itself; the recorded hashes are recomputed here with hashlib. Results files are named by split
and step (``_<stem>`` for a plain state dict without one) and never replaced without
``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from megavid import cli
from megavid.config import compose

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_from_exported_weights_in_an_empty_run_folder(base_tokens, tmp_path, capsys):
    src = base_tokens + ["run.name=src", "eval.split=val", "model.vtm_weight=1", "eval.k_test=4"]
    assert cli.main(["pretrain", *src, "train.max_steps=2"]) == 0
    src_dir = compose(src).run_dir
    assert cli.main(["export-checkpoint", *src]) == 0
    export = src_dir / "model_fp32.pt"
    state = torch.load(export, weights_only=True)
    assert state["step"] == 2
    # the frozen BERT pooler is saved like the weights (zero: trained from scratch, no import)
    assert not state["state_dict"]["text_encoder.pooler.weight"].any()
    assert cli.main(["eval-zeroshot", *src]) == 0
    reference = json.loads((src_dir / "eval" / "zeroshot_val_step2.json").read_text())
    capsys.readouterr()

    fresh = base_tokens + ["run.name=fresh", "eval.split=val", "model.vtm_weight=1", "eval.k_test=4",
                           f"model.weights={export}"]
    fresh_dir = compose(fresh).run_dir
    assert not fresh_dir.exists()
    assert cli.main(["eval-zeroshot", *fresh]) == 0
    assert f"evaluating {export} (step 2)" in capsys.readouterr().out
    out = fresh_dir / "eval" / "zeroshot_val_step2.json"
    doc = json.loads(out.read_text())
    assert doc["metrics"] == reference["metrics"]  # every VTC / VTM / temporal / QA number
    assert any(k.startswith("vtm/") for k in doc["metrics"]["metrics"])
    assert doc["checkpoint"] == {"path": str(export.resolve()), "sha256": _sha256(export), "kind": "file",
                                 "step": 2}
    assert doc["imported_weights"] == {"model.weights": {"path": str(export.resolve()), "sha256": _sha256(export)}}
    # no training run, no fake pretraining: the run folder holds the evaluation only
    assert not (fresh_dir / "checkpoints").exists() and not (fresh_dir / "model_fp32.pt").exists()

    # a second evaluation of the same weights and split: refused in one line, the file kept
    before = out.read_bytes()
    assert cli.main(["eval-zeroshot", *fresh]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    assert out.read_bytes() == before
    assert cli.main(["eval-zeroshot", *fresh, "--overwrite"]) == 0
    assert json.loads(out.read_text())["metrics"] == reference["metrics"]

    from megavid.eval.results import verify_results

    assert verify_results(out)

    # a plain state dict records no step: its results are named by the file's stem
    plain = tmp_path / "plain_weights.pt"
    torch.save(state["state_dict"], plain)
    assert cli.main(["eval-zeroshot", *fresh[:-1], f"model.weights={plain}"]) == 0
    doc = json.loads((fresh_dir / "eval" / "zeroshot_val_plain_weights.json").read_text())
    assert doc["metrics"] == reference["metrics"] and doc["checkpoint"]["step"] is None
    assert doc["checkpoint"]["sha256"] == _sha256(plain)

    # the text tower's weights alone (model.text_weights): named '_imported', no checkpoint
    text = tmp_path / "text_tower.pt"
    torch.save({k.removeprefix("text_encoder."): v for k, v in state["state_dict"].items()
                if k.startswith("text_encoder.")}, text)
    assert cli.main(["eval-zeroshot", *fresh[:-1], f"model.text_weights={text}"]) == 0
    out = fresh_dir / "eval" / "zeroshot_val_imported.json"
    doc = json.loads(out.read_text())
    assert doc["checkpoint"] is None
    assert doc["imported_weights"] == {"model.text_weights": {"path": str(text.resolve()), "sha256": _sha256(text)}}
    assert verify_results(out)

    # eval-zeroshot-cls the same way: equal to evaluating the training run
    cls = ["task=cls_synthetic_colour"]
    assert cli.main(["eval-zeroshot-cls", *src, *cls]) == 0
    assert cli.main(["eval-zeroshot-cls", *fresh, *cls]) == 0
    ref_cls = json.loads((src_dir / "eval" / "zeroshot_cls_val_step2.json").read_text())
    got_cls = json.loads((fresh_dir / "eval" / "zeroshot_cls_val_step2.json").read_text())
    ref_scores = torch.load(src_dir / "eval" / "zeroshot_cls_val_step2_scores.pt", weights_only=True)
    got_scores = torch.load(fresh_dir / "eval" / "zeroshot_cls_val_step2_scores.pt", weights_only=True)
    assert got_cls["metrics"]["metrics"] == ref_cls["metrics"]["metrics"]
    assert torch.equal(got_scores["scores"], ref_scores["scores"])
    assert got_cls["checkpoint"]["sha256"] == _sha256(export)


def test_a_run_folder_without_weights_names_every_way_to_give_them(base_tokens, capsys):
    tokens = base_tokens + ["run.name=nothing", "eval.split=val"]
    assert cli.main(["eval-zeroshot", *tokens]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.checkpoint=PATH" in err[0] and "model.weights=PATH" in err[0], err
