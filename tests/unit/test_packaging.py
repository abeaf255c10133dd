"""What ships, and the checkout's top-level folders never shadow installed distributions.

``python -m ...`` (and ``python -c``) run from a checkout put the checkout first on sys.path,
so a top-level folder that is a regular package wins over any installed module of the same
name. transformers imports Hugging Face's ``kernels`` distribution when it is installed (a
dependency since transformers 5.2x), and a ``kernels/__init__.py`` here made every model import
fail from the checkout (CI run of 2026-12-04: 19 tests, "cannot import name 'CUDAProperties'
from 'kernels'"). The fused kernels therefore live in ``megavid/kernels`` and ship as an
ordinary subpackage; the wheel built from this checkout is checked for exactly that."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_from_checkout(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _checkout_sources(root: Path) -> set[str]:
    """``megavid/**/*.py`` of ``root``, as wheel member names."""
    return {p.relative_to(root).as_posix() for p in (root / "megavid").rglob("*.py")
            if "__pycache__" not in p.parts}  # fmt: skip


def test_import_kernels_from_the_checkout_finds_the_installed_distribution():
    origin = json.loads(_run_from_checkout(
        "import importlib.util, json; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps(s and s.origin))"))
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert origin is None, f"`import kernels` from the checkout finds {origin}"
        return
    # the distribution's own module, not anything of the checkout's (.venv lives in it too)
    assert origin is not None
    assert Path(origin).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_no_top_level_module_of_the_checkout_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    ours = {p.stem if p.suffix == ".py" else p.name for p in REPO.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").is_file()}  # fmt: skip
    assert "megavid" in ours
    shadowing = {name: installed[name] for name in ours - {"megavid"} if name in installed}
    assert not shadowing, f"top-level modules of the checkout shadow distributions: {shadowing}"


def test_megavid_kernels_is_the_checkout_folder_and_transformers_models_build():
    import megavid.kernels

    assert Path(megavid.kernels.__file__).resolve() == REPO / "megavid" / "kernels" / "__init__.py"
    # the import chain that failed: a transformers model built in a process started here
    name = _run_from_checkout(
        "from transformers import BertConfig, BertModel\n"
        "m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=64))\n"
        "import megavid.kernels; print(type(m).__name__)")
    assert name == "BertModel"


def test_wheel_ships_every_module_under_megavid_and_nothing_else(tmp_path):
    # Built from a copy, through the PEP 517 backend pyproject.toml names (what pip runs), so
    # the checkout gets no build/ or egg-info of this test's making.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megavid", src / "megavid",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(zf.read(n).decode() for n in names
                         if n.endswith(".dist-info/top_level.txt"))  # fmt: skip
    assert top_level.split() == ["megavid"]
    shipped = {n for n in names if n.endswith(".py")}
    assert shipped == _checkout_sources(src), shipped ^ _checkout_sources(src)
    kernels = {n for n in shipped if n.startswith("megavid/kernels/")}
    assert {"megavid/kernels/__init__.py", "megavid/kernels/aot.py"} <= kernels, kernels
    assert not [n for n in names if n.split("/")[0] == "kernels"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
