"""Benchmark megavid.kernels against torch, at TimeSformer-B shapes.

For each op it times (forward, and forward+backward) the plain reference (``*_ref``), torch's
own fused path (``F.layer_norm``, ``F.gelu``, SDPA: what the model uses without our kernels),
the Triton kernel, and apex's FusedLayerNorm when apex is importable, and prints the speed-up
of each over torch's fused path measured in the same run (> 1 means faster than torch). It
also prints the largest difference of each output from the reference. A last case runs a whole
divided space-time block: ``megavid.models.timesformer.Block`` (the unfused model path, the
base of that row's ratios) against :func:`megavid.kernels.divided_block_forward` on the same
parameters.

    python bench/fused_kernels.py                      # H100: bf16, B*T = 512 frames, T = 8, 32, 96
    python bench/fused_kernels.py --frames 8 --save    # also write bench/results/kernels_<gpu>_....md

Without a GPU, Triton cannot run compiled (its interpreter is a debugging tool, thousands of
times slower): the script says so and times the torch paths alone at small shapes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from megavid import kernels as K  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn: Callable[..., object], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A closure running ``fn(*inputs)`` forward and backward (grads w.r.t. float inputs)."""
    diff = [t for t in inputs if t.is_floating_point() and t.requires_grad]

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs)
        torch.autograd.grad(loss, diff)

    return run


def _clone_leaves(inputs: list) -> list:
    return [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
            for t in inputs]  # fmt: skip


def bench_op(name: str, shape: str, impls: dict[str, Callable], inputs: list, device,
             reps: int, rows: list[dict], base: str = "torch") -> None:  # fmt: skip
    """Time every implementation of one op; append result rows (ratios vs ``base``)."""
    ref_out = None
    results = {}
    for impl, fn in impls.items():
        args = _clone_leaves(inputs)
        with torch.no_grad():
            out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        if impl == "reference":
            ref_out = out.float()
        err = float((out.float() - ref_out).abs().max()) if ref_out is not None else 0.0
        fwd = time_ms(lambda: fn(*args), device, reps)
        both = time_ms(fwd_bwd(fn, args), device, reps)
        results[impl] = (fwd, both, err)
        del out
    base = results.get(base)
    for impl, (fwd, both, err) in results.items():
        rows.append(dict(op=name, shape=shape, impl=impl, fwd=fwd, both=both, err=err,
                         r_fwd=base[0] / fwd if base else float("nan"),
                         r_both=base[1] / both if base else float("nan")))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Cases (TimeSformer-B: D=768, 12 heads, 196 patches per frame, MLP 3072)
