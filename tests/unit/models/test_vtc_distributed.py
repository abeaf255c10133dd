"""VTC across 2 real processes (gloo) with the engine's all-gather-with-grad: loss and averaged
gradients equal a single process on the whole batch (the second process is the oracle's peer)."""

from __future__ import annotations

import pytest
import torch

from megavid.models import build_model
from tests.helpers.multiprocess import run_ranks

WORLD = 2


def _cfg():
    from megavid.config import compose

    return compose([
        "model.video.img_size=32", "model.video.patch_size=8", "model.video.num_frames=2",
        "model.video.embed_dim=32", "model.video.depth=1", "model.video.num_heads=2",
        "model.text.vocab_size=100", "model.text.hidden_size=32", "model.text.num_layers=2",
        "model.text.fusion_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
        "model.text.max_position_embeddings=16", "model.proj_dim=16",
        "data.img_size=32", "data.num_frames=2",
    ]).model


def _worker(rank: int, payload: dict) -> dict:
    import torch.distributed as dist

    from megavid.engine.dist import all_gather_with_grad

    model = build_model(_cfg())
    model.load_state_dict(payload["state"])
    n = payload["video"].shape[0] // WORLD
    sl = slice(rank * n, (rank + 1) * n)
    out = model(payload["video"][sl], payload["ids"][sl], payload["mask"][sl], gather=all_gather_with_grad)
    out["loss"].backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # what DeepSpeed does: average over ranks
            grads[name] = p.grad / WORLD
    return {"loss": out["loss"].detach(), "grads": grads}


@pytest.mark.distributed
@pytest.mark.slow
def test_vtc_gather_two_processes_equals_single_process() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg())
    B = 6
    video = torch.randn(B, 2, 3, 32, 32)
    ids = torch.randint(5, 100, (B, 8))
    mask = torch.ones(B, 8, dtype=torch.long)
    out = model(video, ids, mask)
    out["loss"].backward()
    payload = {"state": model.state_dict(), "video": video, "ids": ids, "mask": mask}
    for res in run_ranks(_worker, WORLD, payload):
        torch.testing.assert_close(res["loss"], out["loss"].detach(), atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            if p.grad is None:
                assert name not in res["grads"], name
            else:
                torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
