"""Forward+backward step of megavid's TimeSformer + BERT against transformers' TimesformerModel
+ BertModel of the same config, same weights and same batch, measured in one run.

Both sides run a contrastive step (video cls and text cls through one projection each,
symmetric InfoNCE), at the same precision: fp32 on CPU, autocast bf16 on CUDA. Timings
alternate between the two sides so that machine load hits both alike; the median is reported.
Memory: peak CUDA memory on GPU; on CPU the bytes of activations saved for backward (what
activation checkpointing trades for recompute), each with checkpointing off and on.

    .venv/bin/python bench/model_step.py                 # tiny (configs/model/timesformer_tiny.yaml), CPU
    .venv/bin/python bench/model_step.py --size base --batch 32   # TimeSformer-B 8x224^2 + BERT-B, GPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from megavid.config import compose
from megavid.models.bert import BertTextFusion, build_bert
from megavid.models.bert import checkpoint_filter_fn as bert_filter
from megavid.models.losses import vtc_loss
from megavid.models.timesformer import build_timesformer
from megavid.models.timesformer import checkpoint_filter_fn as tsf_filter


class Pair(nn.Module):
    """Video tower + text tower + projections + InfoNCE: the VTC step, for either implementation."""

    def __init__(self, video: nn.Module, text: nn.Module, dv: int, dt: int, proj: int, ours: bool) -> None:
        super().__init__()
        self.video, self.text, self.ours = video, text, ours
        self.vproj, self.tproj = nn.Linear(dv, proj), nn.Linear(dt, proj)

    def forward(self, clip: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.ours:
            v_cls = self.video(clip)[1]
            t_cls = self.text.forward_text(ids, mask)[:, 0]
        else:
            v_cls = self.video(pixel_values=clip).last_hidden_state[:, 0]
            t_cls = self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        v = F.normalize(self.vproj(v_cls).float(), dim=-1)
        t = F.normalize(self.tproj(t_cls).float(), dim=-1)
        return vtc_loss(v, t, torch.tensor(0.07, device=v.device))[0]


def build_pair(size: str, device: torch.device) -> tuple[Pair, Pair, object]:
    mc = compose([f"model=timesformer_{size}", "model.text.fusion_layers=0"]).model
    v, t = mc.video, mc.text
    hf_video = transformers.TimesformerModel(transformers.TimesformerConfig(
        image_size=v.img_size, patch_size=v.patch_size, num_frames=v.num_frames, hidden_size=v.embed_dim,
        num_hidden_layers=v.depth, num_attention_heads=v.num_heads, intermediate_size=int(v.embed_dim * v.mlp_ratio),
        qkv_bias=v.qkv_bias, layer_norm_eps=v.layer_norm_eps, attention_type=v.attention_type,
    ))
    hf_text = transformers.BertModel(transformers.BertConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ), add_pooling_layer=False)
    our_video = build_timesformer(v, mc.attn_impl)
    our_text: BertTextFusion = build_bert(t, v.embed_dim, mc.attn_impl)
    our_video.load_state_dict(tsf_filter(hf_video.state_dict(), our_video))
    our_text.load_state_dict(bert_filter(hf_text.state_dict()))
    theirs = Pair(hf_video, hf_text, v.embed_dim, t.hidden_size, mc.proj_dim, ours=False)
    ours = Pair(our_video, our_text, v.embed_dim, t.hidden_size, mc.proj_dim, ours=True)
    ours.vproj.load_state_dict(theirs.vproj.state_dict())
    ours.tproj.load_state_dict(theirs.tproj.state_dict())
    return ours.to(device).train(), theirs.to(device).train(), mc


def set_checkpointing(pair: Pair, on: bool) -> None:
    if pair.ours:
        pair.video.set_grad_checkpointing(1 if on else 0)
        pair.text.set_grad_checkpointing(1 if on else 0)
    elif on:
        kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        pair.video.gradient_checkpointing_enable(**kw)
        pair.text.gradient_checkpointing_enable(**kw)
    else:
        pair.video.gradient_checkpointing_disable()
        pair.text.gradient_checkpointing_disable()


def make_step(pair: Pair, batch: tuple, device: torch.device) -> Callable[[], float]:
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        pair.zero_grad(set_to_none=True)
        with amp:
            loss = pair(*batch)
        loss.backward()
        return loss.item()

    return step


def timed(step: Callable[[], float], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def activation_memory(pair: Pair, batch: tuple, device: torch.device) -> int:
    """Peak CUDA bytes of a step (GPU) or bytes saved for backward (CPU)."""
    step = make_step(pair, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        step()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, theirs, mc = build_pair(args.size, device)
    v = mc.video
    clip = torch.randn(args.batch, v.num_frames, 3, v.img_size, v.img_size, device=device)
    ids = torch.randint(1000, mc.text.vocab_size, (args.batch, args.text_len), device=device)
    mask = torch.ones_like(ids)
    mask[args.batch // 2:, args.text_len // 2:] = 0  # half the texts padded to half length
    batch = (clip, ids, mask)

    # Same weights and batch: the two sides must agree before their speed is compared.
    with torch.no_grad():
        lo, lt = ours(*batch), theirs(*batch)
    print(f"loss ours {float(lo):.6f} transformers {float(lt):.6f} (fp32 forward, same weights)")

    s_ours, s_theirs = make_step(ours, batch, device), make_step(theirs, batch, device)
    for _ in range(args.warmup):
        s_ours(), s_theirs()
    t_ours, t_theirs = [], []
    for _ in range(args.steps):  # alternate so that load changes hit both sides alike
        t_ours.append(timed(s_ours, device))
        t_theirs.append(timed(s_theirs, device))
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    # Other processes only ever add time: on a shared machine the minimum is the steadier number.
    bo, bt = min(t_ours), min(t_theirs)
    flops = None
    try:
        from megavid.models.flops import bert_forward_flops, timesformer_forward_flops

        f_v, stem = timesformer_forward_flops(ours.video)
        f_t = bert_forward_flops(ours.text, args.text_len)
        flops = args.batch * (3 * (f_v + f_t) - stem)
    except Exception:  # noqa: BLE001 - FLOPs are informational here
        pass

    prec = "autocast bf16" if device.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n## model_step: {args.size}, batch {args.batch}, {v.num_frames}x{v.img_size}^2, text {args.text_len}, "
          f"{prec}, {name}\n")
    print("| implementation | step ms (median) | step ms (min) | clips/s (median) | TFLOP/s (median) |")
    print("|---|---|---|---|---|")
    for label, m, b in (("transformers TimesformerModel + BertModel", mt, bt), ("megavid TimeSformer + BERT", mo, bo)):
        tf = f"{flops / m / 1e12:.3f}" if flops else "-"
        print(f"| {label} | {m * 1e3:.1f} | {b * 1e3:.1f} | {args.batch / m:.1f} | {tf} |")
    print(f"\nspeed ratio (transformers time / megavid time): {mt / mo:.2f}x median, {bt / bo:.2f}x min")

    what = "peak CUDA memory" if device.type == "cuda" else "activations saved for backward"
    print(f"\n| {what} | checkpointing off | checkpointing on (every block, non-reentrant) |")
    print("|---|---|---|")
    for label, pair in (("transformers", theirs), ("megavid", ours)):
        row = []
        for on in (False, True):
            set_checkpointing(pair, on)
            row.append(activation_memory(pair, batch, device) / 2**20)
        set_checkpointing(pair, False)
        print(f"| {label} | {row[0]:.1f} MiB | {row[1]:.1f} MiB ({row[1] / row[0]:.2f}x) |")


if __name__ == "__main__":
    main()
