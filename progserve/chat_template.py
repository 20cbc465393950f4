"""Chat messages -> prompt text, and the model's text -> tool calls.

Rendering: the model's own Jinja chat template when the engine reports one
(`ModelInfo.chat_template`, Hugging Face style, rendered in a sandbox), else a built-in
ChatML template that describes tools the Hermes way (Qwen 2.5, Hermes 2/3 and most
open tool-calling models were trained on it).

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
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"

_TOOLS_PREAMBLE = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request.\n\n"
    "The available function signatures are inside <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding the function's name and "
    "arguments inside <tool_call></tool_call> XML tags, one block per call:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n'
    "</tool_call>"
)


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


# ---------------------------------------------------------------------------- rendering


class ChatTemplate:
    """Renders OpenAI-style messages (dicts with role, content, tool_calls, ...)."""

    def __init__(self, source: str | None = None):
        self._jinja = _compile_jinja(source) if source and _looks_like_jinja(source) else None
        self.stop: list[str] = [] if self._jinja else [IM_END]

    @property
    def is_builtin(self) -> bool:
        return self._jinja is None

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
    ) -> str:
        if not messages:
            raise BadRequestError("`messages` must not be empty", param="messages")
        if self._jinja is not None:
            return self._render_jinja(messages, tools)
        return _render_chatml(messages, tools, tool_choice)

    def _render_jinja(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> str:
        import jinja2

        try:
            return self._jinja.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
            )
        except jinja2.TemplateError as exc:
            raise BadRequestError(f"the model's chat template rejected the messages: {exc}",
                                  param="messages") from exc


def _looks_like_jinja(source: str) -> bool:
    return "{%" in source or "{{" in source


def _compile_jinja(source: str) -> Any:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # jinja2 is optional: fall back to ChatML
        return None

    def raise_exception(message: str) -> None:
        import jinja2

        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _render_chatml(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
) -> str:
    parts: list[str] = []
    first = 0
    system = ""
    if messages[0].get("role") in ("system", "developer"):
        system = messages[0].get("content") or ""
        first = 1
    if tools:
        system = (system or "You are a helpful assistant.") + "\n\n" + _tools_block(
            tools, tool_choice
        )
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    i = first
    while i < len(messages):
        message = messages[i]
        role = message.get("role")
        if role == "tool":
            # Consecutive tool results go back in one user turn, as Hermes models expect.
            responses = []
            while i < len(messages) and messages[i].get("role") == "tool":
                responses.append(f"<tool_response>\n{messages[i].get('content') or ''}\n"
                                 "</tool_response>")
                i += 1
            parts.append(f"{IM_START}user\n" + "\n".join(responses) + f"{IM_END}\n")
            continue
        if role in ("system", "developer"):
            role = "system"
        content = message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = [_tool_call_block(tc) for tc in message["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        i += 1
    parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _tools_block(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None) -> str:
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = _TOOLS_PREAMBLE + signatures + _TOOLS_INSTRUCTIONS
    if tool_choice == "required":
        text += "\n\nYou must call at least one function."
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        text += f"\n\nYou must call the function `{name}`."
    return text


def _tool_call_block(tool_call: dict[str, Any]) -> str:
    function = tool_call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass  # keep the client's text as given
    payload = json.dumps({"name": function.get("name"), "arguments": arguments},
                         ensure_ascii=False)
    return f"{TOOL_OPEN}\n{payload}\n{TOOL_CLOSE}"


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
