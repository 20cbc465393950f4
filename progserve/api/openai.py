"""OpenAI-compatible proxy: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Every call goes through the scheduler as a call of its program. The program comes from
`X-Program-Id` (or the body's `metadata.program_id`); untagged calls are single-call
programs. OpenAI's `user` (an end-user id for abuse monitoring, any string) is accepted
and names no program: one end user may run many conversations at once, and a program
cancelled under a user's name would otherwise refuse every later call from that user. `X-Thread-Id`, `X-Parent-Call-Ids` (or `X-Parent-Calls`) place the
call in the program's graph, `X-Call-Id` names it, and `X-Program-End: true` ends the
program once the call is done. Answers carry `X-Program-Id` and `X-Call-Id` headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine_backend.types import (
    ChatPrompt,
    FinishReason,
    FinishType,
    GenerateRequest,
    LogprobEntry,
    SamplingParams,
)

from ..chat_template import (
    ToolCall,
    ToolCallStreamParser,
    forced_tool_call_schema,
    forced_tools,
    parse_tool_calls,
)
from ..config import LimitsConfig
from ..errors import BadRequestError, NotFoundError
from ..runtime import ServerRuntime
from .calls import (
    CallOutput,
    CallStreams,
    ScheduledCall,
    answer_all,
    check_batch,
    start_all,
    start_streaming,
)
from .common import (
    SSE_DONE,
    ProgramIdentity,
    json_response,
    new_id,
    program_identity,
    read_model,
    request_body,
    runtime_of,
    sse,
    sse_error,
    sse_response,
    tenant_of,
)
from .openai_wire import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    ToolChoiceNamed,
)

router = APIRouter(tags=["openai"])


# --------------------------------------------------------------------------- shared


def finish_reason_text(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    if reason.type is FinishType.LENGTH:
        return "length"
    if reason.type is FinishType.ABORT:
        return "abort"
    return "stop"


def usage_json(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def check_limits(limits: LimitsConfig, max_tokens: int | None, prompt_chars: int) -> None:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise BadRequestError(f"max_tokens {max_tokens} is over this server's limit of "
                              f"{limits.max_tokens}", param="max_tokens")
    if prompt_chars > limits.max_prompt_chars:
        raise BadRequestError(f"the prompt has {prompt_chars} characters, over the limit of "
                              f"{limits.max_prompt_chars}", param="messages")


def sampling_for(body: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                 extra_stops: list[str], json_schema: str | None = None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=-1 if body.top_k in (None, 0) else body.top_k,
        stop=list(body.stop or []) + extra_stops,  # type: ignore[arg-type]
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        json_schema=json_schema,
    )


def require_logprobs(runtime: ServerRuntime, param: str) -> None:
    if not runtime.capabilities.logprobs:
        raise BadRequestError(f"the {runtime.settings.engine} engine cannot return logprobs",
                              param=param, code="logprobs_unsupported")


def check_model(runtime: ServerRuntime, name: str) -> None:
    """404 `model_not_found` for a model this server does not serve, as OpenAI answers
    (accepted: `ServerRuntime.served_model_names`). An empty name (a client that sends none)
    is the served model."""
    names = runtime.model_names
    if not name or names is None or name in names:
        return
    raise NotFoundError(f"The model `{name}` does not exist. This server serves "
                        f"`{runtime.model_name}`.", param="model", code="model_not_found")


def _json_schema_for(response_format: ResponseFormat | None) -> str | None:
    """The engine's `json_schema` for a (validated) `response_format`."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema is None:
        return '{"type": "object"}'
    return json.dumps(response_format.json_schema.json_schema)


def _output_schema(runtime: ServerRuntime, response_format: dict[str, Any] | None,
                   tools: list[dict[str, Any]] | None,
                   tool_choice: str | dict[str, Any] | None) -> str | None:
    """The JSON schema the answer must follow: `response_format`'s, or, when `tool_choice`
    forces a call, one that only a call of the allowed tools matches. A forced call is
    enforced with constrained decoding, or by an upstream that serves chat itself (it gets
    `tool_choice`: vLLM enforces a named or required one), or refused (400), never
    silently ignored."""
    forced = forced_tools(tools, tool_choice) if tools else None
    if forced and runtime.capabilities.chat and _json_schema_for(response_format) is None:
        return None  # the upstream enforces it (`GenerateRequest.chat.tool_choice`)
    if not forced:
        return _json_schema_for(response_format)
    if _json_schema_for(response_format) is not None:
        raise BadRequestError("a tool_choice that forces a call cannot be combined with a "
                              "JSON response_format", param="tool_choice")
    if not runtime.capabilities.constrained_decoding:
        raise BadRequestError(f"the {runtime.settings.engine} engine cannot constrain its "
                              "output, so it cannot enforce tool_choice "
                              f"{json.dumps(tool_choice)}; use \"auto\"",
                              param="tool_choice", code="tool_choice_unsupported")
    return forced_tool_call_schema(forced)


