"""The checkout's top-level folders never shadow installed distributions.

``python -m ...`` (and ``python -c``) run from a checkout put the checkout first on sys.path,
so a top-level folder that is a regular package wins over any installed module of the same
name. transformers imports Hugging Face's ``kernels`` distribution when it is installed (a
dependency since transformers 5.2x), and a ``kernels/__init__.py`` here made every model import
fail from the checkout (CI run of 2026-12-04: 19 tests, "cannot import name 'CUDAProperties'
from 'kernels'")."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_from_checkout(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_kernels_from_the_checkout_finds_the_installed_distribution():
    found = json.loads(_run_from_checkout(
        "import json, kernels; print(json.dumps([getattr(kernels, '__file__', None), "
        "list(getattr(kernels, '__path__', []))]))"))
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        # nothing else owns the name: the folder may only show up as a namespace portion
        # (no __init__.py, so no code of ours runs under the name `kernels`)
        assert found[0] is None, found
        return
    assert found[0] is not None and not Path(found[0]).is_relative_to(REPO / "kernels"), found


def test_megavid_kernels_is_the_checkout_folder_and_transformers_models_build():
    import megavid.kernels

    assert Path(megavid.kernels.__file__).resolve() == REPO / "kernels" / "src" / "__init__.py"
    assert not (REPO / "kernels" / "__init__.py").exists()
    # the import chain that failed: a transformers model built in a process started here
    name = _run_from_checkout(
        "from transformers import BertConfig, BertModel\n"
        "m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=64))\n"
        "import megavid.kernels; print(type(m).__name__)")
    assert name == "BertModel"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
