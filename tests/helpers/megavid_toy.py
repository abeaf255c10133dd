"""A small generic model, a deterministic loader implementing the loader protocol, and a task,
for engine tests (no video: the engine must not care). Shared by tests/distributed and
tests/unit/engine.

The loader follows the shared contract: a global cursor over a per-epoch permutation seeded
by (seed, epoch), independent of world size: global batch g of rank r holds permutation
entries ``[cursor + r*b, cursor + (r+1)*b)`` where the cursor advances by ``world*b``; one rank
with grad accumulation 2 sees the same samples as two ranks without.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from torch import nn

DIM = 16
NUM_CLASSES = 5


class ToyModel(nn.Module):
    """Embedding-free MLP classifier with a LayerNorm, a learned 2-D offset and a class embedding.

    ``offset`` is 2-D but listed in ``no_weight_decay()``; ``stem`` counts as the pretrained
    backbone for optimizer-group tests.
    """

    def __init__(self, dim: int = DIM, hidden: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> None:
        super().__init__()
        # dropout draws from the torch RNG: exact resume needs the per-rank RNG state restored
        self.drop = nn.Dropout(dropout)
        self.stem = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.offset = nn.Parameter(torch.zeros(1, hidden))
        self.head = nn.Linear(hidden, hidden)
        self.cls = nn.Embedding(num_classes, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.stem(x)) + self.offset)
        h = torch.tanh(self.head(self.drop(h)))
        return h @ self.cls.weight.t()

    def no_weight_decay(self) -> set[str]:
        return {"offset"}

    def backbone_param_names(self) -> set[str]:
        return {"stem.weight", "stem.bias"}


def make_dataset(n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n samples: features, labels (a fixed random linear rule), keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    w = torch.randn(DIM, NUM_CLASSES, generator=g)
    y = (x @ w).argmax(1)
    return x, y, [f"s{i:05d}" for i in range(n)]


class ToyLoader:
    """Deterministic loader with the megavid loader protocol (len, set_epoch, state_dict ...)."""

    def __init__(self, n: int, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.x, self.y, self.keys = make_dataset(n)
        self.n, self.b, self.rank, self.world, self.seed = n, micro_batch, rank, world_size, seed
        self.epoch = 0
        self.cursor = 0
        self.failures: dict[str, int] = {}

    def __len__(self) -> int:
        return self.n // (self.b * self.world)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.cursor = 0
        self.epoch = epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.cursor = sd["epoch"], sd["cursor"]

    def __iter__(self):
        perm = self.permutation(self.epoch)
        step = self.b * self.world
        while self.cursor + step <= self.n:
            idx = perm[self.cursor + self.rank * self.b: self.cursor + (self.rank + 1) * self.b]
            self.cursor += step  # before yield: the state always reflects consumed batches
            yield {"x": self.x[idx], "y": self.y[idx], "keys": [self.keys[i] for i in idx.tolist()]}


class ToyTask:
    """Task protocol implementation with test hooks (NaN injection, SIGKILL, key recording).

    Args:
        cfg: the megavid Config (uses data.batch_size and run.seed).
        num_samples: dataset size.
        nan_calls: training_forward call indices (0-based, per process) whose loss becomes NaN.
        nan_ranks: ranks that inject (None: all).
        kill_call: SIGKILL this process at this call index.
        keys_dir: write ``keys_rank<R>.jsonl`` (one line of keys per successful call).
        dropout: dropout probability inside the model.
    """

    def __init__(self, cfg, num_samples: int = 256, *, nan_calls=(), nan_ranks=None, kill_call: int = -1,
                 keys_dir: str | None = None, dropout: float = 0.0, eval_scores=None) -> None:
        self.dropout = dropout
        # only tasks built with eval_scores have `evaluate` (the trainer checks hasattr)
        if eval_scores is not None:
            self._scores = list(eval_scores)
            self.evaluate = self._evaluate
        self.cfg = cfg
        self.num_samples = num_samples
        self.nan_calls = set(nan_calls)
        self.nan_ranks = nan_ranks
        self.kill_call = kill_call
        self.keys_dir = keys_dir
        self.calls = 0

    def setup(self, device, dtype, rank, world_size, gather) -> None:
        self.device, self.dtype, self.rank, self.world_size, self.gather = device, dtype, rank, world_size, gather
        self._keys = None
        if self.keys_dir:
            Path(self.keys_dir).mkdir(parents=True, exist_ok=True)
            self._keys = open(Path(self.keys_dir) / f"keys_rank{rank}.jsonl", "a", buffering=1)

    def build_model(self) -> nn.Module:
        return ToyModel(dropout=self.dropout)

    def build_train_loader(self, rank: int, world_size: int) -> ToyLoader:
        return ToyLoader(self.num_samples, self.cfg.data.batch_size, rank, world_size, seed=self.cfg.run.seed)

    def training_forward(self, model, batch) -> dict:
        call = self.calls
        self.calls += 1
        if call == self.kill_call:
            os.kill(os.getpid(), signal.SIGKILL)
        x = batch["x"].to(self.device, self.dtype)
        logits = model(x).float()
        loss = nn.functional.cross_entropy(logits, batch["y"].to(self.device))
        if call in self.nan_calls and (self.nan_ranks is None or self.rank in self.nan_ranks):
            loss = loss * float("nan")
        elif self._keys is not None:
            self._keys.write(json.dumps(batch["keys"]) + "\n")
        return {"loss": loss, "loss_ce": loss.detach()}

    def batch_size(self, batch) -> int:
        return len(batch["keys"])

    def tokens_per_sample(self, batch) -> float:
        # one token per input feature (a toy stand-in for frames x patches + text tokens)
        return float(batch["x"].shape[1])

    def _evaluate(self, model) -> dict:
        """Accuracy on a fixed held-out set, plus a scripted 'score' for best-checkpoint tests."""
        x, y, _ = make_dataset(64, seed=99)
        acc = (model(x.to(self.device, self.dtype)).float().argmax(1) == y).float().mean().item()
        return {"acc": acc, "score": self._scores.pop(0)}

    def flops_per_sample(self, model) -> float:
        # 2 FLOPs per multiply-add forward, x3 for forward+backward
        n = sum(p.numel() for n_, p in model.named_parameters() if n_.endswith("weight"))
        return 6.0 * n


def reference_losses(global_batches: list[tuple[torch.Tensor, torch.Tensor]], *, lr: float, weight_decay: float,
                     betas=(0.9, 0.98), eps: float = 1e-8, grad_clip: float = 1.0, warmup: int = 0,
                     total: int = 0, seed: int = 0) -> tuple[list[float], ToyModel]:
    """Plain single-process torch training (no DeepSpeed) on the given global batches.

    Groups written out by hand (an independent reference for megavid's optimizer groups):
    decay = the three weight matrices; no decay = biases, LayerNorm, offset, class embedding.
    Constant LR after linear warmup (schedule='constant').
    """
    torch.manual_seed(seed)
    model = ToyModel()
    decay = [model.stem.weight, model.head.weight]
    no_decay = [model.stem.bias, model.norm.weight, model.norm.bias, model.offset, model.head.bias, model.cls.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps, foreach=False)
    losses = []
    for s, (x, y) in enumerate(global_batches):
        for g in opt.param_groups:
            g["lr"] = lr * ((s + 1) / warmup if s < warmup else 1.0)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses, model
