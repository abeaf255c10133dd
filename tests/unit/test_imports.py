"""Import rules of the megavid package, checked on the source (nothing is imported).

The graph: one node per module of ``megavid/`` (every subpackage, ``megavid.kernels``
included); an edge for every ``import`` / ``from ... import`` of a megavid module,
at module level or inside a function or class (an import that runs late is still a
dependency: hiding a circle inside a function is what these tests forbid), but not under
``if TYPE_CHECKING:`` (never executed). ``from a.b import c`` is an edge to the module
``a.b.c`` when there is one, else to ``a.b``. Importing ``a.b.c`` also runs the ``__init__``
of ``a`` and ``a.b``: those are edges too, except for the importing module's own parent
packages (Python initialises them before the module; an explicit ``from megavid.tasks import
x`` inside ``megavid/tasks/`` is an edge like any other).

Rules:

- no import circle between modules, anywhere in ``megavid/``;
- no module of ``megavid.tasks`` imports a private (``_name``) name of another task module:
  what tasks share is public, in ``megavid.tasks.base`` / ``megavid.tasks.evaluation``;
- ``megavid.shards`` imports nothing of ``megavid.data``; ``megavid.data`` imports nothing of
  ``megavid.shards`` but ``megavid.shards.format``, and the format module imports no other
  module of ``megavid.shards`` (so the shard format is all that loading reaches of ingest);
- no module of ``megavid/`` is longer than :data:`MAX_LINES`;
- every folder of ``megavid/`` holding Python files is a package (``setup.py``'s
  ``find_packages`` ships only those).

Oracles: the hand-built package of ``test_graph_finds_circles_and_skips_type_checking`` (its
circles and edges are known by construction) and, for the real package, the rules above.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 600
"""Split a module of megavid/ along its seams before it grows past this."""


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------
def get_module_files(repo: Path) -> dict[str, Path]:
    """Module name -> source file, for ``megavid/**/*.py`` under ``repo``."""
    out: dict[str, Path] = {}
    for path in sorted((repo / "megavid").rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def get_imports(path: Path, module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import statement of a file,
    at any depth, except the body of ``if TYPE_CHECKING:``; relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # the else branch does run
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.extend((base, alias.name, node.lineno) for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def build_import_graph(repo: Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(graph, direct): module -> {imported module: first line}. ``direct`` holds the modules
    the import statements name; ``graph`` adds the parent packages they initialise (other than
    the importer's own)."""
    files = get_module_files(repo)
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    direct: dict[str, dict[str, int]] = {m: {} for m in files}
    for module, path in files.items():
        own_parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        for target, name, line in get_imports(path, module):
            if name is not None and f"{target}.{name}" in files:
                target = f"{target}.{name}"
            if target not in files:
                continue  # not a megavid module
            direct[module].setdefault(target, line)
            graph[module].setdefault(target, line)
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in files and parent not in own_parents and parent != module:
                    graph[module].setdefault(parent, line)
    return graph, direct


def find_circles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (and self-imports): every
    module of one can reach every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        # iterative Tarjan: (node, iterator over its targets)
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        out.append(component)
    return out