# --------------------------------------------------------------------------- models


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    tenant_of(request)  # authenticates
    runtime = runtime_of(request)
    info = runtime.model_info
    return json_response({
        "object": "list",
        "data": [{
            "id": runtime.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "progserve",
            "root": info.model_path,
            "max_model_len": info.max_context_len,
        }],
    })


# --------------------------------------------------------------------------- chat


def _chat_logprob(entry: LogprobEntry) -> dict[str, Any]:
    lp, _tid, text = entry
    return {"token": text or "", "logprob": lp if lp is not None else 0.0,
            "bytes": list((text or "").encode())}


def _chat_logprobs(entries: list[LogprobEntry],
                   tops: list[list[LogprobEntry]] | None = None) -> dict[str, Any]:
    return {"content": [
        {**_chat_logprob(entry),
         "top_logprobs": [_chat_logprob(top) for top in tops[i]] if tops and i < len(tops)
         else []}
        for i, entry in enumerate(entries)
    ]}


def _chat_prompt(messages: list[ChatMessage], rendered: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None,
                 tool_choice: str | dict[str, Any] | None) -> ChatPrompt:
    upstream = _upstream_messages(messages, rendered)
    if tools or tool_choice is not None:
        return ChatPrompt(messages=upstream, tools=tools, tool_choice=tool_choice)
    return ChatPrompt(messages=upstream)


