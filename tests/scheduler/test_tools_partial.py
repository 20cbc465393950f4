"""Partial tool execution: incremental parsers of the token stream and the driver that
feeds a tool while decoding continues."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine_backend.virtual_time import run_virtual
from scheduler.tools import (
    IncrementalTool,
    ToolArgumentError,
    ToolCancelledError,
    ToolExecutor,
    ToolRegistry,
    ToolTimeoutError,
)
from scheduler.tools.partial import (
    CodeStatementStream,
    JsonArgumentStream,
    run_partial_tool,
    split_statements,
)


def feed_chars(stream: Any, text: str) -> list[tuple[int, Any]]:
    """Feed one character at a time; return (position, part) for each part emitted."""
    out = []
    for i, ch in enumerate(text):
        out += [(i, part) for part in stream.feed(ch)]
    return out + [(len(text), part) for part in stream.close()]


def test_json_arguments_are_delivered_as_each_completes() -> None:
    text = '```json\n{"query": "rust async", "k": 12, "tags": ["a", "b"], "opts": {"x": 1}}\n```'
    emitted = feed_chars(JsonArgumentStream(), text)
    parts = [part for _, part in emitted]
    assert parts == [
        ("query", "rust async"),
        ("k", 12),
        ("tags", ["a", "b"]),
        ("opts", {"x": 1}),
    ]
    at = {name: pos for pos, (name, _) in emitted}
    assert at["query"] == text.index('"rust async"') + len('"rust async"') - 1  # closing quote
    assert at["k"] == text.index("12,") + 2  # the number ends at the comma
    assert at["tags"] == text.index('"b"]') + 3  # the array closes
    assert at["opts"] == text.index("1}}") + 2  # the object closes


def test_json_argument_values_never_arrive_truncated() -> None:
    text = '{"a": "he said \\"hi\\"", "n": -3.25e2, "t": true, "z": null}'
    parts = dict(part for _, part in feed_chars(JsonArgumentStream(), text))
    assert parts == {"a": 'he said "hi"', "n": -325.0, "t": True, "z": None}


def test_json_stream_rejects_incomplete_arguments() -> None:
    stream = JsonArgumentStream()
    stream.feed('{"a": 1, "b": "unterminated')
    with pytest.raises(ValueError, match="not a complete JSON object"):
        stream.close()


def test_code_statements_are_emitted_as_soon_as_complete() -> None:
    source = (
        "Here is the code:\n"
        "```python\n"
        "import math\n"
        "x = compute(\n"
        "    1,\n"
        "    2)\n"
        "def f(a):\n"
        "    if a:\n"
        "        return 1\n"
        "    return 2\n"
        "\n"
        "for i in range(3):\n"
        "    print(i)\n"
        "else:\n"
        "    print('done')\n"
        "print(f(x))\n"
        "```\n"
        "That prints 1."
    )
    emitted = feed_chars(CodeStatementStream(), source)
    statements = [s for _, s in emitted]
    assert statements == [
        "import math\n",
        "x = compute(\n    1,\n    2)\n",
        "def f(a):\n    if a:\n        return 1\n    return 2\n",
        "for i in range(3):\n    print(i)\nelse:\n    print('done')\n",
        "print(f(x))\n",
    ]
    at = dict((s, pos) for pos, s in emitted)
    # A simple statement runs when its own line ends; a compound one when the next
    # top-level line starts.
    assert at["import math\n"] == source.index("import math\n") + len("import math")
    assert at["x = compute(\n    1,\n    2)\n"] == source.index("    2)\n") + len("    2)")
    assert at[statements[2]] == source.index("for i") + len("for i in range(3):")
    assert at["print(f(x))\n"] < source.index("That prints")


def test_split_statements_matches_streaming() -> None:
    assert split_statements("a = 1\nb = [\n 2]\nif a:\n    b = 3\n") == [
        "a = 1\n",
        "b = [\n 2]\n",
        "if a:\n    b = 3\n",
    ]


class Recorder(IncrementalTool):
    """Records when each argument arrives, in loop time."""

    seen: list[tuple[float, str, Any]]

    def __init__(self, seen: list[tuple[float, str, Any]]) -> None:
        self.seen = seen

    async def on_partial(self, name: str, value: Any) -> None:
        self.seen.append((asyncio.get_running_loop().time(), name, value))

    async def finish(self) -> dict[str, Any]:
        self.seen.append((asyncio.get_running_loop().time(), "<finish>", None))
        return {name: value for _, name, value in self.seen if name != "<finish>"}


async def tokens(text: str, every_s: float, size: int = 4) -> AsyncIterator[str]:
    """A fake LLM stream: `size` characters every `every_s` seconds."""
    for i in range(0, len(text), size):
        await asyncio.sleep(every_s)
        yield text[i : i + size]


def test_partial_tool_gets_arguments_while_decoding_continues() -> None:
    async def main() -> None:
        seen: list[tuple[float, str, Any]] = []
        registry = ToolRegistry()
        registry.register("rec", incremental=lambda: Recorder(seen))
        executor = ToolExecutor(registry)
        text = '{"first": "alpha", "second": "beta", "third": "gamma"}'
        result = await run_partial_tool(
            executor, "rec", tokens(text, 0.1), program_id="p", call_id="c"
        )
        assert result.value == {"first": "alpha", "second": "beta", "third": "gamma"}
        times = {name: t for t, name, _ in seen}
        assert times["first"] < times["second"] < times["third"] < result.stream_done_at + 1e-9
        assert times["first"] < result.stream_done_at - 0.5  # long before decoding ended
        assert result.record is not None and result.record.incremental
        assert result.record.exposed_s == pytest.approx(0.0, abs=1e-6)

        seen.clear()
        baseline = await run_partial_tool(
            executor, "rec", tokens(text, 0.1), program_id="p", call_id="d", partial=False
        )
        assert baseline.value == result.value
        assert min(t for t, _, _ in seen) >= baseline.stream_done_at  # all after decoding

    run_virtual(main())


def test_partial_tool_reports_malformed_arguments() -> None:
    async def main() -> None:
        seen: list[tuple[float, str, Any]] = []
        registry = ToolRegistry()
        registry.register("rec", incremental=lambda: Recorder(seen))
        executor = ToolExecutor(registry)
        with pytest.raises(ToolArgumentError, match="not a complete JSON object"):
            await run_partial_tool(
                executor, "rec", tokens('{"a": 1, "b": [', 0.01), program_id="p", call_id="c"
            )
        assert [name for _, name, _ in seen] == ["a"]  # 'a' had already been delivered

    run_virtual(main())


def test_non_incremental_tool_runs_after_its_arguments_complete() -> None:
    async def main() -> None:
        registry = ToolRegistry()

        async def add(a: int, b: int) -> int:
            return a + b

        registry.register("add", add)
        executor = ToolExecutor(registry)
        out = await run_partial_tool(
            executor, "add", tokens('{"a": 2, "b": 40}', 0.01), program_id="p", call_id="c"
        )
        assert out.value == 42

    run_virtual(main())


def test_tool_finishes_when_its_input_closes_even_if_the_reply_goes_on() -> None:
    async def main() -> None:
        seen: list[tuple[float, str, Any]] = []
        registry = ToolRegistry()
        registry.register("rec", incremental=lambda: Recorder(seen))
        executor = ToolExecutor(registry)
        text = '{"a": 1, "b": 2}\nI called the tool with two arguments and will wait.'
        result = await run_partial_tool(
            executor, "rec", tokens(text, 0.1), program_id="p", call_id="c"
        )
        assert result.value == {"a": 1, "b": 2}
        assert result.text == text  # the whole reply was still collected
        assert result.finished_at < result.stream_done_at - 1.0  # no wait for the prose

    run_virtual(main())


class Stuck(IncrementalTool):
    """Takes its parts, then never finishes; records that it was closed."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def on_partial(self, name: str, value: Any) -> None:
        self.log.append(name)

    async def finish(self) -> None:
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.log.append("closed")


