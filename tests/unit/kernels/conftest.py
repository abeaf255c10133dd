"""Kernel tests: Triton kernels against their torch references.

Triton fixes its mode when first imported: under ``TRITON_INTERPRET=1`` it interprets kernels
(on CPU tensors) and cannot compile; without it, it compiles (CUDA) and cannot interpret. On a
machine without CUDA this conftest sets the variable before anything here imports triton, so
the kernel tests run in the interpreter (CI). On a GPU machine it leaves the variable alone:
the CUDA cases (bf16, fp16; marked ``gpu``) run compiled and the CPU cases skip; run
``TRITON_INTERPRET=1 pytest tests/unit/kernels`` there for the CPU cases.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megavid.kernels import _triton  # noqa: E402  (after the variable is set)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = _triton.INTERPRETED

# (device, dtype) cases of every kernel test: fp32 and fp16 in the interpreter (it has no bf16
# story worth testing), bf16 (and fp16) compiled on a GPU.
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
_CPU = pytest.mark.skipif(
    not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1 before triton is imported"
)
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32", marks=_CPU),
    pytest.param("cpu", torch.float16, id="cpu-fp16", marks=_CPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_GPU),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_GPU),
]

# Tolerances of kernel vs reference, both computing in fp32 from the same low-precision inputs:
# fp32 differs by summation order only; fp16/bf16 by one or two roundings of the output (and,
# in attention, of the probabilities fed to the second matmul, as every fused attention does).
FWD_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
BWD_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def pytest_generate_tests(metafunc):
    # Every test taking (device, dtype) runs over DEVICE_DTYPES.
    if {"device", "dtype"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("device", "dtype"), DEVICE_DTYPES)


@pytest.fixture
def interpreted():
    """Skip a CPU-only Triton test unless this process runs Triton's interpreter."""
    if not INTERPRETED:
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 before triton is imported")


@pytest.fixture
def fwd_tol(dtype) -> dict:
    return FWD_TOL[dtype]


@pytest.fixture
def bwd_tol(dtype) -> dict:
    return BWD_TOL[dtype]


@pytest.fixture
def leaf():
    """``leaf(shape, device, dtype, scale=1, seed=0)``: a seeded random tensor needing grad."""

    def make(shape, device, dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=g) * scale).to(device, dtype).requires_grad_(True)

    return make


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # In a process that cannot interpret on a machine without CUDA (a whole-suite run where
    # something imported triton first), test_interpreter_gateway.py runs this whole folder in
    # an interpreting process; skip the in-process copies rather than run the cheap half twice.
    if INTERPRETED or HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="run by test_interpreter_gateway.py in an interpreting process")
    for item in items:
        path = str(item.path)
        if path.startswith(_HERE + os.sep) and not path.endswith("test_interpreter_gateway.py"):
            item.add_marker(skip)