def _upstream_messages(messages: list[ChatMessage],
                       rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as an OpenAI-compatible upstream takes them: tool-call arguments as
    JSON text (the template takes objects too)."""
    for m in messages:
        if m.tool_calls:
            break
    else:
        return rendered
    out = []
    for message in rendered:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                   if isinstance(c["function"]["arguments"], str)
                                   else json.dumps(c["function"]["arguments"])}}
                for c in calls]}
        out.append(message)
    return out


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    tenant = tenant_of(request)
    runtime = runtime_of(request)
    body = await read_model(request, ChatCompletionRequest)
    check_model(runtime, body.model)
    limits = runtime.settings.limits
    max_tokens = body.requested_max_tokens
    # Tools are shown even under tool_choice "none" (the prompt, and so its cached prefix,
    # stays the same from turn to turn); calls are read from the answer only when allowed.
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] or None
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, ToolChoiceNamed) \
        else body.tool_choice
    messages = [m.to_template() for m in body.messages]
    # `text` is progserve's rendering (routing estimates, engines that take text); `chat`
    # lets an engine that serves chat (an upstream) apply the model's own template.
    prompt = runtime.chat_template.render(messages, tools, tool_choice)
    chat = _chat_prompt(body.messages, messages, tools, tool_choice) \
        if runtime.capabilities.chat else None
    # Both fields are capped, the one that counts and the one it overrides.
    check_limits(limits, max(body.max_tokens or 0, body.max_completion_tokens or 0), len(prompt))
    if body.logprobs:
        require_logprobs(runtime, "logprobs")
    sampling = sampling_for(body, limits.default_max_tokens if max_tokens is None else max_tokens,
                            runtime.chat_template.stop,
                            _output_schema(runtime, body.response_format, tools, tool_choice))
    rid = new_id("chatcmpl")
    gen = GenerateRequest(rid=rid, text=prompt, sampling=sampling, return_logprob=body.logprobs,
                          top_logprobs_num=body.top_logprobs or 0, stream=body.stream)
    if chat is not None:  # set after: validating an explicit None costs more than this
        gen.chat = chat
    identity = program_identity(request.headers, body.metadata)
    call = await ScheduledCall.start(runtime, tenant, identity, gen)
    tool_names = {t["function"]["name"] for t in tools} if tools and body.uses_tools else None
    if body.stream:
        await start_streaming(request, [call])
        return sse_response(_chat_events(runtime, call, body, tool_names), call.headers)
    (out,) = await answer_all(request, [call])
    return json_response(_chat_body(runtime, rid, body, out, tool_names), headers=call.headers)


def _chat_body(runtime: ServerRuntime, rid: str, body: ChatCompletionRequest, out: CallOutput,
               tool_names: set[str] | None) -> dict[str, Any]:
    content: str | None = out.text
    calls: list[ToolCall] = []
    if tool_names:
        content, calls = parse_tool_calls(out.text, tool_names)
        if calls and not body.parallel_tool_calls:
            calls = calls[:1]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = finish_reason_text(out.finish_reason)
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
        finish = "tool_calls"
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": runtime.model_name,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(out.output_logprobs, out.output_top_logprobs)
            if body.logprobs else None,
            "finish_reason": finish,
        }],
        "usage": usage_json(out.prompt_tokens, out.completion_tokens, out.cached_tokens),
    }


async def _chat_events(runtime: ServerRuntime, call: ScheduledCall, body: ChatCompletionRequest,
                       tool_names: set[str] | None) -> AsyncIterator[bytes]:
    created = int(time.time())
    head = {"id": call.rid, "object": "chat.completion.chunk", "created": created,
            "model": runtime.model_name}

    def event(delta: dict[str, Any], finish: str | None = None,
              logprobs: list[LogprobEntry] | None = None,
              tops: list[list[LogprobEntry]] | None = None) -> bytes:
        choice = {"index": 0, "delta": delta,
                  "logprobs": _chat_logprobs(logprobs, tops) if logprobs else None,
                  "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    parser = ToolCallStreamParser(tool_names) if tool_names else None
    n_calls = 0
    # One write per engine chunk: the role event rides with the first chunk's events, and
    # the last chunk's events carry the finish, the usage and [DONE].
    pending = [event({"role": "assistant", "content": ""})]
    try:
        out = CallOutput()
        async for chunk in call.chunks():
            out.add(chunk)
            pieces: list[str | ToolCall] = parser.feed(chunk.text) if parser else \
                ([chunk.text] if chunk.text else [])
            if chunk.finished and parser:
                pieces += parser.finish()
            logprobs = chunk.output_logprobs if body.logprobs else None
            tops = chunk.output_top_logprobs
            for piece in pieces:
                if isinstance(piece, str):
                    pending.append(event({"content": piece}, logprobs=logprobs, tops=tops))
                    logprobs = None
                elif n_calls == 0 or body.parallel_tool_calls:
                    pending.append(event({"tool_calls": [piece.to_openai(index=n_calls)]}))
                    n_calls += 1
            if logprobs:
                pending.append(event({}, logprobs=logprobs, tops=tops))
            if not chunk.finished and pending:
                yield b"".join(pending)
                pending = []
        finish = "tool_calls" if n_calls else finish_reason_text(out.finish_reason)
        pending.append(event({}, finish))
        if body.stream_options and body.stream_options.include_usage:
            pending.append(sse({**head, "choices": [], "usage": usage_json(
                out.prompt_tokens, out.completion_tokens, out.cached_tokens)}))
        await call.end_program_if_asked()
    except Exception as exc:  # noqa: BLE001 - reported in-band: headers are already sent
        pending.append(sse_error(exc))
    finally:
        await call.close()
    yield b"".join(pending) + SSE_DONE


# --------------------------------------------------------------------------- completions


def _completion_logprobs(entries: list[LogprobEntry], offset: int = 0,
                         tops: list[list[LogprobEntry]] | None = None) -> dict[str, Any]:
    tokens, values, offsets = [], [], []
    for lp, _tid, text in entries:
        tokens.append(text or "")
        values.append(lp)
        offsets.append(offset)
        offset += len(text or "")
    top_logprobs = [{text or "": lp for lp, _tid, text in top} for top in tops] if tops \
        else None
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top_logprobs,
            "text_offset": offsets}


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(request: Request) -> Response:
    tenant = tenant_of(request)
    runtime = runtime_of(request)
    body = await read_model(request, CompletionRequest)
    check_model(runtime, body.model)
    limits = runtime.settings.limits
    prompts = body.prompts()
    check_batch(runtime, len(prompts), "prompt")
    check_limits(limits, body.max_tokens,
                 max(len(p) if isinstance(p, str) else len(p) * 4 for p in prompts))
    want_logprobs = body.logprobs is not None
    if want_logprobs:
        require_logprobs(runtime, "logprobs")
    if any(not isinstance(p, str) for p in prompts) and not runtime.capabilities.token_ids:
        raise BadRequestError(f"the {runtime.settings.engine} engine takes text prompts only",
                              param="prompt")
    sampling = sampling_for(body, limits.default_max_tokens if body.max_tokens is None
                            else body.max_tokens, [])
    rid = new_id("cmpl")
    identity = program_identity(request.headers, body.metadata)
    calls = await _start_completion_calls(runtime, tenant, identity, rid, prompts, body,
                                          sampling)
    if body.stream:
        streams = await start_streaming(request, calls)
        return sse_response(_completion_events(runtime, rid, streams, prompts, body),
                            calls[0].headers)
    outs = await answer_all(request, calls)
    choices = [_completion_choice(i, prompts[i], out, body) for i, out in enumerate(outs)]
    return json_response({
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": runtime.model_name,
        "choices": choices,
        "usage": usage_json(sum(o.prompt_tokens for o in outs),
                            sum(o.completion_tokens for o in outs),
                            sum(o.cached_tokens for o in outs)),
    }, headers=calls[0].headers)


async def _start_completion_calls(runtime: ServerRuntime, tenant: str, identity: ProgramIdentity,
                                  rid: str, prompts: list[str | list[int]],
                                  body: CompletionRequest, sampling: SamplingParams
                                  ) -> list[ScheduledCall]:
    """One scheduled call per prompt; the calls of one request are siblings in the
    caller's program (each with its own call id)."""
    want_logprobs = body.logprobs is not None

    def call(i: int, prompt: str | list[int]) -> tuple[ProgramIdentity, GenerateRequest]:
        gen = GenerateRequest(
            rid=rid if len(prompts) == 1 else f"{rid}-{i}",
            text=prompt if isinstance(prompt, str) else None,
            input_ids=prompt if not isinstance(prompt, str) else None,
            sampling=sampling,
            return_logprob=want_logprobs,
            logprob_start_len=0 if (want_logprobs and body.echo) else -1,
            top_logprobs_num=body.logprobs or 0,
            stream=body.stream,
        )
        ident = identity
        if len(prompts) > 1 and identity.call_id is not None:
            ident = replace(identity, call_id=f"{identity.call_id}-{i}")
        return ident, gen

    return await start_all(runtime, tenant, (call(i, p) for i, p in enumerate(prompts)))


def _echo_text(prompt: str | list[int], out: CallOutput) -> str:
    if isinstance(prompt, str):
        return prompt
    return "".join(t or "" for _, _, t in out.input_logprobs or ())


def _completion_choice(index: int, prompt: str | list[int], out: CallOutput,
                       body: CompletionRequest) -> dict[str, Any]:
    text = (_echo_text(prompt, out) if body.echo else "") + out.text
    logprobs = None
    if body.logprobs is not None:
        entries = (list(out.input_logprobs or ()) if body.echo else []) + out.output_logprobs
        tops = None
        if out.output_top_logprobs and (not body.echo or out.input_top_logprobs):
            tops = (list(out.input_top_logprobs or ()) if body.echo else []) + \
                out.output_top_logprobs
        logprobs = _completion_logprobs(entries, tops=tops)
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": finish_reason_text(out.finish_reason)}


async def _completion_events(runtime: ServerRuntime, rid: str, streams: CallStreams,
                             prompts: list[str | list[int]], body: CompletionRequest
                             ) -> AsyncIterator[bytes]:
    calls = streams.calls
    head = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": runtime.model_name}
    outs = [CallOutput() for _ in calls]
    offsets = [0] * len(calls)
    open_calls = len(calls)
    pending: list[bytes] = []  # the last call's final event goes out with [DONE]
    try:
        if body.echo:
            for i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    offsets[i] = len(prompt)
                    pending.append(sse({**head, "choices": [{
                        "index": i, "text": prompt, "logprobs": None, "finish_reason": None}]}))
        async for index, item in streams:
            if item is None:
                continue  # completions calls are not abortable by rid
            outs[index].add(item)
            logprobs = None
            if body.logprobs is not None and item.output_logprobs:
                logprobs = _completion_logprobs(item.output_logprobs, offsets[index],
                                                item.output_top_logprobs)
            offsets[index] += len(item.text)
            if item.text or logprobs or item.finished:
                pending.append(sse({**head, "choices": [{
                    "index": index, "text": item.text, "logprobs": logprobs,
                    "finish_reason": finish_reason_text(item.finish_reason)}]}))
            open_calls -= item.finished
            if open_calls and pending:
                yield b"".join(pending)
                pending = []
        if body.stream_options and body.stream_options.include_usage:
            pending.append(sse({**head, "choices": [], "usage": usage_json(
                sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs),
                sum(o.cached_tokens for o in outs))}))
        await calls[0].end_program_if_asked()
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
        pending.append(sse_error(exc))
    finally:
        await streams.aclose()  # the client may be gone: it still cleans up
    yield b"".join(pending) + SSE_DONE
