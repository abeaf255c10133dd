"""The finetuning classifier (megavid.models.classifier.VideoClassifier) under the engine's
activation checkpointing: ``model.grad_checkpointing_mode`` reaches its video tower.

Oracle: the same classifier without checkpointing (loss and every parameter's gradient), and
the bytes autograd saves for backward in one forward (a checkpointed region recomputes its
activations instead of saving them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavid.engine.parallelize import apply_activation_checkpointing
from megavid.models.classifier import VideoClassifier
from megavid.models.timesformer import build_timesformer
from tests.helpers.autograd import saved_tensor_bytes


def _classifier(make_cfg) -> VideoClassifier:
    cfg = make_cfg()
    torch.manual_seed(0)
    return VideoClassifier(build_timesformer(cfg.video), cfg.video.embed_dim, num_classes=5)


@pytest.mark.parametrize("mode", ["attention", "mlp", "full"])
def test_checkpointing_mode_reaches_the_tower_with_the_same_gradients(make_cfg, mode: str) -> None:
    ref = _classifier(make_cfg)
    video = torch.randn(3, 3, 3, 32, 32)
    target = torch.tensor([0, 3, 4])
    F.cross_entropy(ref(video), target).backward()

    model = _classifier(make_cfg)
    model.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(model, 1, mode)  # what model.grad_checkpointing* do in training
    assert [b.checkpoint_mode for b in model.video_encoder.blocks] == [mode, mode]
    loss = F.cross_entropy(model(video), target)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(ref(video), target), atol=1e-6, rtol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # fewer activations kept for backward than without checkpointing
    assert saved_tensor_bytes(lambda: model(video)) < saved_tensor_bytes(lambda: ref(video))
