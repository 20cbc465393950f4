"""Parallel function calling for OpenAI-style `tool_calls`.

When one LLM response holds several tool calls for server-registered tools, they are
independent by construction (the model wrote them all before seeing any result), so they
run concurrently, each within its own tool's limits. One failing call never fails the
others: every call gets a result, and an error becomes a readable tool message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ToolArgumentError, ToolError
from .executor import ToolExecutor


@dataclass(slots=True)
class ToolCallResult:
    tool_call_id: str
    name: str
    ok: bool
    value: Any = None
    error: ToolError | None = None

    @property
    def content(self) -> str:
        """The text of the `role: "tool"` message sent back to the model."""
        if not self.ok:
            return json.dumps({"error": str(self.error)})
        return self.value if isinstance(self.value, str) else json.dumps(self.value, default=str)

    def to_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.tool_call_id, "content": self.content}


async def run_tool_calls(
    executor: ToolExecutor,
    tool_calls: Sequence[Mapping[str, Any] | Any],
    *,
    program_id: str = "anonymous",
    max_parallel: int | None = None,
) -> list[ToolCallResult]:
    """Run OpenAI `tool_calls` concurrently and return one result per call, in order.

    Each call is a dict (or an object with attributes, like the openai client's) holding
    `id` and `function: {name, arguments}` where `arguments` is a JSON string or a dict.
    Errors (unknown tool, bad arguments, timeout, failure) are captured per call;
    cancelling the caller cancels every call.
    """
    limit = asyncio.Semaphore(max_parallel or executor.config.max_parallel_tool_calls)

    async def one(index: int, call: Any) -> ToolCallResult:
        call_id = str(_field(call, "id") or f"call_{index}")
        function = _field(call, "function") or {}
        name = str(_field(function, "name") or "")
        try:
            args = _arguments(name, _field(function, "arguments"), call_id, program_id)
            async with limit:
                value = await executor.run(name, args, program_id=program_id, call_id=call_id)
        except ToolError as exc:
            return ToolCallResult(call_id, name, ok=False, error=exc)
        return ToolCallResult(call_id, name, ok=True, value=value)

    return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(tool_calls))))


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _arguments(name: str, raw: Any, call_id: str, program_id: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        args = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ToolArgumentError(
            name, f"arguments are not valid JSON: {exc}", call_id=call_id, program_id=program_id
        ) from None
    if not isinstance(args, dict):
        raise ToolArgumentError(
            name, "arguments must be a JSON object", call_id=call_id, program_id=program_id
        )
    return args
