"""Runs this folder's interpreter tests in a second process when this one cannot.

Triton fixes its mode at its first import. In a whole-suite run, an earlier test module
usually imports triton (``torch._dynamo`` does) before this folder's conftest can set
``TRITON_INTERPRET=1``, so the CPU kernel tests here skip in-process; this test then runs them
in a fresh process with the variable set (same marker selection), so CI still checks them.
Run on its own (``pytest tests/unit/kernels``) the tests run in-process and this one skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavid.kernels import _triton


@pytest.mark.slow
def test_kernel_tests_in_an_interpreting_process(request):
    if _triton.INTERPRETED:
        pytest.skip("this process interprets: the kernel tests ran in-process")
    if torch.cuda.is_available():
        pytest.skip("GPU machine: the CUDA kernel tests run compiled in-process")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider",
           "--rootdir", str(request.config.rootpath)]  # fmt: skip
    markexpr = request.config.getoption("markexpr")
    if markexpr:
        cmd += ["-m", markexpr]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                         cwd=request.config.rootpath)  # fmt: skip
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "CPU kernel tests need" not in out.stdout, tail
