"""Pretraining step (VTC + VTM + MLM): megavid's TimeSformer + BERT against transformers' towers.

megavid bare, unfused, fused and compiled, and transformers' TimesformerModel + BertLayer
towers, measured side by side in one run.

The implementations run the same pretraining step (same heads, losses, hard-negative VTM and
MLM masking: megavid.models.videolm.VideoLM's, with only the towers swapped):

- ``transformers``: ``transformers.TimesformerModel`` + BERT built from transformers'
  ``BertEmbeddings``/``BertLayer`` (text layers, then fusion layers with cross-attention to
  the video tokens), autocast bf16 on CUDA (fp32 on CPU), plain ``torch.optim.AdamW``.
- ``bare``: megavid's model (``kernel_impl=torch``) in a plain loop, no DeepSpeed: pure bf16
  weights on CUDA (fp32 on CPU), torch's fused AdamW. ``torch`` vs ``bare`` is what the engine
  costs; ``bare`` vs ``transformers`` is what the towers cost.
- ``torch``: megavid's model, ``model.kernel_impl=torch`` (SDPA, torch LayerNorm/GELU),
  through megavid's engine (``apply_model_options`` then ``build_engine``: DeepSpeed ZeRO-2,
  pure bf16 weights on CUDA).
- ``triton``: the same with ``model.kernel_impl=triton`` (fused kernels). Without CUDA the
  kernels fall back to their torch references; the output says which backend really ran.
- ``compiled``: the engine with ``model.compile=blocks`` (torch.compile of each TimeSformer
  block and BERT layer, one graph per block shape), ``kernel_impl=torch``.
- ``compiled_fused``: ``model.compile=blocks`` with ``kernel_impl=triton`` (compiled blocks
  around the Triton kernels), to see which of the two is faster.
- ``compiled_full``: ``model.compile=full`` (not in the default ``--impls``).

Activation checkpointing rows (``--frames-ac``, default 32 and 96 frames; ``--ac-rows``
``impl:mode`` pairs, mode = ``model.grad_checkpointing_mode``: ``full`` or ``attention``)
checkpoint every block and report peak memory beside speed; transformers' towers only have
``full``.

``--profile K`` adds, per measurement, torch.profiler's top K ops by self device time (CPU
time without CUDA) over two more steps, to the printout and the markdown.

Every measurement runs in its own subprocess (a CUDA OOM or a DeepSpeed engine leaves no
state behind), with a batch list (``--batch 64,48,32``: the largest that fits wins) or an
automatic halving search from ``--max-batch`` on OOM. FLOPs are the model's analytic
``flops_per_sample`` (fwd+bwd; the same work for every row, recomputation not counted), MFU
uses the peak from ``megavid.engine.throughput``. The markdown result goes to
``bench/results/`` named by hardware, size and precision, with an acceptance summary (best
engine row's MFU and clips/s against transformers, engine rows against the bare loop).

    .venv/bin/python bench/model_step.py                      # CUDA: base 8x224^2, bf16; CPU: tiny, fp32
    .venv/bin/python bench/model_step.py --size tiny --steps 3 --warmup 1   # short CPU run
    .venv/bin/python bench/model_step.py --batch 96,64,48,32 --frames-ac 32,96 --ac-batch 16,8,4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
IMPL_LABELS = {
    "transformers": "transformers TimesformerModel + BertLayer towers, {amp}, torch AdamW",
    "bare": "megavid unfused (kernel_impl=torch), plain loop, {prec}, torch AdamW",
    "torch": "megavid unfused (kernel_impl=torch), DeepSpeed ZeRO-2 {prec}",
    "triton": "megavid fused (kernel_impl=triton), DeepSpeed ZeRO-2 {prec}",
    "compiled": "megavid compiled blocks (model.compile=blocks, kernel_impl=torch), DeepSpeed ZeRO-2 {prec}",
    "compiled_fused": "megavid compiled blocks + Triton kernels (compile=blocks, kernel_impl=triton), DeepSpeed ZeRO-2 {prec}",
    "compiled_full": "megavid compiled whole model (model.compile=full, kernel_impl=torch), DeepSpeed ZeRO-2 {prec}",
}
# megavid's engine rows: impl -> (model.kernel_impl, model.compile)
ENGINE_IMPLS = {
    "torch": ("torch", "none"),
    "triton": ("triton", "none"),
    "compiled": ("torch", "blocks"),
    "compiled_fused": ("triton", "blocks"),
    "compiled_full": ("torch", "full"),
}
DEFAULT_IMPLS = "transformers,bare,torch,triton,compiled,compiled_fused"
DEFAULT_AC_ROWS = "transformers:full,torch:full,torch:attention,compiled:full,compiled:attention"


# ------------------------------------------------------------------------------------------------
# transformers towers with the interface VideoLM calls (forward -> (tokens, pooled); forward_text;
# forward_fusion; embeddings.word_embeddings; vocab_size; set_grad_checkpointing)
# ------------------------------------------------------------------------------------------------
class HFVideoTower(nn.Module):
    """``transformers.TimesformerModel`` returning (all tokens, cls) like megavid's TimeSformer."""

    def __init__(self, v: Any) -> None:
        super().__init__()
        import transformers

        self.model = transformers.TimesformerModel(transformers.TimesformerConfig(
            image_size=v.img_size, patch_size=v.patch_size, num_frames=v.num_frames, hidden_size=v.embed_dim,
            num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
            intermediate_size=int(v.embed_dim * v.mlp_ratio), qkv_bias=v.qkv_bias,
            layer_norm_eps=v.layer_norm_eps, attention_type=v.attention_type,
        ))

    def forward(self, clip_BTCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(pixel_values=clip_BTCHW).last_hidden_state
        return tokens, tokens[:, 0]

    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        if mode != "full":
            raise ValueError("transformers' TimesformerModel only checkpoints whole layers")
        if every_n:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()


class HFTextTower(nn.Module):
    """BERT from transformers' own ``BertEmbeddings`` and ``BertLayer``: text layers, then fusion
    layers with cross-attention (ALPRO/BLIP style). Parameter names follow ``BertModel``
    (``embeddings.*``, ``encoder.layer.N.*``), so megavid's BERT loads them unchanged.

    transformers only builds cross-attention into decoder layers (``is_decoder=True``), whose
    self-attention is causal; the fusion layers here get their self-attention switched back to
    bidirectional (and always receive a padding mask, which makes SDPA non-causal as well).
    """

    def __init__(self, t: Any, attn: str = "sdpa") -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

        kw = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                  num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
                  max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        enc_cfg, fus_cfg = BertConfig(**kw), BertConfig(**kw, is_decoder=True, add_cross_attention=True)
        for c in (enc_cfg, fus_cfg):
            c._attn_implementation = attn
        n_text = t.num_layers - t.fusion_layers
        self.vocab_size, self.n_text = t.vocab_size, n_text
        self.embeddings = BertEmbeddings(enc_cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [BertLayer(enc_cfg, layer_idx=i) for i in range(n_text)]
            + [BertLayer(fus_cfg, layer_idx=i) for i in range(n_text, t.num_layers)])
        for layer in self.encoder.layer[n_text:]:
            layer.attention.self.is_causal = False
        self.every_n = 0

    def set_grad_checkpointing(self, every_n: int = 1, mode: str = "full") -> None:
        if mode != "full":
            raise ValueError("transformers' BertLayer stack here only checkpoints whole layers")
        self.every_n = every_n

    def _run(self, layers: range, h: torch.Tensor, mask_B11L: torch.Tensor, video: torch.Tensor | None) -> torch.Tensor:
        for i in layers:
            layer = self.encoder.layer[i]
            kw = {} if video is None else {"encoder_hidden_states": video}
            if self.every_n and i % self.every_n == 0 and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, mask_B11L, use_reentrant=False, **kw)
            else:
                h = layer(h, mask_B11L, **kw)
        return h

    @staticmethod
    def _mask(attention_mask: torch.Tensor) -> torch.Tensor:
        # boolean [B, 1, 1, L] (True = attend): valid for SDPA and eager under autocast alike
        return attention_mask[:, None, None, :].bool()

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=input_ids)
        return self._run(range(self.n_text), h, self._mask(attention_mask), None)

    def forward_fusion(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
                       video_tokens: torch.Tensor) -> torch.Tensor:
        return self._run(range(self.n_text, len(self.encoder.layer)), text_hidden, self._mask(attention_mask),
                         video_tokens)


