"""Architecture checks over the source of ``xdit_compile`` (no processes, no torch work).

- ``test_no_import_cycles``: the package's modules import each other without a cycle, counting
  imports inside functions too (a function-local import hides a cycle from Python, not from a reader).
- ``test_each_module_imports_alone``: every module imports first, in a fresh package state (an
  import that works only after some other module ran is an order dependence).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xdit_compile"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, at module level and inside functions alike.

    ``from . import x`` counts as an import of the submodule ``x`` when one exists, else of the
    package (whose ``__init__`` then runs). Importing ``a.b.c`` also runs the parents' ``__init__``;
    that implicit edge is not counted (every submodule would cycle through its package's
    re-exports), but an explicit import of a package is.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                while t and t not in mods:  # ``import xdit_compile.x.y`` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("xdit_compile") and t in mods:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in xdit_compile: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"xdit_compile.a": {"xdit_compile.b"}, "xdit_compile.b": {"xdit_compile.a"}}) is not None


_IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "xdit_compile" or m.startswith("xdit_compile.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_alone() -> None:
    names = sorted(_modules())
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=PACKAGE.parent, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, "modules that do not import first:\n" + r.stdout + r.stderr[-3000:]
