"""model.compile (regional torch.compile of the transformer blocks, or the whole model) and
model.grad_checkpointing_mode as the engine applies them (megavid.engine.parallelize).

Oracles: the same model run eagerly (loss and every parameter's gradient in fp32; the
per-step losses of an uncompiled engine run); graph counts from a counting torch.compile
backend and dynamo's own ``counters["stats"]["unique_graphs"]``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from megavid.config import compose
from megavid.engine.parallelize import apply_model_options
from megavid.errors import ConfigError
from megavid.models import build_model, get_blocks
from tests.helpers.drive import result_records
from tests.helpers.multiprocess import process_env, python_module, run_job

# 2 TimeSformer blocks + 2 BERT text layers + 1 fusion layer
TINY = ["model.video.img_size=32", "model.video.patch_size=8", "model.video.num_frames=3",
        "model.video.embed_dim=48", "model.video.depth=2", "model.video.num_heads=4",
        "model.text.vocab_size=200", "model.text.hidden_size=32", "model.text.num_layers=3",
        "model.text.fusion_layers=1", "model.text.num_heads=4", "model.text.intermediate_size=64",
        "model.text.max_position_embeddings=16", "model.proj_dim=16", "model.mask_token_id=4",
        "model.pad_token_id=0", "model.cls_token_id=1", "model.sep_token_id=2",
        "model.vtm_weight=1", "model.mlm_weight=1", "data.img_size=32", "data.num_frames=3"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _cfg(*overrides: str):
    return compose(TINY + list(overrides))


def _batch(B: int = 3, L: int = 10):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, 3, 3, 32, 32, generator=g)
    ids = torch.randint(5, 200, (B, L), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1:, L // 2:] = 0
    return video, ids, mask


def _step(model: nn.Module, batch, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same MLM masks and VTM negatives
    out = model(*batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol: float, rtol: float) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], atol=atol, rtol=rtol, msg=n)


class CountingBackend:
    """A torch.compile backend that records each graph dynamo hands it and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(len(gm.graph.nodes))
        return gm.forward


