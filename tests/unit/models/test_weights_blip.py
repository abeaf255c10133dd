"""BLIP / ALPRO-style checkpoints (visual_encoder + text_encoder + heads) into VideoLM."""

from __future__ import annotations

import pytest
import torch
import transformers

from megavid.errors import CheckpointError
from megavid.models import build_model
from megavid.models.timesformer import TimeSformer
from megavid.models.weights import load_blip_alpro_into


def _alpro_style_checkpoint(cfg) -> tuple[dict, transformers.BertForMaskedLM]:
    t, v = cfg.text, cfg.video
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, is_decoder=True, add_cross_attention=True,
    )).eval()
    sd = {}
    n_text = t.num_layers - t.fusion_layers
    for k, val in hf.state_dict().items():
        # ALPRO's text layers have no cross-attention; only its fusion layers do
        if any(k.startswith(f"bert.encoder.layer.{i}.crossattention.") for i in range(n_text)):
            continue
        sd[f"text_encoder.{k}"] = val
    video = TimeSformer(img_size=v.img_size, patch_size=v.patch_size, num_frames=v.num_frames,
                        embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads)
    sd.update({f"visual_encoder.model.{k}": val for k, val in video.state_dict().items()})  # original TimeSformer keys
    sd["visual_encoder.model.head.weight"] = torch.zeros(400, v.embed_dim)
    sd["vision_proj.weight"], sd["vision_proj.bias"] = torch.randn(cfg.proj_dim, v.embed_dim), torch.randn(cfg.proj_dim)
    sd["text_proj.weight"], sd["text_proj.bias"] = torch.randn(cfg.proj_dim, t.hidden_size), torch.randn(cfg.proj_dim)
    sd["itm_head.weight"], sd["itm_head.bias"] = torch.randn(2, t.hidden_size), torch.randn(2)
    sd["temp"] = torch.tensor(0.05)
    sd["text_encoder_m.bert.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)  # momentum model
    sd["video_queue"] = torch.zeros(cfg.proj_dim, 8)
    return sd, hf


def test_alpro_checkpoint_loads_and_heads_match_transformers(make_cfg) -> None:
    cfg = make_cfg(mlm_weight=1.0, vtm_weight=1.0, **{"video.embed_dim": 32})  # encoder_width == hidden
    model = build_model(cfg).eval()
    sd, hf = _alpro_style_checkpoint(cfg)
    report = load_blip_alpro_into(model, sd)
    # BertForMaskedLM has no pooler: reported, kept at its (zero) init
    assert report.missing == ["text_encoder.pooler.bias", "text_encoder.pooler.weight"] and not report.unexpected
    assert not model.text_encoder.pooler.weight.any()
    assert {"video_queue", "text_encoder_m.bert.embeddings.word_embeddings.weight"} <= set(report.ignored)
    torch.testing.assert_close(model.vtm_head.weight, sd["itm_head.weight"])
    assert model.temp.item() == pytest.approx(0.05)
    torch.testing.assert_close(model.video_encoder.blocks[0].temporal_fc.weight,
                               sd["visual_encoder.model.blocks.0.temporal_fc.weight"])
    # The MLM head with the tied embedding matrix reproduces HF's BertForMaskedLM head.
    hidden = torch.randn(5, cfg.text.hidden_size)
    with torch.no_grad():
        ref = hf.cls(hidden)
        out = model.mlm_head(hidden, model.text_encoder.embeddings.word_embeddings.weight)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # The fusion layer's cross-attention k/v came from HF's separate key/value.
    L = cfg.text.num_layers - 1
    kv = torch.cat([hf.bert.encoder.layer[L].crossattention.self.key.weight,
                    hf.bert.encoder.layer[L].crossattention.self.value.weight])
    torch.testing.assert_close(model.text_encoder.layers[L].cross_attn.kv.weight, kv)


def test_alpro_checkpoint_with_wrong_width_lists_keys(make_cfg) -> None:
    cfg = make_cfg(**{"video.embed_dim": 32})
    sd, _ = _alpro_style_checkpoint(cfg)
    model = build_model(make_cfg(**{"video.embed_dim": 64}))
    with pytest.raises(CheckpointError, match=r"video_encoder\.cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)"):
        load_blip_alpro_into(model, sd)


def test_model_weights_naming_an_alpro_file_imports_it(make_cfg, tmp_path) -> None:
    """``model.weights=<BLIP/ALPRO file>`` (what eval-* and finetuning jobs import) is
    recognised by its layout and converted, not refused as another model's checkpoint."""
    from megavid.config import compose
    from megavid.tasks.base import load_initial_weights

    model_cfg = make_cfg(mlm_weight=1.0, vtm_weight=1.0, **{"video.embed_dim": 32})
    sd, _ = _alpro_style_checkpoint(model_cfg)
    path = tmp_path / "alpro.pth"
    torch.save(sd, path)
    cfg = compose([f"model.weights={path}"])
    cfg.model = model_cfg
    cfg.model.weights = str(path)
    model = build_model(cfg.model).eval()
    load_initial_weights(model, cfg)
    torch.testing.assert_close(model.vtm_head.weight, sd["itm_head.weight"])
    torch.testing.assert_close(model.text_proj.bias, sd["text_proj.bias"])
    torch.testing.assert_close(model.video_encoder.blocks[1].temporal_fc.weight,
                               sd["visual_encoder.model.blocks.1.temporal_fc.weight"])
