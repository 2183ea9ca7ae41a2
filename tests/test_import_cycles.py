"""No import cycles among the project's modules, and the layering of the top-level packages:
``erofs`` and ``fsverity`` never import ``mkcfs``, ``fsverity`` imports neither of the others.

Every module of ``mkcfs/``, ``erofs/`` and ``fsverity/`` is parsed (``ast``), with the imports
inside functions and under ``TYPE_CHECKING`` counted too: a cycle that only closes at run time
is still a cycle a reader has to untangle. Importing ``a.b.c`` also imports ``a`` and ``a.b``
(their ``__init__``), so those count as edges as well, except from modules inside them (a
package is initialised before its modules run).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mkcfs", "erofs", "fsverity")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (anywhere in its body)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            for alias in node.names:   # "from pkg import submodule"
                targets.add(f"{module}.{alias.name}")
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):   # a.b.c imports a, a.b and a.b.c
            prefix = ".".join(parts[:i])
            # a module's own ancestors are initialised before it: importing a sibling through
            # them closes no cycle
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                edges.add(prefix)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        # shortest way back to start inside the component (breadth first)
        paths = {start: [start]}
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & component):
                if w == start:
                    found = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(found or sorted(component))
    return cycles


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_detection_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_layering_of_the_top_level_packages():
    allowed = {"mkcfs": {"mkcfs", "erofs", "fsverity"}, "erofs": {"erofs", "fsverity"},
               "fsverity": {"fsverity"}}
    wrong = [f"{name} imports {target}" for name, targets in _graph().items()
             for target in targets
             if target.split(".")[0] not in allowed[name.split(".")[0]]]
    assert not wrong, "; ".join(sorted(wrong))