@pytest.mark.parametrize("ac", [("0", "full"), ("1", "full"), ("1", "attention"), ("2", "mlp")])
def test_blocks_compile_once_per_block_shape(ac) -> None:
    every_n, mode = ac
    cfg = _cfg("model.compile=blocks", f"model.grad_checkpointing={every_n}", f"model.grad_checkpointing_mode={mode}")
    model = build_model(cfg.model)
    backend = CountingBackend()
    info = apply_model_options(model, cfg.model, zero_stage=2, backend=backend)
    assert info["compiled_modules"] == len(get_blocks(model)) == 2 + 3 + 0  # no momentum towers here
    batch = _batch()
    _step(model, batch)
    # One graph per block class and input shape, not per block: the 2 TimeSformer blocks share
    # one, the 2 text layers one; the fusion layer sees 3B rows (VTM) then B rows (MLM): its
    # second shape compiles once more, with a dynamic batch dimension. Checkpointing every 2nd
    # block gives the checkpointed and the plain blocks a graph each.
    expected = 4 if every_n != "2" else 4 + 2
    assert len(backend.graphs) == expected, backend.graphs
    assert counters["stats"]["unique_graphs"] == expected
    _step(model, batch, seed=4)  # no recompilation on later steps
    assert len(backend.graphs) == expected and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_equals_eager_aot_autograd(mode: str) -> None:
    """Through AOTAutograd (the backward inductor compiles) without code generation: fast."""
    cfg = _cfg(f"model.compile={mode}", "model.grad_checkpointing=1", "model.grad_checkpointing_mode=attention")
    eager = build_model(cfg.model)
    compiled = build_model(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    eager.set_grad_checkpointing(1, "attention")
    apply_model_options(compiled, cfg.model, zero_stage=2, backend="aot_eager")
    _assert_same(_step(compiled, _batch()), _step(eager, _batch()), atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_compiled_blocks_equal_eager_inductor() -> None:
    """Inductor's generated C++ (gcc on CPU) for every block, with attention-only activation
    checkpointing: loss and gradients equal eager to fp32 tolerance (inductor reorders
    reductions), one graph per block shape. (The block shapes and settings are those of the
    engine run below, whose compilation then comes from inductor's on-disk cache.)"""
    cfg = _cfg("model.compile=blocks", "model.grad_checkpointing=1", "model.grad_checkpointing_mode=attention")
    eager = build_model(cfg.model)
    compiled = build_model(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    eager.set_grad_checkpointing(1, "attention")
    apply_model_options(compiled, cfg.model, zero_stage=2)
    batch = _batch(B=3, L=8)
    _assert_same(_step(compiled, batch), _step(eager, batch), atol=1e-5, rtol=1e-4)
    _assert_same(_step(compiled, batch, seed=4), _step(eager, batch, seed=4), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 4


def test_config_errors() -> None:
    model = build_model(_cfg().model)
    with pytest.raises(ConfigError, match="train.zero_stage=3"):
        apply_model_options(model, _cfg("model.compile=blocks").model, zero_stage=3)
    with pytest.raises(ConfigError, match="train.zero_stage=3"):
        apply_model_options(model, _cfg("model.compile=full", "model.grad_checkpointing=1").model, zero_stage=3)
    assert all(b._compiled_call_impl is None and b.checkpoint_mode is None for b in get_blocks(model))
    with pytest.raises(ConfigError, match="model.grad_checkpointing=1"):
        apply_model_options(model, _cfg("model.grad_checkpointing_mode=attention").model, zero_stage=2)
    with pytest.raises(ConfigError, match="model.grad_checkpointing=-1"):
        apply_model_options(model, _cfg("model.grad_checkpointing=-1").model, zero_stage=2)
    with pytest.raises(ConfigError, match="is not one of"):
        _cfg("model.compile=regional")
    # the fused divided block is one function: no selective checkpointing inside it
    fused_cfg = _cfg("model.kernel_impl=auto", "model.grad_checkpointing=1", "model.grad_checkpointing_mode=mlp")
    with pytest.raises(ConfigError, match="model.kernel_impl=auto"):
        apply_model_options(build_model(fused_cfg.model), fused_cfg.model, zero_stage=2)
    # a model without blocks or without checkpointing: said, not silently ignored
    with pytest.raises(ConfigError, match="no transformer blocks"):
        apply_model_options(nn.Linear(2, 2), _cfg("model.compile=blocks").model, zero_stage=2)
    with pytest.raises(ConfigError, match="no activation checkpointing"):
        apply_model_options(nn.Linear(2, 2), _cfg("model.grad_checkpointing=1").model, zero_stage=2)

    class WholeBlocksOnly(nn.Linear):
        def set_grad_checkpointing(self, every_n: int = 1) -> None: ...

    with pytest.raises(ConfigError, match="only checkpoints whole blocks"):
        apply_model_options(WholeBlocksOnly(2, 2), _cfg("model.grad_checkpointing=1",
                                                        "model.grad_checkpointing_mode=attention").model, zero_stage=2)


@pytest.mark.slow
def test_engine_run_with_compiled_blocks_gives_eager_losses(tmp_path) -> None:
    """Pretraining (VTC + VTM + MLM) through the Trainer, DeepSpeed ZeRO-2 and ZeRO-0, fp32,
    CPU, attention-only activation checkpointing: model.compile=blocks gives the per-step
    losses of the uncompiled run, compiling one graph per block shape (inductor)."""
    base = TINY + ["model.text.vocab_size=30522", "model.text.max_position_embeddings=32", "model.mask_token_id=103",
                   "model.pad_token_id=0", "model.cls_token_id=101", "model.sep_token_id=102",
                   "data.name=synthetic", "data.batch_size=3", "data.max_text_len=8", "data.num_workers=0",
                   "train.precision=fp32", "train.max_steps=3", "train.log_every=1", "train.tensorboard=false",
                   "optim.lr=1e-3", "optim.warmup_steps=0", "model.grad_checkpointing=1",
                   "model.grad_checkpointing_mode=attention", f"run.output_dir={tmp_path}"]
    runs = [base + ["run.name=eager", "train.zero_stage=2"],
            base + ["run.name=blocks2", "train.zero_stage=2", "model.compile=blocks"],
            base + ["run.name=blocks0", "train.zero_stage=0", "model.compile=blocks"]]
    # threads as in this process: inductor's CPU code (and its on-disk cache key) depends on them,
    # so the blocks compiled by test_compiled_blocks_equal_eager_inductor are reused here
    env = process_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                      MKL_NUM_THREADS=os.environ.get("MKL_NUM_THREADS"))
    p = run_job(python_module("tests.helpers.compile_driver", json.dumps(runs)), env=env, timeout=800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    eager, blocks2, blocks0 = result_records(p.stdout)
    assert eager["step"] == blocks2["step"] == blocks0["step"] == 3
    assert eager["graphs"] == 0 and eager["blocks"] == 0
    assert len(set(eager["losses"])) == 3  # the losses move: the comparison means something
    for run in (blocks2, blocks0):
        assert run["blocks"] == 5 and run["graphs"] == 4, run
        assert run["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-5)
