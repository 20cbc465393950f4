"""Chat messages -> the prompt text a model was trained on.

The model's own Jinja chat template when it has one (`ModelInfo.chat_template`, Hugging
Face style, rendered in a sandbox), else a built-in ChatML template. Both describe tools
and earlier tool calls the Hermes way (Qwen 2.5, Hermes 2/3 and most open tool-calling
models were trained on it) when the model's template has no place for them: a template
that never reads `tools` (SmolLM2's, for one) would drop the tool definitions, and one
that never reads `tool_calls` would render an earlier call as an empty assistant turn.
Then the definitions go into the system message as a `<tools>` block, earlier calls into
their assistant turn as `<tool_call>` blocks, and tool results into a user turn as
`<tool_response>` blocks, which is what the built-in template does too.

Rendering lives here, beside the engines, because the template is the model's: the OpenAI
proxy renders chat requests with it and the scheduler renders message-form program calls
with it, so both produce the same text for the same messages (and share cached prefixes).

How a rendering ends:
- `add_generation_prompt=True` (default): the assistant's turn is opened, ready to generate;
- `add_generation_prompt=False`: the messages only (a prefix that later turns extend);
- `continue_final_message=True`: the last message (an assistant's partial answer) is left
  open, so generation continues it (Hugging Face's `continue_final_message`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from .errors import InvalidRequestError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
DEFAULT_SYSTEM = "You are a helpful assistant."

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
_READS_TOOLS = re.compile(r"\btools\b")

Messages = list[dict[str, Any]]


class ChatTemplate:
    """Renders OpenAI-style messages (dicts with role, content, tool_calls, ...)."""

    def __init__(self, source: str | None = None):
        self._jinja = _compile_jinja(source) if source and _looks_like_jinja(source) else None
        source = source or ""
        # Whether the model's template has a place for tools and for earlier tool calls;
        # where it has none, the Hermes blocks stand in (module docstring).
        self._shows_tools = self._jinja is not None and bool(_READS_TOOLS.search(source))
        self._shows_tool_calls = self._jinja is not None and "tool_calls" in source
        self.stop: list[str] = [] if self._jinja else [IM_END]

    @property
    def is_builtin(self) -> bool:
        return self._jinja is None

    def render(
        self,
        messages: Messages,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        if not messages:
            raise InvalidRequestError("`messages` must not be empty")
        if continue_final_message:
            return self._continue(messages, tools, tool_choice)
        if self._jinja is None:
            return _render_chatml(messages, tools, tool_choice, add_generation_prompt)
        messages = self._hermes_fallback(messages, tools, tool_choice)
        return self._render_jinja(messages, tools if self._shows_tools else None,
                                  add_generation_prompt)

    def _continue(self, messages: Messages, tools: list[dict[str, Any]] | None,
                  tool_choice: str | dict[str, Any] | None) -> str:
        """The rendering cut right after the last message's content, so generation goes
        on from there (an empty partial answer is the plain generation prompt)."""
        last = messages[-1]
        if last.get("role") != "assistant":
            raise InvalidRequestError("only an assistant message can be continued")
        partial = last.get("content") or ""
        if not partial:
            return self.render(messages[:-1], tools, tool_choice)
        rendered = self.render(messages, tools, tool_choice, add_generation_prompt=False)
        end = rendered.rfind(partial)
        if end < 0:
            raise InvalidRequestError("the chat template does not render the final "
                                      "message's content verbatim, so it cannot be continued")
        return rendered[: end + len(partial)]

    def _hermes_fallback(self, messages: Messages, tools: list[dict[str, Any]] | None,
                         tool_choice: str | dict[str, Any] | None) -> Messages:
        if not self._shows_tool_calls:
            messages = hermes_tool_turns(messages)
        if tools and not self._shows_tools:
            messages = with_tools_in_system(messages, tools, tool_choice)
        # Templates concatenate `content`: a missing one must not break them.
        return [m if m.get("content") is not None else {**m, "content": ""} for m in messages]

    def _render_jinja(self, messages: Messages, tools: list[dict[str, Any]] | None,
                      add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._jinja.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token="",
                eos_token="",
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}") from exc


def _looks_like_jinja(source: str) -> bool:
    return "{%" in source or "{{" in source


@lru_cache(maxsize=16)
def compiled_template(source: str | None) -> ChatTemplate:
    """The template for a model's template source, compiled once (Jinja compilation takes
    milliseconds; the scheduler renders every message-form call with it)."""
    return ChatTemplate(source)


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


# ------------------------------------------------------------------- the Hermes blocks


def tools_block(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None) -> str:
    """The Hermes description of the tools (what goes into the system message)."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = _TOOLS_PREAMBLE + signatures + _TOOLS_INSTRUCTIONS
    if tool_choice == "none":
        text += "\n\nDo not call a function now: answer in words."
    elif tool_choice == "required":
        text += "\n\nYou must call at least one function."
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        text += f"\n\nYou must call the function `{name}`."
    return text


def tool_call_block(tool_call: dict[str, Any]) -> str:
    """An earlier tool call (OpenAI shape) as a `<tool_call>` block."""
    function = tool_call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass  # keep the client's text as given
    payload = json.dumps({"name": function.get("name"), "arguments": arguments},
                         ensure_ascii=False)
    return f"{TOOL_OPEN}\n{payload}\n{TOOL_CLOSE}"


def with_tools_in_system(messages: Messages, tools: list[dict[str, Any]],
                         tool_choice: str | dict[str, Any] | None) -> Messages:
    """The tools block appended to the system message (one is added if there is none)."""
    block = tools_block(tools, tool_choice)
    if messages[0].get("role") in ("system", "developer"):
        system = messages[0].get("content") or DEFAULT_SYSTEM
        return [{**messages[0], "role": "system", "content": f"{system}\n\n{block}"},
                *messages[1:]]
    return [{"role": "system", "content": f"{DEFAULT_SYSTEM}\n\n{block}"}, *messages]


def hermes_tool_turns(messages: Messages) -> Messages:
    """Assistant tool calls as `<tool_call>` blocks in their content, and each run of tool
    results as one user turn of `<tool_response>` blocks, as Hermes models expect."""
    out: Messages = []
    i = 0
    while i < len(messages):
        message = messages[i]
        role = message.get("role")
        if role == "tool":
            responses = []
            while i < len(messages) and messages[i].get("role") == "tool":
                responses.append(f"<tool_response>\n{messages[i].get('content') or ''}\n"
                                 "</tool_response>")
                i += 1
            out.append({"role": "user", "content": "\n".join(responses)})
            continue
        if role == "assistant" and message.get("tool_calls"):
            content = message.get("content") or ""
            blocks = [tool_call_block(tc) for tc in message["tool_calls"]]
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(([content] if content else []) + blocks)
        out.append(message)
        i += 1
    return out


def _render_chatml(messages: Messages, tools: list[dict[str, Any]] | None,
                   tool_choice: str | dict[str, Any] | None, add_generation_prompt: bool) -> str:
    messages = hermes_tool_turns(messages)
    if tools:
        messages = with_tools_in_system(messages, tools, tool_choice)
    elif messages[0].get("role") in ("system", "developer") and not messages[0].get("content"):
        messages = messages[1:]  # an empty system prompt says nothing
    parts = []
    for message in messages:
        role = message.get("role")
        if role == "developer":
            role = "system"
        parts.append(f"{IM_START}{role}\n{message.get('content') or ''}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
