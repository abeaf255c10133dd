"""Implementation selection: names, fallbacks, and proof that "triton" really runs Triton."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megavid import kernels as K
from megavid.errors import ConfigError, MegavidError
from megavid.kernels import backends


def test_unknown_impl_names_the_valid_ones():
    with pytest.raises(ConfigError, match="torch, triton, apex, auto") as e:
        K.get_impl("trition")
    assert isinstance(e.value, MegavidError)
    with pytest.raises(ConfigError):
        K.layer_norm(torch.ones(2, 3), torch.ones(3), None, impl="cuda")
    with pytest.raises(ConfigError):
        K.FusedLayerNorm(8, impl="fast")


def test_auto_is_torch_on_cpu_and_triton_under_the_interpreter(interpreted):
    x = torch.randn(2, 8)
    assert K.get_backend("auto", x) == "torch"
    assert K.get_backend("torch", x) == "torch"
    assert K.HAS_TRITON
    assert K.get_backend("triton", x, "short_attention") == "triton"  # TRITON_INTERPRET=1


def test_triton_kernels_run_in_the_interpreter_on_cpu(interpreted):
    from triton.runtime.interpreter import InterpretedFunction

    from megavid.kernels import _triton

    kern = _triton._kernel(_triton._bias_gelu_fwd_kernel, torch.device("cpu"))
    assert isinstance(kern, InterpretedFunction)
    # The interpreter executes the kernel body: a value only the kernel computes comes back.
    x = torch.tensor([[-1.0, 0.0, 2.0]], requires_grad=True)
    b = torch.tensor([0.5, 0.0, -1.0])
    y = K.get_impl("triton").bias_gelu(x, b)
    assert type(y.grad_fn).__name__ == "BiasGeluFnBackward"
    torch.testing.assert_close(y, torch.nn.functional.gelu(x + b))


_FALLBACK_SCRIPT = """
import warnings, torch
from megavid import kernels as K
assert not K._triton.INTERPRETED
x = torch.randn(3, 10, requires_grad=True)
w, b = torch.randn(10), torch.randn(10)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y, _ = K.layer_norm(x, w, b, impl="triton")
assert any("falls back to torch" in str(c.message) for c in caught), caught
assert "LayerNormFn" not in type(y.grad_fn).__name__
torch.testing.assert_close(y, K.layer_norm_ref(x, w, b, 1e-5)[0], atol=1e-5, rtol=1e-5)
print("FELL_BACK")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only machine behaviour")
def test_triton_on_cpu_without_the_interpreter_falls_back_with_a_warning():
    # A second process that imports triton without TRITON_INTERPRET: no GPU, no interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FELL_BACK" in out.stdout


def test_missing_triton_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "HAS_TRITON", False)  # the flag get_backend reads
    backends._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="triton is not importable"):
        assert K.get_backend("triton", torch.zeros(1), "bias_gelu") == "torch"
    assert K.get_backend("auto", torch.zeros(1)) == "torch"


@pytest.mark.skipif(K.has_apex(), reason="apex is installed here")
def test_apex_without_apex_falls_back_to_torch():
    backends._warn_fallback.cache_clear()
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="apex is not importable"):
        assert K.get_backend("apex", x, "layer_norm") == "torch"
    # apex has no GELU/attention: those ops resolve as "auto" (torch on CPU).
    assert K.get_backend("apex", x, "bias_gelu") == "torch"
    y, h = K.get_impl("apex").layer_norm(x, torch.ones(6), torch.zeros(6), 1e-5, residual=x)
    torch.testing.assert_close(y, K.layer_norm_ref(x, torch.ones(6), torch.zeros(6), 1e-5, x)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(h, 2 * x)


def test_config_field_selects_the_implementation(interpreted):
    from megavid.config import compose

    cfg = compose(["model.kernel_impl=triton"])
    assert K.get_impl(cfg.model.kernel_impl).backend(torch.zeros(1)) == "triton"
    assert compose([]).model.kernel_impl == "torch"  # off unless asked for
    with pytest.raises(ConfigError, match="kernel_impl"):
        compose(["model.kernel_impl=cuda"])
