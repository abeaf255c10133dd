"""BERT text/fusion tower against transformers.BertModel (random and real MiniLM-L6 weights)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megavid.errors import CheckpointError
from megavid.models.bert import BertLayer, BertTextFusion, checkpoint_filter_fn
from megavid.models.weights import load_bert_into, load_converted

SENTENCES = [
    "A red circle moves slowly from left to right.",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "two people are dancing",
]


def _padded_mask(B: int, L: int) -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L // 2:] = 0
    mask[2, 3:] = 0
    return mask


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_text_layers_match_transformers_random_weights(impl: str) -> None:
    cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )
    hf = transformers.BertModel(cfg).eval()
    # 3 text layers + 1 fusion layer: the text part must equal HF's 3-layer BERT.
    ours = BertTextFusion(
        vocab_size=120, hidden_size=64, num_layers=4, fusion_layers=1, num_heads=4,
        intermediate_size=128, max_position_embeddings=32, encoder_width=48, attn_impl=impl,
    ).eval()
    sd = checkpoint_filter_fn(hf.state_dict())
    missing = set(ours.state_dict()) - set(sd)
    assert all(k.startswith("layers.3.") for k in missing)  # only the extra fusion layer
    ours.load_state_dict(sd, strict=False)
    ids = torch.randint(0, 120, (3, 12))
    mask = _padded_mask(3, 12)
    tt = torch.randint(0, 2, (3, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = ours.forward_text(ids, mask, tt)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_real_minilm_weights_and_tokenizer(minilm) -> None:
    path, hf, tok, ours, report = minilm
    c = hf.config
    # 5 embedding tensors + 12 per layer (q/k/v fused into qkv) + the pooler's 2; position ids dropped
    assert not report.missing and not report.unexpected and len(report.loaded) == 5 + 12 * c.num_hidden_layers + 2
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # the batch really has padding
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = ours.forward_text(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_fusion_layer_matches_transformers_cross_attention_layer() -> None:
    # HF only builds cross-attention in decoder layers; with is_causal switched off its layer is
    # the bidirectional ALBEF/ALPRO fusion layer (self-attn -> cross-attn -> FFN, post-LN).
    cfg = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, is_decoder=True, add_cross_attention=True,
    )
    cfg._attn_implementation = "eager"
    hf_layer = transformers.models.bert.modeling_bert.BertLayer(cfg).eval()
    hf_layer.attention.self.is_causal = False
    ours = BertLayer(32, 4, 64, eps=cfg.layer_norm_eps, dropout=0.0, attn_dropout=0.0, impl="sdpa", encoder_width=32).eval()
    sd = checkpoint_filter_fn({f"encoder.layer.0.{k}": v for k, v in hf_layer.state_dict().items()})
    ours.load_state_dict({k.removeprefix("layers.0."): v for k, v in sd.items()}, strict=True)
    x, enc = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    with torch.no_grad():
        ref = hf_layer(x, None, encoder_hidden_states=enc)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = ours(x, None, enc, None)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_plain_bert_into_fusion_model_reports_new_cross_attention() -> None:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    hf = transformers.BertModel(cfg)
    ours = BertTextFusion(vocab_size=50, hidden_size=32, num_layers=2, fusion_layers=1, num_heads=4,
                          intermediate_size=64, max_position_embeddings=16, encoder_width=24)
    report = load_bert_into(ours, hf.state_dict())
    assert report.missing and all(".cross_" in k for k in report.missing)
    assert {"pooler.weight", "pooler.bias"} <= set(report.loaded) and not report.ignored
    torch.testing.assert_close(ours.layers[1].fc1.weight, hf.encoder.layer[1].intermediate.dense.weight)


def test_wrong_shapes_raise_listing_keys() -> None:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    hf = transformers.BertModel(cfg)
    ours = BertTextFusion(vocab_size=60, hidden_size=32, num_layers=1, fusion_layers=0, num_heads=4,
                          intermediate_size=48, max_position_embeddings=16)
    with pytest.raises(CheckpointError) as e:
        load_bert_into(ours, hf.state_dict())
    msg = str(e.value)
    for key in ("embeddings.word_embeddings.weight", "layers.0.fc1.weight", "layers.0.fc2.weight"):
        assert key in msg
    assert "(50, 32) vs model (60, 32)" in msg


def test_missing_and_unexpected_keys_raise() -> None:
    ours = BertTextFusion(vocab_size=50, hidden_size=32, num_layers=1, fusion_layers=0, num_heads=4,
                          intermediate_size=64, max_position_embeddings=16)
    sd = ours.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("layers.0.fc1")}
    with pytest.raises(CheckpointError, match="layers.0.fc1.weight"):
        load_converted(ours, partial)
    with pytest.raises(CheckpointError, match="layers.5.extra"):
        load_converted(ours, {**sd, "layers.5.extra": torch.zeros(1)})
    report = load_converted(ours, {**sd, "layers.5.extra": torch.zeros(1)}, strict=False)
    assert report.unexpected == ["layers.5.extra"]


def test_missing_file_is_a_checkpoint_error(tmp_path) -> None:
    ours = BertTextFusion(vocab_size=50, hidden_size=32, num_layers=1, fusion_layers=0, num_heads=4,
                          intermediate_size=64, max_position_embeddings=16)
    with pytest.raises(CheckpointError, match="not found"):
        load_bert_into(ours, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no weights in folder"):
        load_bert_into(ours, tmp_path)


def _bert_pair(kernel_impl: str):
    """HF BertModel (3 layers, random weights) and ours with the same weights and one fusion
    layer on top, switched to ``kernel_impl`` (megavid.models.apply_kernels)."""
    from megavid.models import apply_kernels

    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertModel(cfg, add_pooling_layer=False)
    ours = BertTextFusion(vocab_size=120, hidden_size=64, num_layers=4, fusion_layers=1, num_heads=4,
                          intermediate_size=128, max_position_embeddings=32, encoder_width=48)
    ours.load_state_dict(checkpoint_filter_fn(hf.state_dict()), strict=False)
    counts = apply_kernels(ours, kernel_impl)
    assert counts["bert_attention"] == 4 and counts["bert_layer"] == 4
    assert counts["layer_norm"] == 1 + 3 * 2 + 3  # embeddings, 2 per text layer, 3 in the fusion layer
    return hf, ours


def test_fused_text_path_matches_transformers_training_gradients() -> None:
    """model.kernel_impl on the BERT side (short_attention for self-attention, each residual add
    fused into the post-norm): forward and gradients in training mode equal transformers'
    BertModel (fp32). On CPU "auto" runs the kernels' torch implementations; the Triton kernels
    are checked against the same path by test_fused_text_path_triton_interpreter."""
    pytest.importorskip("megavid.kernels")
    hf, ours = _bert_pair("auto")
    hf.train()
    ours.train()
    ids = torch.randint(1, 120, (3, 12))  # no id 0: HF's pad row (padding_idx=0) never gets a gradient
    mask = _padded_mask(3, 12)
    w = torch.randn(3, 12, 64) * mask[..., None]
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    (ref * w).sum().backward()
    out = ours.forward_text(ids, mask)
    (out * w).sum().backward()
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    ref_grads = checkpoint_filter_fn({n: p.grad for n, p in hf.named_parameters()})
    for n, p in ours.named_parameters():
        if n.startswith("layers.3."):
            continue  # the fusion layer has no HF counterpart (and no gradient here)
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


_TRITON_SCRIPT = r"""
import torch
from megavid.kernels import _triton
assert _triton.INTERPRETED
from megavid.models import apply_kernels
from megavid.models.bert import BertTextFusion
torch.manual_seed(0)
ref = BertTextFusion(vocab_size=60, hidden_size=32, num_layers=2, fusion_layers=1, num_heads=2,
                     intermediate_size=64, max_position_embeddings=16, encoder_width=24).train()
fused = BertTextFusion(vocab_size=60, hidden_size=32, num_layers=2, fusion_layers=1, num_heads=2,
                       intermediate_size=64, max_position_embeddings=16, encoder_width=24).train()
fused.load_state_dict(ref.state_dict())
apply_kernels(fused, "triton")
ids = torch.randint(0, 60, (2, 9))
mask = torch.ones(2, 9, dtype=torch.long)
mask[1, 5:] = 0
video = torch.randn(2, 7, 24)
outs = []
for m in (ref, fused):
    out = m(ids, mask, video)
    (out * mask[..., None]).square().sum().backward()
    outs.append(out.detach())
torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
    torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)
print("OK")
"""


@pytest.mark.slow
def test_fused_text_path_triton_interpreter() -> None:
    """The BERT side with model.kernel_impl=triton (Triton short_attention and residual-fused
    LayerNorm kernels, run by Triton's interpreter on CPU) equals the unfused layers, forward
    and gradients. A fresh process: Triton fixes its mode when it is first imported."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, (p.stdout + p.stderr)[-3000:]
