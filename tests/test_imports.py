"""The package's module graph: no import cycles, counting imports inside functions too
(a function-level import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_graph(package: Path) -> dict[str, set[str]]:
    """Edges module -> intra-package modules it imports, anywhere in its source."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        here = name if name in packages else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for candidate in candidates:
                # A package's __init__ is a facade: importing a sibling *through* it is what
                # the modules below are counted for, so the facade itself is not an edge.
                if candidate in modules and candidate != name and candidate not in packages:
                    edges[name].add(candidate)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = module_graph(PACKAGE)
    assert "pipeline.runner" in graph and "pipeline.ingest.objects" in graph
    assert cycles(graph) == []


def test_every_module_imports_on_its_own():
    # Each module imported first, with every pipeline module forgotten before: an
    # order-dependent import (a cycle resolved only because another module came first)
    # fails here. The third-party libraries stay loaded, so this is quick.
    names = sorted(n for n in module_graph(PACKAGE) if n != "pipeline.__main__")
    code = (
        "import importlib, sys\n"
        "for n in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(n)\n"
    )
    subprocess.run([sys.executable, "-c", code, *names], check=True, timeout=300)


def test_cli_help_does_not_import_the_numerics():
    code = (
        "import sys\nfrom pipeline.cli import app\n"
        "heavy = [m for m in ('numpy', 'dask', 'pandas', 'zarr', 'sklearn', 'pydantic') "
        "if m in sys.modules]\nprint(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
