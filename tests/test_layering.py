"""The code's shape stays as designed: the four packages import downwards only
(frontend_lang -> progserve -> scheduler -> engine_backend), and no modules import each
other in a cycle. Imports under `if TYPE_CHECKING:` are for type checkers only and do not
count; imports inside functions do (they run too, only later).

Read from the source with `ast`, so the test needs nothing imported and names the file
and line of each offending import."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import only the ones at or below its own rank.
LAYERS = ("engine_backend", "scheduler", "progserve", "frontend_lang")
RANK = {name: rank for rank, name in enumerate(LAYERS)}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (the deepest one that exists)
    where: str  # file:line


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


MODULES = all_modules()


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (anywhere but under `if TYPE_CHECKING:`)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _deepest_module(name: str) -> str | None:
    """`name` or its closest enclosing module that is one of ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # `from pkg import name`: `name` may be a module of its own.
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
            for alias in node.names]


def imports() -> list[Import]:
    found: list[Import] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _runtime_imports(tree):
            for target in _targets(module, path, node):
                resolved = _deepest_module(target)
                if resolved is not None and resolved != module:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append(Import(module, resolved, where))
    return found


IMPORTS = imports()


def layer(module: str) -> str:
    return module.partition(".")[0]


def upward_imports(found: list[Import]) -> list[Import]:
    return [i for i in found if RANK[layer(i.target)] > RANK[layer(i.source)]]


def import_cycles(found: list[Import]) -> list[list[str]]:
    graph = nx.DiGraph()
    graph.add_edges_from((i.source, i.target) for i in found)
    return [sorted(component) for component in nx.strongly_connected_components(graph)
            if len(component) > 1]


def test_the_checker_sees_the_imports_it_must_judge():
    """Guards the guard: the parser finds known imports, skips type-only ones, and
    both checks catch what they exist for."""
    edges = {(i.source, i.target) for i in IMPORTS}
    assert ("scheduler.scheduler", "scheduler.call_runner") in edges
    assert ("progserve.runtime", "scheduler.scheduler") in edges
    # progserve/api/calls.py imports scheduler.scheduler for types only
    assert ("progserve.api.calls", "scheduler.scheduler") not in edges
    up = Import("engine_backend.types", "progserve.config", "x.py:1")
    assert upward_imports([up]) == [up]
    loop = [Import("scheduler.a", "scheduler.b", "a.py:1"),
            Import("scheduler.b", "scheduler.c", "b.py:1"),
            Import("scheduler.c", "scheduler.a", "c.py:1")]
    assert import_cycles(loop) == [["scheduler.a", "scheduler.b", "scheduler.c"]]


def test_packages_import_downwards_only():
    upward = upward_imports(IMPORTS)
    assert not upward, "upward imports (frontend_lang -> progserve -> scheduler -> " \
        "engine_backend):\n" + "\n".join(f"  {i.where}: {i.source} -> {i.target}"
                                         for i in upward)


def test_no_import_cycles_between_modules():
    cycles = import_cycles(IMPORTS)
    if cycles:
        lines = []
        for members in cycles:
            inside = set(members)
            lines.append("  " + ", ".join(members))
            lines += [f"    {i.where}: {i.source} -> {i.target}" for i in IMPORTS
                      if i.source in inside and i.target in inside]
        pytest.fail("modules that import each other in a cycle:\n" + "\n".join(lines))
