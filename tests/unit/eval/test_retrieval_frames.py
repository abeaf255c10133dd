"""Evaluation at another clip length than training (eval.num_frames; TESTA's f32 train / f96
eval): the model's time embedding is resized per forward, every evaluation loader comes from
one place, and impossible settings fail with the fix.

Oracles: a model built at the evaluation length whose time embedding was interpolated by hand
in the test (explicit nearest indices, checked against ``F.interpolate``): ours, and
transformers' ``TimesformerModel``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megavid.config import compose
from megavid.errors import CheckpointError, ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")



pytestmark = pytest.mark.usefixtures("one_thread")


# A tiny divided space-time TimeSformer + BERT (the real MiniLM vocabulary size).
TINY = [
    "model=timesformer_tiny", "model.video.img_size=32", "model.video.patch_size=8",
    "model.video.depth=2", "model.video.embed_dim=32", "model.video.num_heads=2",
    "model.text.num_layers=2", "model.text.fusion_layers=1", "model.text.hidden_size=32",
    "model.text.num_heads=2", "model.text.intermediate_size=64", "model.proj_dim=16",
    "model.vtm_weight=1",
]


def _model(frames: int, seed: int = 0) -> torch.nn.Module:
    from megavid.models import build_model

    torch.manual_seed(seed)
    model = build_model(compose(TINY + [f"model.video.num_frames={frames}"]).model).eval()
    with torch.no_grad():
        # time_embed and temporal_fc start at zero: random values make the time embedding and
        # the temporal branch matter, so a wrong resize changes the output
        for p in model.video_encoder.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_eval_clip_longer_than_training_equals_hand_interpolated_time_embedding():
    m4 = _model(4)
    te = m4.video_encoder.time_embed.detach()
    by_hand = te[:, [0, 0, 1, 1, 2, 2, 3, 3]]  # nearest: each trained frame's embedding twice
    torch.testing.assert_close(
        F.interpolate(te.transpose(1, 2), size=8, mode="nearest").transpose(1, 2), by_hand,
        rtol=0, atol=0)
    m8 = _model(8)
    state = m4.state_dict()
    state["video_encoder.time_embed"] = by_hand
    m8.load_state_dict(state, strict=True)

    x = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tok4, feat4 = m4.encode_video(x)  # a 4-frame model fed 8-frame clips
        tok8, feat8 = m8.encode_video(x)
        ids = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        hidden, _ = m4.encode_text(ids, mask)
        vtm4, vtm8 = m4.vtm_logits(hidden, mask, tok4), m8.vtm_logits(hidden, mask, tok8)
    assert tok4.shape == (2, 1 + 16 * 8, 32)
    torch.testing.assert_close(tok4, tok8, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(feat4, feat8, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vtm4, vtm8, rtol=1e-6, atol=1e-6)

    # control: another (wrong) resize, tiling the 4 embeddings, gives other tokens, so the
    # comparison above can fail
    state["video_encoder.time_embed"] = te[:, [0, 1, 2, 3, 0, 1, 2, 3]]
    m8.load_state_dict(state, strict=True)
    with torch.no_grad():
        tiled, _ = m8.encode_video(x)
    assert (tiled - tok4).abs().max() > 0.1


def test_longer_clip_matches_transformers_timesformer_with_hand_resized_embedding():
    """Oracle: an 8-frame ``transformers.TimesformerModel`` holding the 4-frame model's weights
    with the time embedding resized by hand. (Feeding 8 frames to HF's 4-frame model is no
    oracle: its embeddings resize, but its layers reshape by ``config.num_frames``.)"""
    transformers = pytest.importorskip("transformers")
    from megavid.models.timesformer import TimeSformer
    from megavid.models.weights import load_video_into

    def hf_config(frames: int):
        return transformers.TimesformerConfig(
            image_size=32, patch_size=8, num_frames=frames, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=128, attention_type="divided_space_time")

    torch.manual_seed(0)
    hf4 = transformers.TimesformerModel(hf_config(4)).eval()
    with torch.no_grad():
        for p in hf4.parameters():
            p.normal_(0.0, 0.1)
    ours = TimeSformer(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2,
                       num_heads=2).eval()
    report = load_video_into(ours, hf4.state_dict())
    assert not report.missing and not report.unexpected
    hf8 = transformers.TimesformerModel(hf_config(8)).eval()
    state = hf4.state_dict()
    key = "embeddings.time_embeddings"
    state[key] = state[key][:, [0, 0, 1, 1, 2, 2, 3, 3]]
    hf8.load_state_dict(state, strict=True)

    x = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf8(x).last_hidden_state
        tokens, _ = ours(x)  # 4-frame model, 8-frame clip
    assert ours.time_embed.shape[1] == 4  # nothing stored: resized per forward
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)


def test_every_task_builds_eval_loaders_at_eval_num_frames(tmp_path):
    from megavid.tasks import TASKS, get_task
    from megavid.tasks.base import VideoTextTask, get_frame_counts

    cfg = compose(TINY + [
        "model.video.num_frames=4", "eval.num_frames=8", "data.name=synthetic",
        "data.eval_batch_size=3", "data.batch_size=2", "run.debug=true",
        f"run.output_dir={tmp_path}"])
    get_task("pretrain")
    # one place builds evaluation loaders: no task overrides it (retrieval, QA, zero-shot and
    # the classification / probe / feature jobs all inherit it)
    assert all(cls.build_eval_loader is VideoTextTask.build_eval_loader for cls in TASKS.values())
    task = get_task("retrieval")(cfg)
    ev = next(iter(task.build_eval_loader("val")))
    tr = next(iter(task.build_train_loader(0, 1)))
    assert tuple(ev["video"].shape) == (3, 8, 3, 32, 32)
    assert tuple(tr["video"].shape) == (2, 4, 3, 32, 32)
    assert cfg.data.num_frames == 4  # the config itself is left alone
    assert get_frame_counts(cfg) == {"train": 4, "eval": 8}
    assert get_frame_counts(compose(TINY + ["model.video.num_frames=4"])) == {"train": 4, "eval": 4}


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["eval.num_frames=97"], "eval.num_frames=97 must be in 0..96"),
        (["eval.num_frames=-1"], "eval.num_frames=-1 must be in 0..96"),
        (["eval.chunk_size=0"], "eval.chunk_size=0 must be >= 1"),
        # a different clip length for training data than the model: the fix names eval.num_frames
        (["model.video.num_frames=4", "data.num_frames=8"],
         "data.num_frames=8 differs from model.video.num_frames=4; set both (e.g. "
         "data.num_frames=4), or keep the training length and set eval.num_frames=8"),
    ],
)
def test_impossible_frame_settings_name_the_fix(tokens, message):
    with pytest.raises(ConfigError) as e:
        compose(TINY + tokens)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_of_another_length_raises_for_eval_and_is_resized_for_training(tmp_path):
    from megavid.tasks.base import load_initial_weights, load_model_weights

    m4 = _model(4)
    path = tmp_path / "f4.pt"
    torch.save(m4.state_dict(), path)

    # evaluation: model.video.num_frames is the training length; the error gives both settings
    cfg8 = compose(TINY + ["model.video.num_frames=8"])
    with pytest.raises(CheckpointError) as e:
        load_model_weights(_model(8), path, cfg8)
    msg = str(e.value)
    assert "4-frame clips" in msg and "model.video.num_frames=4" in msg and "eval.num_frames=8" in msg

    # training at a new length from model.weights (4-frame pretraining -> 8-frame finetuning):
    # the time embedding is resized once at load, by nearest repetition
    cfg8w = compose(TINY + ["model.video.num_frames=8", f"model.weights={path}"])
    m8 = _model(8, seed=1)
    load_initial_weights(m8, cfg8w)
    te = m4.video_encoder.time_embed.detach()
    torch.testing.assert_close(m8.video_encoder.time_embed.detach(), te[:, [0, 0, 1, 1, 2, 2, 3, 3]])
    torch.testing.assert_close(m8.video_encoder.pos_embed, m4.video_encoder.pos_embed)


def test_eval_zeroshot_with_a_checkpoint_of_another_length_is_a_one_line_error(tmp_path, capsys):
    from megavid import cli

    path = tmp_path / "f4.pt"
    torch.save(_model(4).state_dict(), path)
    rc = cli.main(["eval-zeroshot", *TINY, "model.video.num_frames=8", "data.name=synthetic",
                   f"run.output_dir={tmp_path}", f"eval.checkpoint={path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.video.num_frames=4" in err and "eval.num_frames=8" in err
    assert len(err.strip().splitlines()) == 1
