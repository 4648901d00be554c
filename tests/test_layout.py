"""The package's layout rules, read from the source: no import circles between steerlm's modules.

Every import counts, including the ones inside functions: a lazy import that closes a circle is still a circle
(two modules that each need the other), only hidden from the interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The steerlm modules `name` imports (`from .x import y` counts as x.y when y is a module, else x)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a module's own package (its __init__ runs first anyway) is not an edge
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_circles() -> list[list[str]]:
    """Strongly connected components of the import graph with more than one module (Tarjan)."""
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_the_import_graph_reads_real_edges():
    modules = module_files()
    edges = imported_modules("steerlm.report", modules["steerlm.report"], modules)
    assert "steerlm.stage_table" in edges and "steerlm.pipeline" not in edges
    assert "steerlm.engines.torch_engine" in imported_modules("steerlm.pipeline", modules["steerlm.pipeline"], modules)


def test_no_import_circles():
    assert import_circles() == []