def test_incremental_tool_is_cut_at_its_timeout_after_the_input_ends() -> None:
    async def main() -> None:
        log: list[str] = []
        registry = ToolRegistry()
        registry.register("stuck", incremental=lambda: Stuck(log), timeout_s=2.0)
        executor = ToolExecutor(registry)
        result = run_partial_tool(
            executor, "stuck", tokens('{"a": 1, "b": 2}', 1.0), program_id="p", call_id="c"
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ToolTimeoutError, match="'stuck'.*timed out after 2 s"):
            await result
        assert loop.time() - t0 == pytest.approx(4.0 + 2.0)  # 4 chunks of input, then 2 s
        assert log == ["a", "b", "closed"]

    run_virtual(main())


def test_cancelling_the_program_closes_an_open_incremental_tool() -> None:
    async def main() -> None:
        log: list[str] = []
        registry = ToolRegistry()
        registry.register("stuck", incremental=lambda: Stuck(log))
        executor = ToolExecutor(registry)
        text = '{"a": 1, "b": 2, "c": 3, "d": 4}'
        task = asyncio.create_task(
            run_partial_tool(executor, "stuck", tokens(text, 1.0), program_id="p", call_id="c")
        )
        await asyncio.sleep(3.5)  # "a" delivered, the LLM still writing
        assert executor.cancel_program("p") == 1
        with pytest.raises(ToolCancelledError):
            await task
        assert log == ["a", "closed"]

    run_virtual(main())
