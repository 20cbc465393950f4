"""SGLang-compatible native API: `/generate`, `/get_model_info`, `/get_server_info`,
`/flush_cache`, `/abort_request` (and SGLang's newer aliases `/model_info`,
`/server_info`). SGLang's own frontend (`sgl.RuntimeEndpoint`) runs against it unchanged.
Operator routes need an admin key (`progserve/auth.py`): `POST /flush_cache`, and the
server's load in `/get_server_info` (a tenant sees its own). Request ids are per tenant.

Wire format (SGLang 0.5.x): a streamed `/generate` sends `data: {...}` events whose `text`
and `output_ids` are *cumulative*, then `data: [DONE]`; `meta_info` has `id`,
`finish_reason` (null, then `{"type": "stop"|"length"|"abort", ...}`), `prompt_tokens`,
`completion_tokens`, `cached_tokens` and, with `return_logprob`, `input_token_logprobs`
and `output_token_logprobs` as `[[logprob, token_id, text_or_null], ...]`.

Every prompt is one call scheduled by progserve (tag it with `X-Program-Id` and friends
to make it part of a program). A client `priority` is accepted but progserve's policy
decides the order.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

import progserve
from engine_backend.types import GenerateRequest, LogprobEntry

from ..auth import Caller
from ..errors import BadRequestError
from ..runtime import ServerRuntime, tenant_rid
from .calls import (
    ABORTED,
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
    json_response,
    program_identity,
    random_hex,
    read_model,
    request_body,
    runtime_of,
    sse,
    sse_error,
    sse_response,
    tenant_of,
)
from .sglang_wire import AbortRequestInput, GenerateInput, GenerateItem

router = APIRouter(tags=["sglang"])

# --------------------------------------------------------------------------- info


@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(request: Request) -> Response:
    tenant_of(request)  # authenticates
    runtime = runtime_of(request)
    info = runtime.model_info
    return json_response({
        "model_path": runtime.model_name,
        "tokenizer_path": info.tokenizer_path or runtime.model_name,
        "is_generation": info.is_generation,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "max_context_len": info.max_context_len,
    })


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(request: Request) -> Response:
    """The server's load (`internal_states`) goes to admins only; a tenant sees its own."""
    runtime = runtime_of(request)
    caller = runtime.auth.caller_for(request.headers)
    settings = runtime.settings
    caps = runtime.capabilities
    return json_response({
        "version": progserve.__version__ if hasattr(progserve, "__version__") else "0.1.0",
        "server": "progserve",
        "model_path": runtime.model_name,
        "served_model_name": runtime.model_name,
        "context_length": runtime.model_info.max_context_len,
        "engine": settings.engine,
        "replicas": len(runtime.engines),
        "policy": settings.scheduler.policy,
        "enable_priority_scheduling": True,
        "capabilities": {
            "priority": caps.priority, "logprobs": caps.logprobs,
            "constrained_decoding": caps.constrained_decoding, "token_ids": caps.token_ids,
            "retention": caps.retention,
        },
        "internal_states": [await _load(request, caller)],
    })


async def _load(request: Request, caller: Caller) -> dict[str, Any]:
    admission = request.app.state.overload
    if not caller.admin:
        return admission.load(caller.tenant)
    stats = await runtime_of(request).scheduler.stats()
    return {"queued": stats.queued, "running": stats.running,
            "programs_open": stats.programs_open, **admission.load(None)}


@router.post("/flush_cache")
async def flush_cache(request: Request) -> Response:
    """Operator route: it drops every tenant's cache, so it takes an admin key (and a POST:
    a GET, which crawlers and prefetchers send freely, is a 405)."""
    runtime_of(request).auth.admin_for(request.headers)
    if await runtime_of(request).flush_cache():
        return PlainTextResponse("Cache flushed.\n")
    raise BadRequestError("cache not flushed: an engine refused (requests still running, or "
                          "the engine cannot flush)", code="flush_refused")


@router.post("/abort_request", openapi_extra=request_body(AbortRequestInput))
async def abort_request(request: Request) -> Response:
    tenant = tenant_of(request)
    body = await read_model(request, AbortRequestInput)
    registry = runtime_of(request).requests
    if body.abort_all:
        aborted = registry.abort_all(tenant)
    else:
        aborted = int(registry.abort(body.rid, tenant))
    # SGLang answers 200 whether or not the rid was known (an abort may race the finish).
    return json_response({"success": True, "aborted": aborted})


# --------------------------------------------------------------------------- generate


def _check(runtime: ServerRuntime, items: list[GenerateItem]) -> None:
    limits = runtime.settings.limits
    caps = runtime.capabilities
    for item in items:
        max_new = item.sampling.max_new_tokens
        if max_new is not None and max_new > limits.max_tokens:
            raise BadRequestError(f"max_new_tokens {max_new} is over this server's limit of "
                                  f"{limits.max_tokens}", param="sampling_params.max_new_tokens")
        if len(item.prompt) > limits.max_prompt_chars:
            raise BadRequestError(f"prompt over the limit of {limits.max_prompt_chars}",
                                  param="text")
        if item.return_logprob and not caps.logprobs:
            raise BadRequestError(f"the {runtime.settings.engine} engine cannot return logprobs",
                                  param="return_logprob", code="logprobs_unsupported")
        if not isinstance(item.prompt, str) and not caps.token_ids:
            raise BadRequestError(f"the {runtime.settings.engine} engine takes text only",
                                  param="input_ids", code="token_ids_unsupported")


