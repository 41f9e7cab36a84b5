"""The import graph of gridserve's packages, read with `ast`: no circles, and actors/ stays below cluster/.

Imports inside functions count like module-level ones: a function-level import that points back up is the
same circle, only deferred to the first call.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "cluster", "deployments", "bench")


def module_name(path: Path) -> str:
    """Dotted module name of a .py file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]) -> set[str]:
    """Our modules one import statement in module `here` names: `from a import b` is a.b if that is a module."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    if node.level:  # relative: strip `level` components off this module's package
        package = here.split(".") if is_package else here.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    found = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found or ({base} & known)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its file (module level, functions, classes)."""
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(node, name, path.name == "__init__.py", known)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> ... -> a) through each strongly connected group of modules, found by Tarjan's walk."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = {stack.pop()}
            while v not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [circle_in(graph, g) for g in groups]


def circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected `group` (breadth-first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    """The reader finds module-level and function-level imports, package __init__s, and real circles."""
    graph = import_graph()
    assert "actors.shard.spec" in graph["actors.shard.model"]
    assert "cluster.scheduler" in graph["bench.foundation"]  # imported inside a function
    assert "cluster.loopback" in graph["bench"]  # the package __init__ is a module too
    relative = ast.parse("from .spec import ModelSpec\nfrom . import gguf").body
    found = set().union(*(imported(n, "actors.shard.loader", False, set(graph)) for n in relative))
    assert found == {"actors.shard.spec", "actors.shard.gguf"}
    assert len(graph) > 50
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    """No module reaches itself through imports of ours, at module level or inside functions."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_actors_do_not_import_cluster() -> None:
    """The worker side (actors/) stands below the replica runtime (cluster/): it never imports it."""
    graph = import_graph()
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("actors") for t in ts
                if t.split(".")[0] == "cluster")
    assert not up, f"actors/ imports cluster/: {up}"


if __name__ == "__main__":
    for circle in cycles(import_graph()):
        print(" -> ".join(circle))