def build_hf_videolm(model_cfg: Any) -> nn.Module:
    """megavid's VideoLM (heads, losses) with transformers' towers in place of ours.

    Args:
        model_cfg: the ``model`` config section.
    """
    from megavid.models.videolm import VideoLM

    model = VideoLM(model_cfg)
    model.video_encoder = HFVideoTower(model_cfg.video)
    model.text_encoder = HFTextTower(model_cfg.text, model_cfg.attn_impl if model_cfg.attn_impl == "sdpa" else "eager")
    return model


def load_hf_into_ours(hf: nn.Module, ours: nn.Module) -> None:
    """Copy the transformers towers' weights (and the shared heads) into megavid's model."""
    from megavid.models.bert import checkpoint_filter_fn as bert_filter
    from megavid.models.timesformer import checkpoint_filter_fn as tsf_filter

    ours.video_encoder.load_state_dict(tsf_filter(hf.video_encoder.model.state_dict(), ours.video_encoder))
    ours.text_encoder.load_state_dict(bert_filter(hf.text_encoder.state_dict()))
    heads = {k: v for k, v in hf.state_dict().items() if not k.startswith(("video_encoder.", "text_encoder."))}
    missing = ours.load_state_dict(heads, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys


# ------------------------------------------------------------------------------------------------
# worker: one (implementation, frames, checkpointing, batch) measurement in this process
# ------------------------------------------------------------------------------------------------
def build_cfg(a: dict, out_dir: str):
    from megavid.config import compose

    kernel_impl, compile_mode = ENGINE_IMPLS.get(a["impl"], ("torch", "none"))
    return compose([
        f"model=timesformer_{a['size']}", "model.vtc_weight=1", "model.vtm_weight=1", "model.mlm_weight=1",
        f"model.kernel_impl={kernel_impl}", f"model.compile={compile_mode}",
        f"model.video.num_frames={a['frames']}", f"model.grad_checkpointing={a['ac']}",
        f"model.grad_checkpointing_mode={a.get('ac_mode', 'full')}",
        f"data.batch_size={a['batch']}", f"data.max_text_len={a['text_len']}",
        "train.zero_stage=2", f"train.precision={a['precision']}",
        f"run.output_dir={out_dir}", "optim.warmup_steps=0",
    ])


def make_batch(a: dict, mc: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    B, L, v = a["batch"], a["text_len"], mc.video
    clip = torch.randn(B, a["frames"], 3, v.img_size, v.img_size, generator=g).to(device, dtype)
    ids = torch.randint(1000, mc.text.vocab_size, (B, L), generator=g)
    ids[:, 0] = mc.cls_token_id
    mask = torch.ones_like(ids)
    mask[B // 2:, L // 2:] = 0  # half the texts padded to half length
    return clip, ids.to(device), mask.to(device)


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple,
               amp: Any = contextlib.nullcontext()) -> Any:
    """One training step of ``model`` on ``batch`` with a plain torch optimizer (no engine)."""

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(*batch)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    return step


def worker(a: dict) -> dict:
    """Build, warm up and time one configuration; returns the measurement (or {"oom": True})."""
    from megavid.engine.deepspeed_setup import build_engine
    from megavid.engine.dist import init_distributed
    from megavid.engine.parallelize import apply_model_options
    from megavid.kernels import get_impl
    from megavid.models import build_model

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    device = torch.device(a["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    res: dict[str, Any] = {"args": a}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_cfg(a, tmp)
        mc = cfg.model
        try:
            if a["impl"] == "transformers":
                # analytic FLOPs from megavid's model: the same architecture, hence the same work
                res["flops_per_sample"] = build_model(mc).flops_per_sample(a["text_len"])
                model = build_hf_videolm(mc).to(device).train()
                model.set_grad_checkpointing(a["ac"])
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
                batch = make_batch(a, mc, device, torch.float32)
                step = plain_step(model, opt, batch,
                                  torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda))
                fwd_model = model
                res["backend"] = "transformers"
            elif a["impl"] == "bare":
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a["precision"], torch.float32)
                model = build_model(mc).to(device, dtype).train()
                apply_model_options(model, mc, zero_stage=0)  # activation checkpointing, if asked
                res["flops_per_sample"] = model.flops_per_sample(a["text_len"])
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
                batch = make_batch(a, mc, device, dtype)
                step = plain_step(model, opt, batch)
                fwd_model = model
                res["backend"] = "torch, no engine"
            else:
                init_distributed(device_type=device.type)
                model = build_model(mc)  # applies kernel_impl
                res["flops_per_sample"] = model.flops_per_sample(a["text_len"])
                # what the Trainer does before DeepSpeed: activation checkpointing, torch.compile
                apply_model_options(model, mc, zero_stage=cfg.train.zero_stage)
                engine, _, _, _ = build_engine(model, cfg, world_size=1, total_steps=a["warmup"] + a["steps"] + 2,
                                               device_type=device.type)
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a["precision"], torch.float32)
                batch = make_batch(a, mc, device, dtype)
                impl = get_impl(mc.kernel_impl)
                probe = torch.empty(1, device=device)
                res["backend"] = ",".join(f"{op}={impl.backend(probe, op)}"
                                          for op in ("layer_norm", "bias_gelu", "short_attention"))
                if mc.compile != "none":
                    res["backend"] += f",compile={mc.compile}"

                def step() -> float:
                    out = engine(*batch)
                    engine.backward(out["loss"])
                    engine.step()
                    return out["loss"].detach()

                fwd_model = engine
            t0 = time.perf_counter()
            for i in range(a["warmup"]):
                step()
                if i == 0:
                    if cuda:
                        torch.cuda.synchronize()
                    res["first_step_s"] = time.perf_counter() - t0  # includes torch.compile
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for _ in range(a["steps"]):
                t0 = time.perf_counter()
                losses.append(step())
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            res["losses"] = [float(x) for x in losses]
            res["times"] = times
            if a.get("profile"):
                res["profile"] = profile_steps(step, cuda, a["profile"])
            if a["impl"] in ENGINE_IMPLS and mc.compile != "none":
                from torch._dynamo.utils import counters

                res["graphs"] = counters["stats"]["unique_graphs"]
            if cuda:
                res["peak_bytes"] = torch.cuda.max_memory_allocated()
            else:
                # CPU: peak RSS of this process, and the bytes autograd saves for backward
                # (what activation checkpointing trades for recompute). Parameters are left out:
                # a compiled block saves its weights for its backward, an eager one reads them
                # from the module, and either way they take no extra memory.
                res["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                saved = 0
                params = {p.data_ptr() for p in fwd_model.parameters()}

                def pack(x: torch.Tensor) -> torch.Tensor:
                    nonlocal saved
                    if x.data_ptr() not in params:
                        saved += x.numel() * x.element_size()
                    return x

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    out = fwd_model(*batch)
                res["saved_bytes"] = saved
                del out
        except torch.cuda.OutOfMemoryError:
            return {"args": a, "oom": True}
    return res


def profile_steps(step: Any, cuda: bool, rows: int) -> str:
    """torch.profiler's top ``rows`` ops by self device time (CPU time without CUDA) over two
    steps, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def check_equivalence(size: str, text_len: int) -> float:
    """fp32 loss of transformers' towers and megavid's with the same weights, batch and seed:
    the two sides must compute the same step before their speed is compared. Returns |diff|."""
    from megavid.config import compose
    from megavid.models import build_model

    a = {"size": size, "impl": "torch", "frames": compose([f"model=timesformer_{size}"]).model.video.num_frames,
         "ac": 0, "batch": 4, "text_len": text_len, "precision": "fp32"}
    mc = build_cfg(a, tempfile.gettempdir()).model
    torch.manual_seed(0)
    hf, ours = build_hf_videolm(mc).eval(), build_model(mc).eval()
    load_hf_into_ours(hf, ours)
    batch = make_batch(a, mc, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        vh, vo = hf.encode_video(batch[0])[0], ours.encode_video(batch[0])[0]
        th, to = hf.encode_text(*batch[1:])[0], ours.encode_text(*batch[1:])[0]
        fh, fo = hf.fuse(th, batch[2], vh), ours.fuse(to, batch[2], vo)
        torch.manual_seed(1)  # same MLM masking and hard-negative draws on both sides
        lh = hf(*batch)
        torch.manual_seed(1)
        lo = ours(*batch)
    print(f"equivalence (fp32, CPU, same weights, B=4): max |diff| video tokens {(vh - vo).abs().max():.1e}, "
          f"text {(th - to).abs().max():.1e}, fusion {(fh - fo).abs().max():.1e}; loss transformers "
          f"{float(lh['loss']):.6f} megavid {float(lo['loss']):.6f}")
    return max(float((vh - vo).abs().max()), float((fh - fo).abs().max()), abs(float(lh["loss"]) - float(lo["loss"])))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def run_worker(a: dict, timeout: float) -> dict:
    """Run one measurement in a fresh subprocess; an OOM (or a crash) returns {"oom"/"error"}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(a)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"args": a, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    oom = any("out of memory" in ln.lower() for ln in tail)
    return {"args": a, "oom": True} if oom else {"args": a, "error": "\n".join(tail)}


def search_batch(base: dict, batches: list[int] | None, max_batch: int, timeout: float) -> dict:
    """The largest batch of ``batches`` (descending) that fits, or halving from ``max_batch``."""
    candidates = sorted(batches, reverse=True) if batches else []
    if not candidates:
        b = max_batch
        while b >= 1:
            candidates.append(b)
            b //= 2
    last: dict = {"args": base, "error": "no batch tried"}
    for b in candidates:
        a = {**base, "batch": b}
        print(f"  {a['impl']:>14} frames={a['frames']} ac={ac_text(a)} B={b} ...", end=" ", flush=True)
        r = run_worker(a, timeout)
        if "times" in r:
            print(f"{statistics.median(r['times']) * 1e3:.1f} ms/step", flush=True)
            return r
        print("OOM" if r.get("oom") else "failed", flush=True)
        last = r
        if not r.get("oom"):
            break  # a real error does not get better with a smaller batch
    return last


def ac_text(a: dict) -> str:
    """The AC column: off, or the checkpointing mode of every block."""
    return a.get("ac_mode", "full") if a["ac"] else "off"


def measure(r: dict, peak_tflops: float | None) -> dict | None:
    """ms/step, clips/s, TFLOP/s and MFU (None without a peak) of a measurement; None if it failed."""
    if "times" not in r:
        return None
    med = statistics.median(r["times"])
    clips = r["args"]["batch"] / med
    tflops = r["flops_per_sample"] * clips / 1e12
    return {"ms": med * 1e3, "clips": clips, "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


def fmt_row(label: str, r: dict, peak_tflops: float | None, ref_clips: float | None, cuda: bool) -> tuple[str, float | None]:
    a = r["args"]
    m = measure(r, peak_tflops)
    if m is None:
        why = "OOM at every batch" if r.get("oom") else "error: " + r.get("error", "?").splitlines()[-1][:120]
        return f"| {label} | {a['frames']} | {ac_text(a)} | - | - | - | - | - | {why} | - |", None
    mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a (CPU)"
    mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" + ("" if cuda else f" RSS; {r['saved_bytes'] / 2**20:.1f} MiB saved acts")
    ratio = f"{m['clips'] / ref_clips:.2f}x" if ref_clips else "-"
    return (f"| {label} | {a['frames']} | {ac_text(a)} | {a['batch']} | {m['ms']:.1f} | "
            f"{m['clips']:.2f} | {m['tflops']:.3f} | {mfu} | {mem} | {ratio} |"), m["clips"]


def acceptance_lines(results: list[tuple[str, dict]], peak: float | None) -> list[str]:
    """The issue's acceptance, read off the rows without activation checkpointing: the best
    engine row's MFU (target >= 35%) and clips/s against transformers (>= 1.25x), and each engine
    row against the bare loop (within 5%)."""
    m = {impl: measure(r, peak) for impl, r in results}
    engine = {impl: v for impl, v in m.items() if impl in ENGINE_IMPLS and v is not None}
    lines = ["", "## Acceptance summary (rows without activation checkpointing)", ""]
    if not engine:
        return lines + ["no engine row ran"]
    best = max(engine, key=lambda i: engine[i]["clips"])
    b = engine[best]
    mfu = f"{100 * b['mfu']:.1f}% MFU (target >= 35%)" if b["mfu"] is not None else "MFU n/a (no peak for this device)"
    lines.append(f"- best engine row: `{best}`, {b['clips']:.2f} clips/s, {mfu}")
    if m.get("transformers"):
        lines.append(f"- best engine row vs transformers: {b['clips'] / m['transformers']['clips']:.2f}x clips/s "
                     "(target >= 1.25x)")
    if m.get("bare"):
        lines.append("- engine rows vs the bare loop (target: within 5%): " + ", ".join(
            f"`{i}` {100 * (v['clips'] / m['bare']['clips'] - 1):+.1f}%" for i, v in engine.items()))
    return lines


def parse_ac_rows(spec: str) -> list[tuple[str, str]]:
    """``impl:mode`` pairs of ``--ac-rows`` (mode: full or attention; transformers: full only)."""
    rows = []
    for item in [x for x in spec.split(",") if x]:
        impl, _, mode = item.partition(":")
        mode = mode or "full"
        if impl not in IMPL_LABELS or mode not in ("full", "attention", "mlp"):
            raise SystemExit(f"--ac-rows: {item!r} is not impl:mode with impl in {', '.join(IMPL_LABELS)} and mode "
                             "full, attention or mlp")
        if impl == "transformers" and mode != "full":
            raise SystemExit("--ac-rows: transformers' towers only checkpoint whole layers (transformers:full)")
        rows.append((impl, mode))
    return rows


def hardware_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> str:
    """torch, CUDA, Triton and DeepSpeed versions, for the result's header."""
    out = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda or 'none'}"]
    for mod in ("triton", "deepspeed", "transformers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - optional, report what is there
            pass
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda_ok = torch.cuda.is_available()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda" if cuda_ok else "cpu")
    ap.add_argument("--size", choices=["tiny", "base"], default=None, help="default: base on CUDA, tiny on CPU")
    ap.add_argument("--batch", default="", help="comma list of batches to try, largest first (default: halving)")
    ap.add_argument("--max-batch", type=int, default=None, help="start of the halving search (default 128 / 8 on CPU)")
    ap.add_argument("--frames-ac", default="32,96", help="extra frame counts, run with activation checkpointing")
    ap.add_argument("--ac-batch", default="", help="batch list for the --frames-ac rows (default: halving)")
    ap.add_argument("--ac-rows", default=DEFAULT_AC_ROWS,
                    help="impl:mode pairs run at each --frames-ac count (mode = model.grad_checkpointing_mode)")
    ap.add_argument("--impls", default=DEFAULT_IMPLS, help=f"rows without checkpointing; any of {', '.join(IMPL_LABELS)}")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA / 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA / 1 CPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement subprocess")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="add torch.profiler's top K ops of each measurement (0: off)")
    ap.add_argument("--note", default="", help="a line written under the title of the markdown (e.g. 'smoke run')")
    ap.add_argument("--out", default=None, help="markdown result (default bench/results/model_step_<hw>_<size>_<prec>.md)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("base" if cuda else "tiny")
    precision = "bf16" if cuda else "fp32"
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    max_batch = args.max_batch or (128 if cuda else 8)
    batches = [int(b) for b in args.batch.split(",") if b]
    ac_batches = [int(b) for b in args.ac_batch.split(",") if b]
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPL_LABELS]
    if unknown:
        raise SystemExit(f"--impls: unknown {', '.join(unknown)}; valid: {', '.join(IMPL_LABELS)}")
    ac_rows = parse_ac_rows(args.ac_rows)
    from megavid.config import compose
    from megavid.engine.throughput import get_peak_tflops

    base_frames = compose([f"model=timesformer_{size}"]).model.video.num_frames
    peak = get_peak_tflops(torch.cuda.get_device_name(device), precision) if cuda else None
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    t_start = time.time()

    # the tiny config on CPU: checks the code paths agree, at no cost to the GPU run
    diff = check_equivalence("tiny", args.text_len)
    common = {"size": size, "text_len": args.text_len, "precision": precision, "device": args.device,
              "steps": steps, "warmup": warmup, "threads": args.threads, "profile": args.profile}
    print(f"model_step: {size}, {hw}, {precision}; measuring (one subprocess per try):")
    results: list[tuple[str, dict]] = []
    for impl in impls:
        r = search_batch({**common, "impl": impl, "frames": base_frames, "ac": 0}, batches, max_batch, args.timeout)
        results.append((impl, r))
    ac_results: list[tuple[str, dict]] = []
    for frames in [int(f) for f in args.frames_ac.split(",") if f]:
        fmax = max(1, max_batch * base_frames // frames)
        for impl, mode in ac_rows:
            r = search_batch({**common, "impl": impl, "frames": frames, "ac": 1, "ac_mode": mode}, ac_batches, fmax,
                             args.timeout)
            ac_results.append((impl, r))

    prec_txt = "bf16 weights" if cuda else "fp32"
    amp_txt = "autocast bf16" if cuda else "fp32"
    lines = [f"# model_step: TimeSformer-{size} + BERT-{size} pretraining step (VTC + VTM + MLM)", ""]
    if args.note:
        lines += [f"**{args.note}**", ""]
    lines += [f"- hardware: {hw}; {versions()}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- command: `{' '.join([Path(sys.executable).name, 'bench/model_step.py'] + sys.argv[1:])}`",
              f"- {base_frames} frames (and {args.frames_ac or 'no others'} with activation checkpointing of every block), "
              f"text length {args.text_len}, precision {precision}, ZeRO-2 through megavid's apply_model_options + "
              f"build_engine for the engine rows; {warmup} warm-up + {steps} timed steps, median step time",
              f"- FLOPs: megavid's analytic flops_per_sample (fwd+bwd, recomputation not counted) x clips/s; "
              f"MFU peak: {f'{peak:.0f} TFLOP/s ({precision})' if peak else 'none (CPU has no table entry)'}"]
    if diff is not None:
        lines.append(f"- same-weights fp32 check on CPU (tiny config, B=4; transformers towers vs megavid): max |diff| of video tokens, "
                     f"fusion output and loss = {diff:.1e}")
    backends = {r["args"]["impl"]: r.get("backend") for _, r in results + ac_results if "backend" in r}
    if "triton" in backends:
        fb = "" if "triton" in (backends["triton"] or "") else " (Triton needs CUDA: the fused path fell back to its torch references)"
        lines.append(f"- fused path backends actually run: {backends['triton']}{fb}")
    compiled = [(impl, r) for impl, r in results + ac_results if "graphs" in r]
    if compiled:
        lines.append("- compiled rows, first step (includes torch.compile) and graphs compiled: " + "; ".join(
            f"{impl} {r['args']['frames']} frames AC {ac_text(r['args'])}: {r.get('first_step_s', float('nan')):.1f} s, "
            f"{r['graphs']} graphs" for impl, r in compiled))
    header = ["| implementation | frames | AC | batch | step ms | clips/s | TFLOP/s | MFU | peak memory | vs transformers |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for title, rows in (("Largest batch that fits, no activation checkpointing", results),
                        ("More frames, activation checkpointing of every block: full vs attention-only", ac_results)):
        if not rows:
            continue
        lines += ["", f"## {title}", ""] + header
        ref: dict[int, float | None] = {}
        for impl, r in rows:
            label = IMPL_LABELS.get(impl, impl).format(amp=amp_txt, prec=prec_txt)
            row, clips = fmt_row(label, r, peak, ref.get(r["args"]["frames"]), cuda)
            if impl == "transformers":
                ref[r["args"]["frames"]] = clips
            lines.append(row)
    if results:
        lines += acceptance_lines(results, peak)
    profiles = [(impl, r) for impl, r in results + ac_results if r.get("profile")]
    if profiles:
        lines += ["", f"## Top {args.profile} ops by self {'device' if cuda else 'CPU'} time (2 steps)"]
        for impl, r in profiles:
            a = r["args"]
            lines += ["", f"### {impl}, {a['frames']} frames, AC {ac_text(a)}, batch {a['batch']}",
                      "", "```", r["profile"].rstrip(), "```"]
    lines += ["", f"wall time of the benchmark: {time.time() - t_start:.0f} s"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"model_step_{hardware_slug(device)}_{size}_{precision}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
