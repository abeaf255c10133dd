"""`megavid extract-features` under torchrun with 2 CPU processes (gloo): each rank decodes and
encodes its share of the split, the features are gathered, and rank 0 writes them. The result
must be the single-process one: every clip once, in the same order, the same vectors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megavid.cli import main
from megavid.config import compose
from tests.helpers.multiprocess import free_port, run_job

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_extract_features_two_ranks_equal_one(base_args, pretrained, tmp_path):
    from megavid.engine.checkpoint import find_checkpoint
    from megavid.launch.commands import build_torchrun_cmd
    from megavid.tasks.features import load_features

    ckpt = find_checkpoint(pretrained)
    # 64 val clips in batches of 12: each rank encodes 32 clips as 12 + 12 + 8, the single
    # process 5 x 12 + 4: different batch compositions, the same per-clip features
    common = base_args + ["eval.split=val", f"eval.checkpoint={ckpt}", "data.eval_batch_size=12"]
    one, two = common + ["run.name=feat_1rank"], common + ["run.name=feat_2ranks"]
    assert main(["extract-features", *one, "--overwrite"]) == 0

    # the launcher's own torchrun line (c10d rendezvous, python -m megavid.cli), one node, run
    # as it is (it starts the 2 ranks itself)
    cmd = build_torchrun_cmd(["extract-features", *two, "--overwrite"], nnodes=1, nproc_per_node=2,
                             rdzv_endpoint=f"127.0.0.1:{free_port()}")
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    proc = run_job(cmd, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("extract-features: 64 clips") == 1  # rank 0 reports, once

    a = load_features(compose(one).run_dir / "features" / "val")
    b = load_features(compose(two).run_dir / "features" / "val")
    assert len(a["keys"]) == 64 and b["keys"] == a["keys"]  # every clip once, dataset order
    assert b["captions"] == a["captions"] and b["meta"] == a["meta"]
    for name in ("video", "video_pooled", "text"):
        # other batch compositions: equal up to float32 summation order
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