def _engine_request(item: GenerateItem, rid: str, tenant: str, stream: bool
                    ) -> GenerateRequest:
    prompt = item.prompt
    return GenerateRequest(
        rid=tenant_rid(tenant, rid),
        text=prompt if isinstance(prompt, str) else None,
        input_ids=prompt if not isinstance(prompt, str) else None,
        sampling=item.sampling.to_engine(),
        return_logprob=item.return_logprob,
        logprob_start_len=item.logprob_start_len,
        top_logprobs_num=item.top_logprobs_num,
        stream=stream,
    )


@router.post("/generate", openapi_extra=request_body(GenerateInput))
@router.put("/generate", openapi_extra=request_body(GenerateInput))
async def generate(request: Request) -> Response:
    tenant = tenant_of(request)
    runtime = runtime_of(request)
    body = await read_model(request, GenerateInput)
    items = body.items()
    check_batch(runtime, len(items), "text")
    _check(runtime, items)
    # The client's rids (or new ones) name the answers; the engine sees them per tenant.
    rids = [item.rid or random_hex(16) for item in items]
    requests = [_engine_request(item, rid, tenant, body.stream)
                for item, rid in zip(items, rids, strict=True)]
    identity = program_identity(request.headers)
    calls = await start_all(runtime, tenant, [(identity, gen) for gen in requests],
                            abortable=True)
    started = time.perf_counter()
    if body.stream:
        streams = await start_streaming(request, calls)
        return sse_response(_events(streams, rids, items, body, started), calls[0].headers)
    outs = await answer_all(request, calls, abortable=True)
    results = [_item_json(rid, item, out, body.return_text_in_logprobs, started)
               for rid, item, out in zip(rids, items, outs, strict=True)]
    return json_response(results if body.is_batch else results[0], headers=calls[0].headers)


def _logprobs_json(entries: list[LogprobEntry] | None, with_text: bool) -> list[list[Any]]:
    if not entries:
        return []
    if with_text:
        return [[lp, tid, text] for lp, tid, text in entries]
    return [[lp, tid, None] for lp, tid, _ in entries]


def _meta(rid: str, item: GenerateItem, out: CallOutput, with_text: bool,
          started: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": out.finish_reason.to_json() if out.finish_reason else None,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens or len(out.token_ids),
        "cached_tokens": out.cached_tokens,
        "e2e_latency": time.perf_counter() - started,
    }
    if item.return_logprob:
        inputs = _logprobs_json(out.input_logprobs, with_text)
        outputs = _logprobs_json(out.output_logprobs, with_text)
        meta["input_token_logprobs"] = inputs
        meta["output_token_logprobs"] = outputs
        meta["input_top_logprobs"] = _top_logprobs_json(out.input_top_logprobs, len(inputs),
                                                        with_text)
        meta["output_top_logprobs"] = _top_logprobs_json(out.output_top_logprobs,
                                                         len(outputs), with_text)
    return meta


def _top_logprobs_json(tops: list[list[LogprobEntry]] | None, positions: int,
                       with_text: bool) -> list[list[list[Any]] | None]:
    """SGLang's shape: one list of `[logprob, token_id, text]` per position (None where
    the engine gave none, as SGLang does when top logprobs were not asked for)."""
    if not tops:
        return [None] * positions
    return [_logprobs_json(top, with_text) for top in tops] + \
        [None] * (positions - len(tops))


def _item_json(rid: str, item: GenerateItem, out: CallOutput, with_text: bool,
               started: float) -> dict[str, Any]:
    return {"text": out.text, "output_ids": out.token_ids,
            "meta_info": _meta(rid, item, out, with_text, started)}


async def _events(streams: CallStreams, rids: list[str], items: list[GenerateItem],
                  body: GenerateInput, started: float) -> AsyncIterator[bytes]:
    """Cumulative events, one per chunk of any prompt (`index` tells them apart in a
    batch), then `data: [DONE]`."""
    calls: list[ScheduledCall] = streams.calls
    batch = body.is_batch
    outs = [CallOutput() for _ in calls]
    with_text = body.return_text_in_logprobs
    open_calls = len(calls)
    tail = b""  # the very last event goes out together with [DONE]
    try:
        async for index, chunk in streams:
            out = outs[index]
            if chunk is None:  # aborted through /abort_request
                out.finish_reason = ABORTED
            else:
                out.add(chunk)
                if not (chunk.text or chunk.token_ids or chunk.finished):
                    continue
            event = _item_json(rids[index], items[index], out, with_text, started)
            if batch:
                event["index"] = index
            if chunk is None or chunk.finished:
                open_calls -= 1
                if not open_calls:
                    tail = sse(event)  # the streams end right after this
                    continue
            yield sse(event)
        await calls[0].end_program_if_asked()
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        tail += sse_error(exc)
    finally:
        await streams.aclose()
    yield tail + SSE_DONE
