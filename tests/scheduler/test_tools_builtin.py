"""Example tools (calculator, document search) and concurrent OpenAI tool_calls."""

from __future__ import annotations

import asyncio
import builtins
import json

import pytest

from engine_backend.virtual_time import run_virtual
from scheduler.tools import ToolExecutor, ToolRegistry, run_tool_calls
from scheduler.tools.builtin import (
    CalculatorError,
    DocumentSearch,
    SimulatedSearch,
    evaluate_arithmetic,
    register_builtin_tools,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(2 + 3) * sqrt(16) / 4", 5.0),
        ("2^10", 1024),
        ("-3 ** 2", -9),
        ("max(1, 7, 3) % 4", 3),
        ("round(pi, 2)", 3.14),
        ("7 // 2 + 0.5", 3.5),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate_arithmetic(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('id')",
        "open('/etc/passwd').read()",
        "(lambda: 1)()",
        "[x for x in range(10)]",
        "().__class__.__bases__[0].__subclasses__()",
        "math.sqrt(4)",
        "'a' * 3",
        "True + 1",
        "9 ** 9 ** 9",
        "10 ** 100000",
        "1 / 0",
        "sqrt(-1)",
        "x",
        "",
        "1" * 600,
    ],
)
def test_calculator_refuses_everything_else(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate_arithmetic(expression)


def test_calculator_never_calls_eval_or_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert evaluate_arithmetic("(1 + 2) * 3") == 9
    with pytest.raises(CalculatorError):
        evaluate_arithmetic("__import__('os')")


def test_document_search_finds_local_files_and_stays_inside_root(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "radix.md").write_text("The radix cache keeps prefixes of prompts.")
    (tmp_path / "docs" / "tools.txt").write_text("Tools run with timeouts and rate limits.")
    (tmp_path / "secret.md").write_text("radix radix radix secret")
    (tmp_path / "docs" / "link.md").symlink_to(tmp_path / "secret.md")
    search = DocumentSearch(tmp_path / "docs")
    hits = search("radix cache")
    assert [h["path"] for h in hits] == ["radix.md"]
    assert "radix cache" in hits[0]["snippet"]
    assert search("timeouts")[0]["path"] == "tools.txt"
    assert search("!!!") == []


def test_run_tool_calls_runs_openai_calls_concurrently_and_isolates_errors(tmp_path) -> None:
    async def main() -> None:
        registry = ToolRegistry()
        register_builtin_tools(registry)
        registry.register("search", SimulatedSearch(2.0, {"a": "A", "b": "B"}))
        executor = ToolExecutor(registry)
        calls = [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"query": "a"}'}},
            {"id": "c2", "type": "function", "function": {"name": "search", "arguments": '{"query": "b"}'}},
            {"id": "c3", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}},
            {"id": "c4", "type": "function", "function": {"name": "rm_rf", "arguments": "{}"}},
            {"id": "c5", "type": "function", "function": {"name": "search", "arguments": "{not json"}},
        ]  # fmt: skip
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await run_tool_calls(executor, calls, program_id="p")
        assert loop.time() - t0 == pytest.approx(2.0)  # both searches ran at once
        assert [r.tool_call_id for r in results] == ["c1", "c2", "c3", "c4", "c5"]
        assert [r.ok for r in results] == [True, True, True, False, False]
        assert results[0].to_message() == {"role": "tool", "tool_call_id": "c1", "content": "A"}
        assert results[2].content == "42"
        assert "no such tool" in json.loads(results[3].content)["error"]
        assert "not valid JSON" in str(results[4].error)

    run_virtual(main())
