"""The code stays readable in the shape issue 20 gave it: short functions in the scheduler
and the API layer, a small `Scheduler` façade, and each policy name spelled once (its
class's `name`, collected in `scheduler/policies/registry.py`).

Read from the source with `ast`, so a failure names the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

from scheduler.policies.registry import POLICY_NAMES

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
SHORT_FUNCTION_PACKAGES = ("scheduler", "progserve/api")
FACADE = ROOT / "scheduler" / "scheduler.py"
MAX_FACADE_LINES = 500
# Where a policy's name may appear as a string: the policy's own class.
POLICY_HOMES = ("scheduler/policies",)
NAME_PACKAGES = ("frontend_lang", "progserve", "scheduler", "engine_backend")


def _sources(packages: tuple[str, ...]) -> list[Path]:
    return [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]


def _where(path: Path, node: ast.AST) -> str:
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{name}:{node.lineno}"


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{_where(path, node)} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (names may appear in prose)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            found.add(id(body[0].value))
    return found


def policy_name_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    prose = _docstrings(tree)
    return [
        f"{_where(path, node)} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in POLICY_NAMES
        and id(node) not in prose
    ]


def test_functions_in_the_scheduler_and_the_api_are_short() -> None:
    offenders = [f for path in _sources(SHORT_FUNCTION_PACKAGES) for f in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: split them into " \
        "named steps\n" + "\n".join(offenders)


def test_the_scheduler_facade_stays_small() -> None:
    lines = len(FACADE.read_text().splitlines())
    assert lines <= MAX_FACADE_LINES, f"{FACADE.relative_to(ROOT)} has {lines} lines: " \
        "move an idea into its own module"


def test_policy_names_are_spelled_in_the_registry_only() -> None:
    paths = [p for p in _sources(NAME_PACKAGES)
             if not str(p.relative_to(ROOT)).startswith(POLICY_HOMES)]
    offenders = [hit for path in paths for hit in policy_name_literals(path)]
    assert not offenders, "use scheduler.policies' names (POLICY_NAMES, DEFAULT_POLICY, " \
        "BASELINE_POLICY, PROGRAM_AWARE_POLICIES)\n" + "\n".join(offenders)


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """Each check can fail: a long function and a spelled-out name are found."""
    source = tmp_path / "sample.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source.write_text(f'def long():\n    """doc fcfs"""\n{body}\n\nPOLICY = "fcfs"\n')
    assert long_functions(source) and long_functions(source)[0].endswith(
        f"long: {MAX_FUNCTION_LINES + 2} lines")
    hits = policy_name_literals(source)
    assert len(hits) == 1 and hits[0].endswith("'fcfs'")
