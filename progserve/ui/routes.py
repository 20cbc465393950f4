"""Routes of the tracing UI: the page at `/ui`, its static files, and its JSON API.

- `GET /ui` -> the page; `GET /ui/static/...` -> its JS and CSS;
- `GET /ui/api/programs?limit=N` -> recent programs (status, tenant, calls, tokens,
  latency), newest first, from every replica when Redis is shared;
- `GET /ui/api/programs/{id}` -> one program: summary, calls (DAG edges and timings) and
  its spans.
A tenant sees only its own programs (see `Observability.visible_tenant`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from scheduler.errors import SchedulerError
from scheduler.views import ProgramState

from ..api.common import json_response
from ..auth import DEFAULT_TENANT
from ..errors import NotFoundError
from ..trace_store import program_key
from .program_view import merge_calls

if TYPE_CHECKING:
    from ..observability import Observability

STATIC_DIR = Path(__file__).parent / "static"


def _obs(request: Request) -> Observability:
    return request.app.state.observability


async def ui_index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def ui_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/")


async def list_programs(request: Request, limit: int = Query(200, ge=1, le=2000)) -> Response:
    obs = _obs(request)
    tenant = obs.visible_tenant(request.headers)
    programs = await obs.store.program_summaries(limit=limit, tenant=tenant)
    return json_response(
        {
            "instance": obs.store.instance_id,
            "shared": obs.store.shared,
            "redis_ok": obs.store.redis_ok,
            "programs": programs,
        }
    )


async def get_program(
    request: Request,
    program_id: str,
    tenant: str | None = Query(None, max_length=64, description="the program's tenant"),
) -> Response:
    obs = _obs(request)
    runtime = request.app.state.runtime
    visible = obs.visible_tenant(request.headers)
    if visible is not None and tenant not in (None, visible):
        raise NotFoundError(f"no program {program_id!r}", code="program_not_found")
    owner = visible or tenant or _find_owner(runtime, obs, program_id)
    key = program_key(owner, program_id)
    summary = await obs.store.program_summary(key)
    state = _local_state(runtime, program_id, owner)
    if summary is None and state is not None:
        summary = _summary_from_state(state)
    if summary is None:
        raise NotFoundError(f"no program {program_id!r}", code="program_not_found")
    spans = await obs.store.program_spans(key)
    calls = merge_calls(
        spans,
        obs.tracing.open_calls(key),
        state,
        asyncio.get_running_loop().time() if state is not None else None,
    )
    return json_response(
        {
            "program": summary,
            "trace_id": f"{obs.tracing.program_trace(key).trace_id:032x}",
            "now_ms": time.time() * 1e3,
            "calls": calls,
            "spans": spans,
        }
    )


def _find_owner(runtime: Any, obs: Observability, program_id: str) -> str:
    """The tenant of a program named without one (by an admin, or with auth off): the
    default tenant's, else the first tenant this replica knows it under."""
    scheduler = runtime.scheduler
    if any(p.id == program_id for p in scheduler.list_programs(tenant=DEFAULT_TENANT)):
        return DEFAULT_TENANT
    for summary in scheduler.list_programs():
        if summary.id == program_id:
            return summary.tenant
    return obs.store.local_tenant_of(program_id) or DEFAULT_TENANT


def _local_state(runtime: Any, program_id: str, owner: str) -> ProgramState | None:
    """The local scheduler's view of the program, if this replica holds it."""
    try:
        return runtime.scheduler.program_state(program_id, tenant=owner)
    except SchedulerError:
        return None


def _summary_from_state(state: ProgramState) -> dict[str, Any]:
    loop_now = asyncio.get_running_loop().time()
    wall_ms = time.time() * 1e3
    started = wall_ms - (loop_now - state.arrival) * 1e3
    ended = wall_ms - (loop_now - state.ended_at) * 1e3 if state.ended_at else None
    llm = sum(1 for c in state.calls if c.kind == "llm")
    return {
        "id": state.id,
        "tenant": state.tenant,
        "status": state.status,
        "calls": len(state.calls),
        "llm_calls": llm,
        "tool_calls": len(state.calls) - llm,
        "failed_calls": sum(1 for c in state.calls if c.status == "failed"),
        "inflight": sum(1 for c in state.calls if c.status == "running"),
        "prompt_tokens": sum(c.prompt_tokens for c in state.calls),
        "completion_tokens": sum(c.completion_tokens for c in state.calls),
        "cached_tokens": sum(c.cached_tokens for c in state.calls),
        "started_ms": started,
        "ended_ms": ended,
        "latency_ms": (ended or wall_ms) - started,
        "updated_ms": wall_ms,
        "instances": [],
    }


def install_ui(app: FastAPI) -> None:
    """Mount the UI on an app that has `app.state.observability`."""
    app.add_api_route("/ui", ui_redirect, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/", ui_index, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/ui/api/programs", list_programs, methods=["GET"], summary="Recent programs (tracing UI)"
    )
    app.add_api_route(
        "/ui/api/programs/{program_id}",
        get_program,
        methods=["GET"],
        summary="One program's calls, DAG and spans (tracing UI)",
    )
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
