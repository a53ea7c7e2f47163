"""The package's shape: no import cycles, and layers that only import downwards.

The import graph is read from the source (every ``import`` / ``from ... import``,
also those inside functions), so nothing is run; ``python tests/test_structure.py``
prints the graph's layers.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "scaleattn"

# Modules a lower layer must never import (directly or through others).
FORBIDDEN = {
    "scaleattn.steps": ("scaleattn.loop", "scaleattn.experiment", "scaleattn.inference",
                        "scaleattn.data", "scaleattn.predict", "scaleattn.report"),
    # (inference does reach `optim`: a checkpoint holds the optimiser state, so the
    # template it is restored into is built with the optimiser; nothing trains.)
    "scaleattn.inference": ("scaleattn.steps", "scaleattn.loop", "scaleattn.experiment",
                            "scaleattn.predict", "scaleattn.report", "scaleattn.losses"),
    "scaleattn.models": ("scaleattn.losses", "scaleattn.steps", "scaleattn.parallel",
                         "scaleattn.data"),
    "scaleattn.parallel": ("scaleattn.steps", "scaleattn.models", "scaleattn.loop"),
    "scaleattn.loop": ("scaleattn.main", "scaleattn.predict", "scaleattn.report",
                       "scaleattn.analysis", "scaleattn.bench"),
    "scaleattn.viz": ("jax", "scaleattn.inference", "scaleattn.data"),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The modules (of ``known``, or third-party roots) ``path`` imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` imports the module ``pkg.mod`` when there is one.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            found.add(name if name.startswith("scaleattn") else name.split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph = {}
    for f in files:
        name = module_name(f)
        targets = set()
        for target in imports_of(f, known):
            # Importing ``scaleattn.a.b`` runs ``scaleattn.a`` too; a package's own
            # ``__init__`` importing its children is not a cycle.
            if target.startswith("scaleattn") and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (between package modules), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through package modules."""
    seen, todo = set(), [m for m in graph if m == start or m.startswith(start + ".")]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_find_cycle_finds_a_planted_cycle():
    graph = {"scaleattn.a": {"scaleattn.b"}, "scaleattn.b": {"scaleattn.c"},
             "scaleattn.c": {"scaleattn.a"}, "scaleattn.d": set()}
    assert find_cycle(graph) == ["scaleattn.a", "scaleattn.b", "scaleattn.c", "scaleattn.a"]
    assert find_cycle({"scaleattn.a": {"scaleattn.b"}, "scaleattn.b": set()}) is None


def test_imports_are_read_from_function_bodies_too(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from scaleattn import loop\n    import numpy.linalg\n")
    assert imports_of(source, {"scaleattn.loop"}) == {"scaleattn.loop", "numpy"}


def test_the_package_has_no_import_cycles():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("lower", sorted(FORBIDDEN))
def test_layers_import_only_downwards(lower):
    reached = reachable(import_graph(), lower)
    bad = [m for m in FORBIDDEN[lower]
           if any(r == m or r.startswith(m + ".") for r in reached)]
    assert not bad, f"{lower} reaches {bad}"


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by height: layer 0 imports no package module, layer k only lower ones."""
    height = {}

    def h(node):
        if node not in height:
            height[node] = 0
            height[node] = 1 + max((h(n) for n in graph[node] if n in graph),
                                   default=-1)
        return height[node]

    for node in graph:
        h(node)
    return [sorted(n for n in graph if height[n] == k) for k in range(max(height.values()) + 1)]


if __name__ == "__main__":
    for k, names in enumerate(layers(import_graph())):
        print(k, " ".join(n.removeprefix("scaleattn.") for n in names))
