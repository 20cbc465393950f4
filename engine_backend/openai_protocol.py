"""The OpenAI wire format as `OpenAIHTTPEngine` speaks it: request bodies for
`/v1/completions` and `/v1/chat/completions`, and the pieces of their answers (text,
logprobs, tool calls, finish reasons) as engine types.

Structured tool calls of a chat answer (`tool_calls`, which vLLM returns for a required or
named `tool_choice`, or with its tool parser) become the `<tool_call>` blocks progserve's
chat route parses (`progserve/chat_template.py`, the Hermes format), so both kinds of
upstream reach the client the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .engine_rank import clamp_rank
from .types import FinishReason, FinishType, GenerateRequest, LogprobEntry

TOOL_OPEN = '<tool_call>\n{"name": '
TOOL_ARGS = ', "arguments": '
TOOL_CLOSE = "}\n</tool_call>"


@dataclass(slots=True, frozen=True)
class WireOptions:
    """What the upstream takes besides the standard fields (see `openai_upstream.py`)."""

    model: str
    continuous_usage: bool = False  # usage on every streamed chunk (vLLM, SGLang)
    cache_salt: bool = False  # `cache_salt` isolates prefix caching (vLLM)
    continue_chat: bool = False  # `continue_final_message` continues an answer (vLLM)
    priority: bool = False  # `priority` orders requests (vLLM --scheduling-policy priority)
    structured: bool = False  # `structured_outputs` constrains decoding (vLLM)


def vllm_priority(rank: float) -> int:
    """vLLM's `priority` (lower first, any int) for an engine rank: the rank itself."""
    return clamp_rank(rank)


def finish_reason(reason: str | None, completion_tokens: int,
                  stop_reason: Any = None) -> FinishReason:
    if reason == "length":
        return FinishReason(FinishType.LENGTH, length=completion_tokens)
    if reason == "abort":
        return FinishReason(FinishType.ABORT, message="aborted upstream")
    return FinishReason(FinishType.STOP, matched=stop_reason)  # stop, tool_calls


def cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


# ------------------------------------------------------------------------------ requests


def _common(request: GenerateRequest, opts: WireOptions, max_tokens: int,
            stream: bool) -> dict[str, Any]:
    s = request.sampling
    body: dict[str, Any] = {
        "model": opts.model,
        "max_tokens": max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True} \
            if opts.continuous_usage else {"include_usage": True}
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; only sent when asked for
    if request.cache_salt is not None and opts.cache_salt:
        body["cache_salt"] = request.cache_salt
    if opts.priority:
        body["priority"] = vllm_priority(request.priority)
    if opts.structured and (s.regex is not None or s.json_schema is not None):
        body["structured_outputs"] = {"regex": s.regex} if s.regex is not None \
            else {"json": json.loads(s.json_schema)}
    return body


def completion_body(request: GenerateRequest, opts: WireOptions, *, prompt: str | list[int],
                    max_tokens: int, stream: bool) -> dict[str, Any]:
    body = _common(request, opts, max_tokens, stream)
    body["prompt"] = prompt
    if request.return_logprob:
        body["logprobs"] = max(1, request.top_logprobs_num)
        body["echo"] = request.logprob_start_len >= 0
    return body


def chat_body(request: GenerateRequest, opts: WireOptions, *, answer_so_far: str,
              max_tokens: int, stream: bool) -> dict[str, Any]:
    """`answer_so_far`: the assistant's partial answer, which the upstream continues."""
    chat = request.chat
    assert chat is not None
    body = _common(request, opts, max_tokens, stream)
    messages = chat.messages
    if answer_so_far:
        messages = [*messages, {"role": "assistant", "content": answer_so_far}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    body["messages"] = messages
    if chat.tools:
        body["tools"] = chat.tools
    if chat.tool_choice is not None:
        body["tool_choice"] = chat.tool_choice
    if request.return_logprob:
        body["logprobs"] = True
        if request.top_logprobs_num:
            body["top_logprobs"] = request.top_logprobs_num
    return body


# ------------------------------------------------------------------------------ answers


def completion_logprobs(logprobs: dict[str, Any] | None, start: int = 0,
                        end: int | None = None) -> tuple[list[LogprobEntry],
                                                         list[list[LogprobEntry]] | None]:
    """`{tokens, token_logprobs, top_logprobs}` -> entries and the top alternatives at each
    position. The protocol has no token ids: they are -1."""
    if not logprobs:
        return [], None
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    stop = min(len(tokens), end if end is not None else len(tokens))
    entries = [(values[i], -1, tokens[i]) for i in range(start, stop)]
    tops = logprobs.get("top_logprobs")
    if not tops:
        return entries, None
    return entries, [[(lp, -1, text) for text, lp in (tops[i] or {}).items()]
                     for i in range(start, min(stop, len(tops)))]


def chat_logprobs(logprobs: dict[str, Any] | None
                  ) -> tuple[list[LogprobEntry], list[list[LogprobEntry]] | None]:
    """Chat's `{content: [{token, logprob, top_logprobs: [{token, logprob}]}]}`."""
    if not logprobs:
        return [], None
    content = logprobs.get("content") or []
    entries = [(item.get("logprob"), -1, item.get("token")) for item in content]
    if not any(item.get("top_logprobs") for item in content):
        return entries, None
    return entries, [[(top.get("logprob"), -1, top.get("token"))
                      for top in item.get("top_logprobs") or ()] for item in content]


class ToolCallText:
    """Streamed `delta.tool_calls` -> `<tool_call>` blocks: a call's name opens its block,
    argument fragments follow as they come, the next call or the end closes it."""

    __slots__ = ("_open", "_args")

    def __init__(self) -> None:
        self._open: int | None = None
        self._args = False

    def feed(self, calls: list[dict[str, Any]]) -> str:
        out: list[str] = []
        for call in calls:
            index = call.get("index", 0)
            function = call.get("function") or {}
            if index != self._open:
                out.append(self.close())
                self._open, self._args = index, False
                out.append(TOOL_OPEN + json.dumps(function.get("name") or "") + TOOL_ARGS)
            arguments = function.get("arguments")
            if arguments:
                args = arguments if isinstance(arguments, str) else json.dumps(arguments)
                self._args = True
                out.append(args)
        return "".join(out)

    def close(self) -> str:
        if self._open is None:
            return ""
        self._open = None
        return ("" if self._args else "{}") + TOOL_CLOSE


def message_text(message: dict[str, Any]) -> str:
    """A whole chat answer's text: its content, then its tool calls as blocks."""
    if not message.get("tool_calls"):
        return message.get("content") or ""
    calls = ToolCallText()
    tools = calls.feed([{**c, "index": i} for i, c in enumerate(message.get("tool_calls") or ())])
    return (message.get("content") or "") + tools + calls.close()
