"""What every evaluation job shares (megavid.tasks.evaluation): the set-up task (rank, world
size and the device of ``run.device``, as training picks it), encoding a split (each sample
once, dataset order, padding dropped) and encoding texts.

Oracles: batches built by hand with known dataset indices and padding; the model's own
``encode_text`` on each text alone.
"""

from __future__ import annotations

import pytest
import torch

from megavid.config import compose
from megavid.errors import ConfigError
from megavid.tasks.base import VideoTextTask
from megavid.tasks.evaluation import encode_split, encode_texts, setup_task

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model=timesformer_tiny", "model.video.img_size=32", "model.video.depth=1",
        "model.text.num_layers=2", "model.text.fusion_layers=1", "data.max_text_len=12",
        "data.eval_batch_size=2"]


def _batch(keys: list[str], indices: list[int], valid: list[bool]) -> dict:
    return {"keys": keys, "meta": [{"key": k} for k in keys], "captions": [f"a {k}" for k in keys],
            "indices": torch.tensor(indices), "valid": torch.tensor(valid),
            "x": torch.tensor([float(i) for i in indices])}


def test_encode_split_is_dataset_order_each_sample_once() -> None:
    # a rank's part of a 5-sample split as a sampler deals it: out of order, one padding row
    loader = [_batch(["c", "a"], [2, 0], [True, True]),
              _batch(["e", "b", "a"], [4, 1, 0], [True, True, False]),
              _batch(["d"], [3], [True])]
    out = encode_split(loader, lambda b: {"x2": b["x"] * 2, "pair": torch.stack([b["x"], -b["x"]], 1)})
    assert out["keys"] == ["a", "b", "c", "d", "e"]
    assert [m["key"] for m in out["meta"]] == out["keys"]
    assert out["captions"] == [f"a {k}" for k in out["keys"]]
    assert out["x2"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert out["pair"].tolist() == [[i, -i] for i in (0.0, 1.0, 2.0, 3.0, 4.0)]


def test_encode_texts_equals_each_text_encoded_alone() -> None:
    from megavid.data.text import tokenize
    from megavid.models import build_model

    cfg = compose(TINY)
    task = VideoTextTask(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    texts = ["a red circle moves left", "blue", "a square", "the green shape moves up", "up"]
    feats, hidden, mask = encode_texts(model, texts, task, keep_tokens=True)  # blocks of 2
    assert feats.shape[0] == hidden.shape[0] == mask.shape[0] == len(texts)
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids, m = tokenize(task.tokenizer, [text], cfg.data.max_text_len)
            h, t = model.encode_text(ids, m)
            torch.testing.assert_close(feats[i], t[0].float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden[i], h[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(mask[i], m[0])


def test_setup_task_takes_ranks_from_the_launcher_and_the_device_from_run_device(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    task = VideoTextTask(compose(TINY + ["run.device=cpu"]))
    setup_task(task)
    assert (task.device, task.dtype, task.rank, task.world_size) == (torch.device("cpu"), torch.float32, 0, 1)
    if not torch.cuda.is_available():
        # evaluation follows run.device like training: a GPU asked for and absent is refused
        with pytest.raises(ConfigError, match="run.device=cuda"):
            setup_task(VideoTextTask(compose(TINY + ["run.device=cuda"])))
