"""A DeepSpeed checkpoint written before megavid kept the BERT pooler still resumes: a tiny
VideoLM is pretrained 1 step (ZeRO-2, real shards), the pooler is taken out of the
checkpoint's model states (as an older megavid wrote them), and ``megavid pretrain`` resumes
it to step 2, keeping the model's own pooler and saying so; the next checkpoint holds it.

Oracle: the files themselves (torch.load of the module states), the run's log.
"""

from __future__ import annotations

import pytest
import torch

from megavid import cli
from megavid.config import compose

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

POOLER = ("text_encoder.pooler.weight", "text_encoder.pooler.bias")


def test_a_checkpoint_without_the_pooler_resumes(base_tokens):
    tokens = base_tokens + ["run.name=old", "eval.split=val", "train.ckpt_every=1", "train.eval_every=100"]
    assert cli.main(["pretrain", *tokens, "train.max_steps=1"]) == 0
    run = compose(tokens).run_dir
    states = run / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt"
    obj = torch.load(states, map_location="cpu", weights_only=False)  # written by this test's run
    assert all(k in obj["module"] for k in POOLER) and all(k in obj["buffer_names"] for k in POOLER)
    for k in POOLER:
        del obj["module"][k]
    obj["buffer_names"] = [k for k in obj["buffer_names"] if k not in POOLER]
    torch.save(obj, states)

    assert cli.main(["pretrain", *tokens, "train.max_steps=2"]) == 0
    log = (run / "logs" / "rank0.log").read_text()
    assert ("text_encoder.pooler.weight, text_encoder.pooler.bias not in the checkpoint (written before "
            "megavid kept the BERT pooler): kept at its current values") in log
    assert "resumed from" in log and (run / "checkpoints" / "step_2").is_dir()
    new = torch.load(run / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt", map_location="cpu",
                     weights_only=False)
    assert all(k in new["module"] and not new["module"][k].any() for k in POOLER)  # kept: zero, no import
    old_keys = set(obj["module"])
    assert old_keys < set(new["module"]) and set(new["module"]) - old_keys == set(POOLER)
