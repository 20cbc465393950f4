"""The generation routes' short path (`app.ProgserveApp`) keeps the full stack's
semantics: the same answers, the same error mapping (an unexpected error is a 500 in
OpenAI's shape and is re-raised for the server to log), and requests under a
`root_path` still served by the full stack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from progserve.api.calls import ScheduledCall
from progserve.api.common import ProgramIdentity
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.program import CallStatus
from scheduler.store import InMemoryStateStore

# ignore_eos: the sim's reply length is random per rid, and may end before 4 tokens.
BODY = {"text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}


@pytest.fixture
async def runtime() -> AsyncIterator[ServerRuntime]:
    rt = ServerRuntime(Settings(sim={"time_scale": 0.01}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


def client(app: object, *, root_path: str = "", raise_errors: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path,  # type: ignore[arg-type]
                                    raise_app_exceptions=raise_errors)
    return httpx.AsyncClient(transport=transport, base_url="http://progserve")


async def test_short_path_and_full_stack_answer_alike(runtime: ServerRuntime) -> None:
    app = create_app(runtime)
    async with client(app) as short, client(app, root_path="/api") as full:
        direct = await short.post("/generate", json=BODY)
        mounted = await full.post("/api/generate", json=BODY)
        bad = await short.post("/generate", json={"text": ""})
    assert direct.status_code == mounted.status_code == 200
    assert direct.json()["meta_info"]["completion_tokens"] == 4
    assert mounted.json()["meta_info"]["completion_tokens"] == 4
    assert direct.headers["x-program-id"] and mounted.headers["x-program-id"]
    assert bad.status_code == 400 and bad.json()["error"]["message"]


async def test_unexpected_error_is_a_500_and_reraised(runtime: ServerRuntime,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(runtime.scheduler, "llm_call", broken)
    app = create_app(runtime)
    async with client(app, raise_errors=False) as c:
        answer = await c.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 500
    assert set(answer.json()["error"]) >= {"message", "type"}
    async with client(app) as c:
        with pytest.raises(RuntimeError, match="a bug"):
            await c.post("/generate", json=BODY)


async def _answered_call(runtime: ServerRuntime, program_id: str) -> ScheduledCall:
    from engine_backend.types import GenerateRequest, SamplingParams

    request = GenerateRequest(rid=f"rid-{program_id}", text="hello there", stream=False,
                              sampling=SamplingParams(max_new_tokens=3))
    identity = ProgramIdentity(program_id=program_id, end=True)
    call = await ScheduledCall.start(runtime, "default", identity, request)
    out = await call.collect()
    assert out.completion_tokens == 3 and out.finish_reason is not None
    return call


async def test_an_answered_call_frees_its_slot_and_is_booked_without_the_api(
        runtime: ServerRuntime) -> None:
    """With the in-process store the answer goes first: the call's replica slot is free
    when its final chunk arrives, and the scheduler books it in the next loop turn
    though the API neither reads nor closes its stream any more."""
    import asyncio

    scheduler = runtime.scheduler
    await scheduler.open_program("p-defer")
    await _answered_call(runtime, "p-defer")
    (node,) = scheduler.programs.get("p-defer", "default").calls.values()
    assert node.status == CallStatus.RUNNING  # answered, not yet booked
    assert all(r.inflight_requests == 0 for r in scheduler.replicas)
    await asyncio.sleep(0)
    state = scheduler.program_state("p-defer")
    assert state.calls[0].status == "finished" and state.history.calls_finished == 1


class _RemoteLikeStore(InMemoryStateStore):
    in_process = False  # as Redis: its methods may suspend


async def test_a_remote_store_books_the_call_before_the_answer() -> None:
    """A store that suspends (Redis) could let another request see the call unfinished:
    there the bookkeeping runs before the final chunk goes out."""
    rt = ServerRuntime(Settings(sim={"time_scale": 0.01}), store=_RemoteLikeStore())
    await rt.start()
    try:
        await rt.scheduler.open_program("p-now")
        await _answered_call(rt, "p-now")
        (node,) = rt.scheduler.programs.get("p-now", "default").calls.values()
        assert node.status == CallStatus.FINISHED
    finally:
        await rt.close()


async def test_a_sequential_client_sees_its_ended_program(runtime: ServerRuntime) -> None:
    app = create_app(runtime)
    async with client(app) as c:
        answer = await c.post("/generate", json=BODY, headers={
            "X-Program-Id": "p-seq", "X-Program-End": "true"})
        assert answer.status_code == 200
        state = await c.get("/v1/programs/p-seq")
    assert state.status_code == 200
    body = state.json()
    assert body["status"] == "finished"
    assert [call["status"] for call in body["calls"]] == ["finished"]


async def test_only_a_server_process_tunes_its_collector_and_times_its_pauses() -> None:
    import gc

    gc.unfreeze()
    for asked in (False, True):
        app = create_app(Settings(sim={"time_scale": 0.01}))
        app.state.tune_collector = asked
        try:
            async with app.router.lifespan_context(app):
                assert (gc.get_freeze_count() > 0) is asked
                gc.collect()
                async with client(app) as c:
                    scrape = (await c.get("/metrics")).text
                timed = 'progserve_gc_pause_seconds_count{generation="2"}' in scrape
                assert timed is asked
            assert gc.get_freeze_count() == 0  # undone when the app stops
        finally:
            gc.unfreeze()


async def test_a_failure_to_end_the_program_is_logged_not_raised(
        runtime: ServerRuntime, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The client's answer is ready when its program is ended as it asked: a failure
    there (the program ended and forgotten meanwhile, say) is logged, the answer given."""
    from scheduler.errors import ProgramNotFoundError

    async def gone(self: ScheduledCall) -> None:
        raise ProgramNotFoundError(self.program_id)

    monkeypatch.setattr(ScheduledCall, "end_program_if_asked", gone)
    app = create_app(runtime)
    async with client(app) as c:
        answer = await c.post("/generate", json=BODY, headers={
            "X-Program-Id": "p-gone", "X-Program-End": "true"})
    assert answer.status_code == 200
    assert answer.json()["meta_info"]["completion_tokens"] == 4
    assert "ending the program" in caplog.text
    assert runtime.scheduler.program_state("p-gone").calls[0].status == "finished"
