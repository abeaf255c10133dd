"""The engine stands below the launcher: no module of ``megavid/engine`` imports ``megavid.launch``.

What both need (SLURM node lists, secret masking, the start-up report's text) lives in
``megavid.cluster``, which imports neither of them. Checked on the source, every import
statement at any depth (a function-level import runs late but is still a dependency), parsed
with ast; and at run time, by importing every engine module in a fresh interpreter.

Oracles: a hand-written source whose import lines are known, and ``sys.modules`` of a fresh
interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ENGINE = REPO / "megavid" / "engine"


def get_imported_modules(source: str, package: str) -> list[tuple[str, int]]:
    """(module, line) of every import statement of ``source``, at any depth. ``from a import b``
    yields ``a`` and ``a.b`` (``b`` may be a module); relative imports are resolved against
    ``package``, the package the source's module is in."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return sorted(found, key=lambda x: x[1])


def _is_launch(module: str) -> bool:
    return module == "megavid.launch" or module.startswith("megavid.launch.")


def _launch_lines(source: str, package: str) -> list[int]:
    return sorted({line for module, line in get_imported_modules(source, package) if _is_launch(module)})


def test_finder_sees_every_form_of_import():
    source = textwrap.dedent("""\
        import os
        import megavid.launch.env as launch_env
        from megavid import launch
        from megavid.launch import mask_env
        from ..launch.slurm import get_slurm_allocation
        def f():
            from megavid.launch import build_parser
        from megavid.launcher_notes import x
        from megavid.cluster import expand_nodelist
        from . import dist
        from .. import launch as launch_pkg
        """)
    assert _launch_lines(source, "megavid.engine") == [2, 3, 4, 5, 7, 11]
    modules = dict(get_imported_modules(source, "megavid.engine"))
    assert modules["megavid.engine.dist"] == 10 and modules["megavid.cluster.expand_nodelist"] == 9


def test_engine_source_imports_nothing_of_the_launcher():
    files = sorted(ENGINE.glob("*.py"))
    assert {"trainer.py", "dist.py", "deepspeed_setup.py", "checkpoint.py", "parallelize.py"} <= {
        p.name for p in files}
    bad = [f"{p.relative_to(REPO)}:{line}" for p in files
           for line in _launch_lines(p.read_text(), "megavid.engine")]
    assert not bad, f"engine modules import megavid.launch (use megavid.cluster): {bad}"
    # the finder does read these files: the engine's own imports of megavid modules are seen
    dist_imports = {m for m, _ in get_imported_modules((ENGINE / "dist.py").read_text(), "megavid.engine")}
    assert "megavid.cluster" in dist_imports
    trainer_imports = {m for m, _ in get_imported_modules((ENGINE / "trainer.py").read_text(), "megavid.engine")}
    assert {"megavid.engine.dist", "megavid.engine.deepspeed_setup"} <= trainer_imports


def test_cluster_module_imports_neither_side():
    modules = {m for m, _ in get_imported_modules((REPO / "megavid" / "cluster.py").read_text(), "megavid")}
    assert {m for m in modules if m.startswith("megavid")} == {"megavid.errors", "megavid.errors.LaunchError"}


def test_engine_modules_load_without_the_launcher():
    names = [f"megavid.engine.{p.stem}" for p in sorted(ENGINE.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('megavid.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert "megavid.engine.trainer" in loaded and "megavid.cluster" in loaded
    assert not [m for m in loaded if _is_launch(m)], loaded
