"""Compile every kernel for a CUDA architecture without a GPU (Triton AOT + the bundled ptxas).

Triton's interpreter (what the CPU tests run) checks the maths but not what only the compiler
sees: types of loop-carried values, layouts, register pressure. :func:`compile_all` builds each
kernel at the launch configurations the runtime picks (TimeSformer-B shapes) for e.g. sm_90
(H100), then runs ``ptxas -v`` on the PTX, returning registers and spill bytes per kernel.

    python -m megavid.kernels.aot            # sm_90, bf16
    python -m megavid.kernels.aot 80 fp16    # sm_80 (A100), fp16
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import _triton as KT
from . import _triton_attention as KA
from . import _triton_spatial as KS


@dataclass(frozen=True)
class CompileReport:
    """ptxas resource usage of one compiled kernel configuration."""

    name: str
    registers: int
    spill_bytes: int
    num_warps: int


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(
    fn, name: str, ptrs: dict[str, str], constexprs: dict, num_warps: int, arch: int = 90,
    floats: tuple[str, ...] = (),
) -> CompileReport:  # fmt: skip
    """Compile ``fn`` for ``sm_<arch>`` and report ptxas' register/spill counts.

    Args:
        fn: the kernel's Python function (``megavid.kernels._triton._*_kernel``).
        name: label of this configuration.
        ptrs: pointer argument -> element type (``"bf16"``, ``"fp32"``, ``"i8"``).
        constexprs: values of the ``tl.constexpr`` arguments.
        num_warps: warps per program, as the runtime launches it.
        arch: compute capability as an int (90: H100).
        floats: scalar fp32 arguments; every other scalar is i32.
    """
    jf = JITFunction(fn)
    sig = {}
    for arg in jf.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + ptrs[arg]
        else:
            sig[arg] = "fp32" if arg in floats else "i32"
    cx = {(jf.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=jf, signature=sig, constexprs=cx)
    # Triton's tracing consults TRITON_INTERPRET (set by the kernel tests): unset it while
    # compiling, which is by definition not interpreting.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})  # fmt: skip
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
    return CompileReport(name, int(regs.group(1)) if regs else -1, sum(spills), num_warps)


def compile_all(arch: int = 90, dtype: str = "bf16", dim: int = 768, heads: int = 12,
                patches: int = 196, frames: tuple[int, ...] = (8, 32, 96)) -> list[CompileReport]:  # fmt: skip
    """Compile every kernel at the configurations the runtime launches for these shapes."""
    reports = []
    f32 = "fp32"
    block = triton.next_power_of_2(dim)
    rows = max(1, min(16, 4096 // block))
    nw = KT._num_warps(rows * block)
    t = dtype
    reports.append(compile_kernel(
        KT._ln_fwd_kernel, "layer_norm fwd",
        dict(X=t, RES=t, W=t, B=t, Y=t, RES_OUT=t, MEAN=f32, RSTD=f32),
        dict(HAS_RES=True, HAS_BIAS=True, ROWS=rows, BLOCK_N=block), nw, arch, ("eps",)))
    reports.append(compile_kernel(
        KT._ln_bwd_kernel, "layer_norm bwd",
        dict(H=t, DY=t, DRES=t, W=t, DX=t, MEAN=f32, RSTD=f32, DW_PART=f32, DB_PART=f32),
        dict(HAS_DRES=True, ROWS=rows, BLOCK_N=block), nw, arch))
    reports.append(compile_kernel(KT._bias_gelu_fwd_kernel, "bias_gelu fwd",
                                  dict(X=t, B=t, Y=t), dict(BLOCK=KT._EW_BLOCK), 4, arch))
    reports.append(compile_kernel(KT._bias_gelu_bwd_kernel, "bias_gelu bwd",
                                  dict(X=t, B=t, DY=t, DZ=t), dict(BLOCK=KT._EW_BLOCK), 4, arch))
    dh = dim // heads
    for T in frames:
        bm, bn, bd = KA._attn_blocks(T, T, dh)
        nw = 4 if bm * bn <= 64 * 64 else 8
        meta = dict(HAS_MASK=True, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        reports.append(compile_kernel(
            KA._attn_fwd_kernel, f"short_attention fwd T={T}",
            dict(Q=t, K=t, V=t, O=t, LSE=f32, MASK="i8"), meta, nw, arch, ("qk_scale",)))
        reports.append(compile_kernel(
            KA._attn_bwd_kernel, f"short_attention bwd T={T}",
            dict(Q=t, K=t, V=t, O=t, DO=t, DQ=t, DK=t, DV=t, LSE=f32, MASK="i8"), meta, nw,
            arch, ("qk_scale", "sm_scale")))
    bm, bn, bd, nw = KS._spatial_blocks(patches + 1, dh)
    meta = dict(PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    reports.append(compile_kernel(
        KS._spatial_fwd_kernel, f"spatial fwd S={patches + 1}",
        dict(QKV=t, OUT=t, CLS_OUT=t, LSE=f32), meta, nw, arch, ("qk_scale",)))
    bwd_ptrs = dict(QKV=t, DOUT=t, DCLS=t, DQKV=t, LSE=f32, DELTA=f32, PCLS=f32)
    for fn, label in ((KS._spatial_bwd_dkdv_kernel, "dkdv"), (KS._spatial_bwd_dq_kernel, "dq")):
        reports.append(compile_kernel(fn, f"spatial bwd {label} S={patches + 1}", bwd_ptrs, meta,
                                      nw, arch, ("qk_scale", "sm_scale")))  # fmt: skip
    return reports


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    dtype = argv[1] if len(argv) > 1 else "bf16"
    print(f"| kernel (sm_{arch}, {dtype}) | warps | registers | spill bytes |")
    print("|---|---|---|---|")
    for r in compile_all(arch, dtype):
        print(f"| {r.name} | {r.num_warps} | {r.registers} | {r.spill_bytes} |", flush=True)


if __name__ == "__main__":
    main()
