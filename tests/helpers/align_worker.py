"""Worker of tests/distributed/test_param_alignment.py (``python -m tests.helpers.align_worker
STAGE...``): builds megavid's engine (tiny VideoLM, bf16) at the ZeRO stages given and prints,
per stage, each parameter's size and its address modulo 16 bytes."""

from __future__ import annotations

import json
import sys
import tempfile

from megavid.config import compose
from megavid.engine.deepspeed_setup import build_engine
from megavid.engine.dist import init_distributed
from megavid.models import build_model
from tests.helpers.multiprocess import worker_main


def main() -> None:
    init_distributed(device_type="cpu")
    out = {}
    for stage in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose(["model=timesformer_tiny", "model.vtc_weight=1", "model.vtm_weight=1",
                           "model.mlm_weight=1", f"train.zero_stage={stage}", "train.precision=bf16",
                           f"run.output_dir={tmp}", "data.batch_size=2"])
            engine, *_ = build_engine(build_model(cfg.model), cfg, world_size=1, total_steps=4,
                                      device_type="cpu")
            out[stage] = {n: [p.numel(), p.data_ptr() % 16] for n, p in engine.module.named_parameters()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    worker_main(main)