# --------------------------------------------------------------------------------------------
def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    triton_ok = K.HAS_TRITON and device.type == "cuda"
    if device.type == "cpu":
        print("# no CUDA GPU: Triton kernels need one (the interpreter is for tests only); "
              "timing the torch paths at small shapes")  # fmt: skip
        dtype = torch.float32
    d, heads, patches, mlp = args.dim, args.heads, args.patches, 4 * args.dim
    rows: list[dict] = []
    for t in args.frames:
        b = args.batch or max(1, args.frames_per_batch // t)
        tokens = 1 + patches * t
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, scale=1.0, grad=True):
            x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale
            return x.to(dtype).requires_grad_(grad)

        def impls(ref, torch_fn, triton_fn, apex_fn=None):
            out = {"reference": ref, "torch": torch_fn}
            if triton_ok:
                out["triton"] = triton_fn
            if apex_fn is not None and device.type == "cuda" and K.has_apex():
                out["apex"] = apex_fn
            return out

        # Residual add + LayerNorm over the token tensor.
        x, r = rnd(b, tokens, d), rnd(b, tokens, d)
        w, bias = rnd(d, scale=0.1), rnd(d, scale=0.1)
        bench_op(
            "add+layer_norm", f"B={b} T={t} [{b * tokens}, {d}]",
            impls(lambda x, r, w, bb: K.layer_norm_ref(x, w, bb, 1e-6, r),
                  lambda x, r, w, bb: K.layer_norm(x, w, bb, 1e-6, r, impl="torch"),
                  lambda x, r, w, bb: K.layer_norm(x, w, bb, 1e-6, r, impl="triton"),
                  lambda x, r, w, bb: K.layer_norm(x, w, bb, 1e-6, r, impl="apex")),
            [x, r, w, bias], device, args.reps, rows,
        )  # fmt: skip
        del x, r
        # Bias + GELU on the MLP hidden layer.
        h, bh = rnd(b, tokens, mlp), rnd(mlp, scale=0.1)
        bench_op(
            "bias+gelu", f"B={b} T={t} [{b * tokens}, {mlp}]",
            impls(K.bias_gelu_ref,
                  lambda h, bb: K.bias_gelu(h, bb, impl="torch"),
                  lambda h, bb: K.bias_gelu(h, bb, impl="triton")),
            [h, bh], device, args.reps, rows,
        )  # fmt: skip
        del h
        # Temporal attention from the packed qkv projection (the layout helper): torch views +
        # SDPA + head merge vs the Triton kernel reading the views in place.
        qkv = rnd(b, tokens, 3 * d)
        bench_op(
            "temporal attention", f"B={b} N={patches} T={t} H={heads}",
            impls(lambda q: K.divided_temporal_attention_ref(q, t, heads),
                  lambda q: K.divided_temporal_attention(q, t, heads, impl="torch"),
                  lambda q: K.divided_temporal_attention(q, t, heads, impl="triton")),
            [qkv], device, args.reps, rows,
        )  # fmt: skip
        # The same attention on contiguous [B*N, H, T, Dh] q/k/v: the kernel alone vs SDPA.
        dh = d // heads
        q, k, v = (rnd(b * patches, heads, t, dh) for _ in range(3))
        bench_op(
            "short_attention", f"[{b * patches}, {heads}, {t}, {dh}]",
            impls(K.short_attention_ref,
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                  lambda q, k, v: K.short_attention(q, k, v, impl="triton")),
            [q, k, v], device, args.reps, rows,
        )  # fmt: skip
        del q, k, v
        # Spatial attention with the cls token: repeat+cat+permute+SDPA vs index-math kernel.
        if t <= args.max_spatial_frames:
            bench_op(
                "spatial attention", f"B={b} N={patches}+cls T={t} H={heads}",
                impls(lambda q: K.divided_spatial_attention_ref(q, t, heads),
                      lambda q: K.divided_spatial_attention(q, t, heads, impl="torch"),
                      lambda q: K.divided_spatial_attention(q, t, heads, impl="triton")),
                [qkv], device, args.reps, rows,
            )  # fmt: skip
        del qkv
        # A whole divided block: megavid's own Block (the unfused model path) vs the same
        # parameters through divided_block_forward (torch ops, then Triton kernels).
        block = _block_case(d, heads, device, dtype)
        if block is not None:
            blk, fused = block
            x = rnd(b, tokens, d)
            impls_b = {"reference": lambda x: blk(x, t),
                       "torch": lambda x: fused(x, t, "torch")}  # fmt: skip
            if triton_ok:
                impls_b["triton"] = lambda x: fused(x, t, "triton")
            bench_op("divided block (vs models.Block)", f"B={b} N={patches} T={t} D={d}",
                     impls_b, [x], device, args.reps, rows, base="reference")  # fmt: skip
            del x, blk
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _block_case(d: int, heads: int, device, dtype):
    """megavid's TimeSformer Block and a fused forward over its modules (None if unavailable)."""
    try:
        from megavid.models.timesformer import Block
    except Exception:  # noqa: BLE001 - the models package is optional for this script
        return None
    blk = Block(d, heads, attention_type="divided_space_time").to(device, dtype)

    def fused(x, t, impl):
        return K.divided_block_forward(
            x, t, heads, temporal_norm=blk.temporal_norm1, temporal_qkv=blk.temporal_attn.qkv,
            temporal_proj=blk.temporal_attn.proj, temporal_fc=blk.temporal_fc, norm1=blk.norm1,
            qkv=blk.attn.qkv, proj=blk.attn.proj, norm2=blk.norm2, fc1=blk.mlp.fc1,
            fc2=blk.mlp.fc2, drop_path=blk.drop_path, impl=impl,
        )  # fmt: skip

    return blk, fused


def format_table(rows: list[dict]) -> str:
    lines = [
        "| op | shape | impl | fwd ms | fwd+bwd ms | fwd speed-up vs torch | fwd+bwd speed-up | max abs err vs ref |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['fwd']:.3f} | {r['both']:.3f} | "
            f"{r['r_fwd']:.2f}x | {r['r_both']:.2f}x | {r['err']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="frame counts (default: 8 32 96 on GPU, 8 on CPU)")  # fmt: skip
    p.add_argument("--batch", type=int, default=0, help="clips per batch (0: frames_per_batch/T)")
    p.add_argument("--frames-per-batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--patches", type=int, default=196)
    p.add_argument("--max-spatial-frames", type=int, default=96)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--save", action="store_true", help="write bench/results/kernels_<hw>_<cfg>.md")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.frames is None:
        args.frames = [8, 32, 96] if cuda else [8]
    if not cuda:  # small shapes: the CPU run shows the script works, not GPU speed
        args.frames_per_batch = min(args.frames_per_batch, 16)
        args.patches = min(args.patches, 49)
        args.reps = min(args.reps, 3)
    hw = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}"
    header = (f"# megavid.kernels on {hw}; torch {torch.__version__}; dtype "
              f"{args.dtype if cuda else 'fp32'}; triton={'yes' if K.HAS_TRITON and cuda else 'no'}"
              f"; apex={'yes' if K.has_apex() else 'no'}")  # fmt: skip
    print(header, flush=True)
    table = format_table(run(args))
    print(table)
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        tag = "".join(c if c.isalnum() else "-" for c in hw).strip("-")
        name = f"kernels_{tag}_{args.dtype}_T{'-'.join(map(str, args.frames))}.md"
        (out / name).write_text(header + "\n\n" + table + "\n")
        print(f"saved {out / name}")


if __name__ == "__main__":
    main()
