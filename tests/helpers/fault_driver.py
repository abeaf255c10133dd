"""Runs `megavid ARGS...` (``megavid.cli.run``, the program itself) with one fault injected,
for tests/integration/test_faults.py.

Usage: ``python -m tests.helpers.fault_driver FAULT ARGS...``, where FAULT is one of

- ``none``: no fault;
- ``worker@S``: a DataLoader worker raises while building the batch of global step S;
- ``dali_feed@S``: the DALI loader's feed stage raises while preparing global step S;
- ``forward@S:R``: the forward pass of global step S raises on rank R;
- ``oom@S``: the forward pass of global step S raises PyTorch's CUDA out-of-memory error.

Steps count optimizer steps from 1 (one micro-batch per step in these tests); the rank is
the global rank. The faults patch the real code in this process (forked loader workers
inherit the patch): nothing in megavid knows about them. The process ends as the ``megavid``
program does (``megavid.cli.run``: flushed, then ``os._exit``), which is what is under test.
"""

from __future__ import annotations

import os
import sys

import torch


def _inject(fault: str) -> None:
    if fault == "none":
        return
    kind, _, where = fault.partition("@")
    if kind == "worker":
        from megavid.data.workers import _BatchDataset

        step = int(where)
        original = _BatchDataset.__getitem__

        def getitem(self, i):
            plan = self.plan
            if (torch.utils.data.get_worker_info() is not None
                    and plan.start // plan.global_batch + i + 1 == step):
                raise RuntimeError(f"injected fault in loader worker {os.getpid()}")
            return original(self, i)

        _BatchDataset.__getitem__ = getitem
        return
    if kind == "dali_feed":
        from megavid.data.dali.loader import DaliLoader

        step = int(where)
        original_prepare = DaliLoader._prepare

        def prepare(self, plan, i):
            if plan.start // plan.global_batch + i + 1 == step:
                raise RuntimeError("injected fault in the DALI feed")
            return original_prepare(self, plan, i)

        DaliLoader._prepare = prepare
        return
    from megavid.tasks.pretrain import PretrainTask

    step_s, _, rank_s = where.partition(":")
    step, rank = int(step_s), int(rank_s or 0)
    original_forward = PretrainTask.training_forward

    def forward(self, model, batch):
        # the DeepSpeed engine counts optimizer steps (and restores the count on resume)
        if int(model.global_steps) + 1 == step and self.rank == rank:
            if kind == "oom":
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                    "of 79.11 GiB of which 1.12 GiB is free.")
            raise RuntimeError(f"injected fault in the forward pass of rank {self.rank}")
        return original_forward(self, model, batch)

    PretrainTask.training_forward = forward


if __name__ == "__main__":
    _inject(sys.argv[1])
    from megavid.cli import run

    run(sys.argv[2:])