def describe_circle(graph: dict[str, dict[str, int]], component: set[str],
                    files: dict[str, Path]) -> str:
    """One cycle through ``component``, each step as ``module (file:line) -> module``."""
    start = min(component)
    path, seen, node = [start], {start}, start
    while True:  # walk inside the component until a module repeats
        node = next(t for t in sorted(graph[node]) if t in component)
        if node in seen:
            path = path[path.index(node):] + [node]
            break
        path.append(node)
        seen.add(node)
    steps = [f"{a} ({files[a].relative_to(REPO) if files[a].is_relative_to(REPO) else files[a]}:"
             f"{graph[a][b]})" for a, b in zip(path, path[1:])]
    return " -> ".join(steps + [path[-1]])


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# --------------------------------------------------------------------------------------------
# The checker itself
# --------------------------------------------------------------------------------------------
def test_graph_finds_circles_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "megavid"
    files = {
        "__init__.py": "",
        "a.py": "from megavid import b\n",
        "b.py": "def f():\n    from megavid.c import g\n",  # a circle through a function
        "c.py": "import megavid.a\n\ndef g():\n    pass\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megavid import e\n",
        "e.py": "from megavid import d\n",  # no circle: d -> e is never executed
        "sub/__init__.py": "",
        "sub/x.py": "from . import y\nfrom megavid.sub import z\n",
        "sub/y.py": "from .x import something\n",  # a relative circle x <-> y
        "sub/z.py": "import os\n",
        "f.py": "from megavid.sub.z import q\n",  # runs megavid/sub/__init__ too
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph, direct = build_import_graph(tmp_path)
    circles = find_circles(graph)
    assert sorted(map(sorted, circles)) == [["megavid.a", "megavid.b", "megavid.c"],
                                            ["megavid.sub.x", "megavid.sub.y"]]
    assert "megavid.e" not in graph["megavid.d"] and "megavid.d" in graph["megavid.e"]
    assert graph["megavid.b"] == {"megavid.c": 2}
    # the parent package another package's module initialises is an edge; one's own is not
    assert set(graph["megavid.f"]) == {"megavid.sub", "megavid.sub.z"}
    assert set(direct["megavid.f"]) == {"megavid.sub.z"}
    assert set(graph["megavid.sub.x"]) == {"megavid.sub.y", "megavid.sub.z"}
    abc = next(c for c in circles if "megavid.a" in c)
    text = describe_circle(graph, abc, get_module_files(tmp_path))
    assert text.startswith("megavid.a (") and text.endswith("-> megavid.a")


# --------------------------------------------------------------------------------------------
# The rules, on the real package
# --------------------------------------------------------------------------------------------
def test_no_import_circles():
    graph, _ = build_import_graph(REPO)
    files = get_module_files(REPO)
    circles = find_circles(graph)
    assert not circles, "import circles (break them; a function-level import does not):\n" + "\n".join(
        describe_circle(graph, c, files) for c in circles)


def test_task_modules_import_no_private_names_of_each_other():
    files = get_module_files(REPO)
    bad = [f"{module}:{line} imports {target}.{name}"
           for module, path in sorted(files.items()) if _in(module, "megavid.tasks")
           for target, name, line in get_imports(path, module)
           if name and name.startswith("_") and not name.startswith("__")
           and _in(target, "megavid.tasks") and target != module]
    assert not bad, "\n".join(bad)


def test_shards_and_data_import_one_way():
    _, direct = build_import_graph(REPO)
    bad = []
    for module, targets in sorted(direct.items()):
        for target, line in sorted(targets.items()):
            where = f"{module}:{line} imports {target}"
            if _in(module, "megavid.shards") and _in(target, "megavid.data"):
                bad.append(f"{where} (megavid.shards must not import the loaders)")
            if (_in(module, "megavid.data") and _in(target, "megavid.shards")
                    and target != "megavid.shards.format"):
                bad.append(f"{where} (megavid.data may import megavid.shards.format only)")
            if (module == "megavid.shards.format" and _in(target, "megavid.shards")
                    and target != module):
                bad.append(f"{where} (the format module stands alone in megavid.shards)")
    assert not bad, "\n".join(bad)
    # the rule is not vacuous: loading does read the format
    assert any("megavid.shards.format" in t for m, t in direct.items() if _in(m, "megavid.data"))


def test_modules_stay_small():
    long = {str(p.relative_to(REPO)): n for p in sorted(get_module_files(REPO).values())
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their seams): {long}"


def test_every_source_folder_is_a_package():
    folders = {p.parent for p in (REPO / "megavid").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders without __init__.py (setup.py would not ship them): {missing}"
