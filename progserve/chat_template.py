"""The proxy's tool-calling contract: the model's text -> tool calls, and `tool_choice` ->
the constraint that enforces it. (Rendering messages into a prompt is the model's
business: `engine_backend/chat_template.py`.)

Tool calls in the output, in either documented format:

1. Hermes blocks, anywhere in the text:
       <tool_call>
       {"name": "get_weather", "arguments": {"city": "Paris"}}
       </tool_call>
   One block per call; several blocks are parallel tool calls. Text outside the blocks
   is the message content.
2. A bare JSON answer (the whole output, when tools were offered): one object
   `{"name": ..., "arguments": {...}}` or a list of them.

`ToolCallStreamParser` finds the same calls incrementally, holding back only the text
that might still turn into a `<tool_call>` tag.

`tool_choice: "required"` or a named function is enforced with constrained decoding: the
answer must be one bare JSON call `{"name": ..., "arguments": {...}}` whose arguments
follow the function's parameter schema (`forced_tool_call_schema`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from engine_backend.chat_template import TOOL_CLOSE, TOOL_OPEN


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire format)
    id: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------ tool_choice


def forced_tools(tools: list[dict[str, Any]],
                 tool_choice: str | dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The tools one of which the answer must call: all of them for `"required"`, the named
    one for `{"type": "function", "function": {"name": ...}}`; None when the model may
    answer in text (`"auto"`, `"none"`, unset)."""
    if tool_choice == "required":
        return tools
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        return [t for t in tools if (t.get("function") or {}).get("name") == name]
    return None


def forced_tool_call_schema(tools: list[dict[str, Any]]) -> str:
    """A JSON schema that only a call of one of `tools` matches: the bare JSON form
    `{"name": <one of the names>, "arguments": <that function's parameters>}`."""
    variants = []
    for tool in tools:
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {"type": "object"}
        variants.append({
            "type": "object",
            "properties": {"name": {"const": function.get("name")}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return json.dumps(schema)


# ------------------------------------------------------------------------------ parsing


def _tool_call_from_obj(obj: Any, tool_names: set[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if tool_names is not None and name not in tool_names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False), new_tool_call_id())


def _parse_block(body: str, tool_names: set[str] | None) -> ToolCall | None:
    try:
        return _tool_call_from_obj(json.loads(body), tool_names)
    except ValueError:
        return None


def _parse_bare_json(text: str, tool_names: set[str] | None) -> list[ToolCall] | None:
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        obj = json.loads(stripped)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_tool_call_from_obj(item, tool_names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def parse_tool_calls(
    text: str, tool_names: set[str] | None = None
) -> tuple[str | None, list[ToolCall]]:
    """Split a finished output into (content, tool calls). Content is None when the
    output was nothing but tool calls."""
    parser = ToolCallStreamParser(tool_names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    if calls and not content.strip():
        return None, calls
    return content, calls


class ToolCallStreamParser:
    """Incremental tool-call extraction. `feed(delta)` returns content strings and
    completed `ToolCall`s in order; `finish()` flushes what is left."""

    __slots__ = ("_tool_names", "_buffer", "_in_block", "_bare_json", "_started", "_seen_call")

    def __init__(self, tool_names: set[str] | None = None):
        self._tool_names = tool_names
        self._buffer = ""
        self._in_block = False
        self._bare_json = False  # the output opened with `[` or `{`: decide at the end
        self._started = False  # some non-blank text was seen
        self._seen_call = False  # blank text between and after calls is dropped

    def feed(self, delta: str) -> list[str | ToolCall]:
        self._buffer += delta
        if not self._started:
            stripped = self._buffer.lstrip()
            if not stripped:
                return []
            self._started = True
            self._bare_json = stripped[0] in "[{"
        if self._bare_json:
            return []
        return self._drain()

    def _drain(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while True:
            if self._in_block:
                end = self._buffer.find(TOOL_CLOSE)
                if end < 0:
                    return out
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CLOSE):]
                self._in_block = False
                call = _parse_block(body, self._tool_names)
                if call is not None:
                    self._seen_call = True
                    out.append(call)
                else:
                    out.append(f"{TOOL_OPEN}{body}{TOOL_CLOSE}")
                continue
            start = self._buffer.find(TOOL_OPEN)
            if start >= 0:
                self._text(out, self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_OPEN):]
                self._in_block = True
                continue
            keep = _partial_tag_suffix(self._buffer, TOOL_OPEN)
            emit = self._buffer[: len(self._buffer) - keep]
            self._text(out, emit)
            self._buffer = self._buffer[len(emit):]
            return out

    def _text(self, out: list[str | ToolCall], text: str) -> None:
        if text and not (self._seen_call and not text.strip()):
            out.append(text)

    def finish(self) -> list[str | ToolCall]:
        if self._bare_json:
            calls = _parse_bare_json(self._buffer, self._tool_names)
            self._bare_json = False
            if calls is not None:
                self._buffer = ""
                return list(calls)
            out = self._drain()
        else:
            out = []
        rest = (TOOL_OPEN if self._in_block else "") + self._buffer
        self._buffer, self._in_block = "", False
        self._text(out, rest)
        return out


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
