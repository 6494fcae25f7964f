"""The import graph of ``dataeff``: no cycles, and only ``dist.py`` imports ``torch.distributed``.

Every ``import`` and ``from ... import`` counts, at module level and inside functions
(lazy imports are still dependencies), and so does a string literal naming a dataeff
module (``"dataeff.select.stage"`` or ``"dataeff.select.stage:run_full"``), since a
registry of import strings is an import that hides itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dataeff"
MODULE_STRING = re.compile(r"^(dataeff(?:\.\w+)+)(?::\w+)?$")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The longest dataeff module that ``name`` is or lies in (``dataeff.x.y.attr`` -> ``dataeff.x.y``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _with_parents(name: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)} & set(MODULES)


def imports_of(module: str) -> set[str]:
    """dataeff modules that ``module`` imports (statements anywhere in the file, and module strings)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if target := _known(alias.name):
                    found |= _with_parents(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from dataeff import dist``: y may be a submodule
                if target := _known(f"{base}.{alias.name}") or _known(base):
                    found |= _with_parents(target)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = MODULE_STRING.match(node.value)
            if match and (target := _known(match.group(1))):
                found |= _with_parents(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package is small, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within it)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in dataeff:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_graph_sees_lazy_imports_and_module_strings() -> None:
    graph = import_graph()
    assert "dataeff.select.embed" in graph["dataeff.cli"]  # imported inside a loader function
    assert "dataeff.dist" in graph["dataeff.cli"]  # ``from dataeff import dist``
    sample = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(sample) == [["a", "b", "c", "a"]]
    assert MODULE_STRING.match("dataeff.select.stage:run_full")


def _imports_torch_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed"):
                return True
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value == "torch.distributed":
            return True
    return False


def test_only_dist_imports_torch_distributed() -> None:
    offenders = [m for m, p in MODULES.items() if m != "dataeff.dist" and _imports_torch_distributed(p)]
    assert offenders == [], "collectives belong in dataeff/dist.py; these modules import torch.distributed"
    assert _imports_torch_distributed(MODULES["dataeff.dist"])
