"""Native program API: submit a whole program graph, grow it, read its state and
variables, end or cancel it. A tenant sees only its own programs (others' are 404).

    POST   /v1/programs                          submit a ProgramSpec -> {"program_id"}
    GET    /v1/programs                          this tenant's programs (summaries)
    GET    /v1/programs/{id}                     state: calls, variables, history
    POST   /v1/programs/{id}/calls               add calls (dynamic programs)
    GET    /v1/programs/{id}/variables/{name}    wait for a value (?timeout=s), or
                                                 ?stream=true: SSE of its deltas
    POST   /v1/programs/{id}/end                 end: no new calls, retained KV released
    DELETE /v1/programs/{id}                     cancel it and everything in flight

Errors are RFC 9457 problem JSON (`application/problem+json`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from scheduler.spec import CallSpec, ProgramSpec

from ..errors import BadRequestError, NotFoundError, RequestTimeoutError
from .common import (
    SSE_DONE,
    close_quietly,
    json_response,
    read_model,
    request_body,
    runtime_of,
    sse,
    sse_error,
    sse_response,
    tenant_of,
)

router = APIRouter(prefix="/v1/programs", tags=["programs"])

PROBLEM_PREFIX = "/v1/programs"


class AddCallsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calls: list[CallSpec] = Field(min_length=1)


def _check_tools(request: Request, calls: list[CallSpec]) -> None:
    """Tools come from the server's allowlist: an unknown name is a 400 now, not a failed
    call later."""
    registry = getattr(runtime_of(request).tools, "registry", None)
    if registry is None:
        return
    for call in calls:
        if call.kind == "tool" and call.tool not in registry:
            raise BadRequestError(
                f"call {call.id!r}: unknown tool {call.tool!r}; this server offers "
                f"{sorted(registry.names())}", param="calls", code="unknown_tool")


def _check_limits(request: Request, calls: list[CallSpec], inputs: dict[str, str]) -> None:
    """The same caps as the OpenAI and SGLang entrances (`settings.limits`)."""
    limits = runtime_of(request).settings.limits
    for call in calls:
        max_new = call.sampling.max_new_tokens
        if max_new > limits.max_tokens:
            raise BadRequestError(f"call {call.id!r}: max_new_tokens {max_new} is over this "
                                  f"server's limit of {limits.max_tokens}", param="calls")
        if call.prompt_chars() > limits.max_prompt_chars:
            raise BadRequestError(f"call {call.id!r}: prompt over the limit of "
                                  f"{limits.max_prompt_chars} characters", param="calls")
    for name, value in inputs.items():
        if len(value) > limits.max_prompt_chars:
            raise BadRequestError(f"input {name!r} over the limit of {limits.max_prompt_chars} "
                                  "characters", param="inputs")


@router.post("", status_code=201, openapi_extra=request_body(ProgramSpec))
async def submit_program(request: Request) -> Response:
    tenant = tenant_of(request)
    spec = await read_model(request, ProgramSpec)
    _check_tools(request, spec.calls)
    _check_limits(request, spec.calls, spec.inputs)
    program_id = await runtime_of(request).scheduler.submit_program(spec, tenant=tenant)
    return json_response({"program_id": program_id}, status=201,
                         headers={"X-Program-Id": program_id,
                                  "Location": f"/v1/programs/{program_id}"})


@router.get("")
async def list_programs(request: Request) -> Response:
    tenant = tenant_of(request)
    programs = runtime_of(request).scheduler.list_programs(tenant=tenant)
    return json_response({"object": "list",
                          "data": [p.model_dump(mode="json") for p in programs]})


@router.get("/{program_id}")
async def program_state(program_id: str, request: Request) -> Response:
    tenant = tenant_of(request)
    state = runtime_of(request).scheduler.program_state(program_id, tenant=tenant)
    return json_response(state.model_dump(mode="json"))


@router.post("/{program_id}/calls", openapi_extra=request_body(AddCallsRequest))
async def add_calls(program_id: str, request: Request) -> Response:
    tenant = tenant_of(request)
    body = await read_model(request, AddCallsRequest)
    _check_tools(request, body.calls)
    _check_limits(request, body.calls, {})
    await runtime_of(request).scheduler.add_calls(program_id, body.calls, tenant=tenant)
    return json_response({"program_id": program_id, "added": [c.id for c in body.calls]})


@router.get("/{program_id}/variables/{name}")
async def get_variable(
    program_id: str,
    name: str,
    request: Request,
    stream: bool = Query(False, description="SSE of the value's deltas"),
    timeout: float | None = Query(None, gt=0, le=3600, description="seconds to wait"),
) -> Response:
    tenant = tenant_of(request)
    scheduler = runtime_of(request).scheduler
    # Check now, so an unknown program or variable is a plain 404 even for a stream.
    if name not in scheduler.program_state(program_id, tenant=tenant).variables:
        raise NotFoundError(f"program {program_id!r} has no variable {name!r}",
                            code="variable_not_found")
    if stream:
        deltas = scheduler.stream_variable(program_id, name, tenant=tenant)
        return sse_response(_variable_events(deltas), {"X-Program-Id": program_id})
    try:
        value = await scheduler.wait_variable(program_id, name, tenant=tenant, timeout=timeout)
    except TimeoutError as exc:
        raise RequestTimeoutError(f"variable {name!r} of program {program_id!r} has no value "
                                  f"after {timeout} s") from exc
    return json_response({"program_id": program_id, "name": name, "value": value})


async def _variable_events(deltas: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """`data: {"delta": "..."}` per piece, then `data: [DONE]`."""
    try:
        async for delta in deltas:
            yield sse({"delta": delta})
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
        yield sse_error(exc)
    finally:
        await close_quietly(deltas)
    yield SSE_DONE


@router.post("/{program_id}/end")
async def end_program(program_id: str, request: Request) -> Response:
    tenant = tenant_of(request)
    await runtime_of(request).scheduler.end_program(program_id, tenant=tenant)
    return json_response({"program_id": program_id, "status": "ended"})


@router.delete("/{program_id}")
async def cancel_program(program_id: str, request: Request) -> Response:
    tenant = tenant_of(request)
    await runtime_of(request).scheduler.cancel_program(program_id, tenant=tenant)
    return json_response({"program_id": program_id, "status": "cancelled"})
