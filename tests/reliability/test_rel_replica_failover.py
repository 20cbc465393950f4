"""An engine replica killed mid-stream (a real process, SIGKILL): progserve runs with
`--engine sglang` over two progserve-sim servers. The killed replica's in-flight calls
resume on the other one (non-streamed calls transparently, streamed ones continue in
the same stream), every program completes, and the replica rejoins once it is back."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from rel_support import wait_until

from progserve.app import create_app
from progserve.bench.server_process import free_port, progserve_process
from progserve.config import Settings
from progserve.runtime import ServerRuntime

pytestmark = pytest.mark.slow

TOKENS = 300  # about 2-3 s of real-time sim decoding: long enough to be cut mid-stream
SIM_ENV = {"PROGSERVE_SIM__TIME_SCALE": "1.0"}


@pytest.fixture
def backends():
    procs = [progserve_process("--log-level", "warning", env=SIM_ENV) for _ in range(2)]
    for proc in procs:
        proc.launch()
    for proc in procs:
        proc.wait_healthy()
    yield procs
    for proc in procs:
        proc.stop()


def front_app(urls: list[str]):
    settings = Settings(engine="sglang", engine_url=urls,
                        scheduler={"health_probe_interval_s": 0.2, "balance": "round_robin"})
    return create_app(ServerRuntime(settings))


def running_on(url: str) -> int:
    info = httpx.get(url + "/get_server_info", timeout=5).json()
    return int(info["internal_states"][0]["running"])


def chat_body(i: int, stream: bool) -> dict:
    return {"model": "m", "max_tokens": TOKENS, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"Tell story number {i}"}]}


async def chat(client: httpx.AsyncClient, i: int) -> dict:
    resp = await client.post("/v1/chat/completions", json=chat_body(i, False))
    assert resp.status_code == 200, resp.text
    return resp.json()


async def chat_stream(client: httpx.AsyncClient, i: int) -> tuple[list[dict], str]:
    events: list[dict] = []
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(i, True)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            events.append(event)
            for choice in event.get("choices", ()):
                text += (choice.get("delta") or {}).get("content") or ""
    return events, text


async def graph_program(client: httpx.AsyncClient, i: int) -> str:
    spec = {"calls": [
        {"id": "plan", "prompt": f"Plan task {i}", "output": "plan",
         "sampling": {"max_new_tokens": TOKENS, "ignore_eos": True}},
        {"id": "act", "prompt": "Do: {{plan}}", "output": "act",
         "sampling": {"max_new_tokens": 8, "ignore_eos": True}}]}
    resp = await client.post("/v1/programs", json=spec)
    assert resp.status_code == 201, resp.text
    pid = resp.json()["program_id"]
    value = await client.get(f"/v1/programs/{pid}/variables/act", params={"timeout": 60})
    assert value.status_code == 200, value.text
    state = (await client.get(f"/v1/programs/{pid}")).json()
    assert [c["status"] for c in state["calls"]] == ["finished", "finished"]
    return pid


async def test_killed_replica_calls_resume_elsewhere_and_it_rejoins(backends, serve_in_thread):
    a, b = backends
    front = serve_in_thread(front_app([a.url, b.url]))
    scheduler = front.app.state.runtime.scheduler
    async with httpx.AsyncClient(base_url=front.url, timeout=90) as client:
        plain = [asyncio.create_task(chat(client, i)) for i in range(6)]
        streams = [asyncio.create_task(chat_stream(client, i)) for i in range(4)]
        programs = [asyncio.create_task(graph_program(client, i)) for i in range(4)]
        # Both replicas are generating; then replica A dies without a word.
        await asyncio.to_thread(wait_until, lambda: running_on(a.url) >= 3, 20)
        await asyncio.sleep(0.3)  # some tokens already streamed from A
        a.kill()
        results = await asyncio.gather(*plain)
        streamed = await asyncio.gather(*streams)
        await asyncio.gather(*programs)

    for result in results:  # transparent: a normal, complete answer
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"]["completion_tokens"] == TOKENS
    for events, text in streamed:  # the same stream carried on: no error event, a finish
        assert not [e for e in events if "error" in e], events[-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert text
    counters = scheduler.health.counters
    assert counters.downs == 1 and counters.failovers >= 3
    assert not scheduler.replicas[0].healthy and scheduler.replicas[1].healthy

    # A comes back on the same port: the probe brings it into rotation again.
    a.start()
    await asyncio.to_thread(wait_until, lambda: scheduler.replicas[0].healthy, 10)
    assert counters.rejoins == 1
    before = scheduler.replicas[0].dispatched
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
        body = {"text": "hello again", "sampling_params": {"max_new_tokens": 4}}
        answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(4)))
    assert all(r.status_code == 200 for r in answers)
    assert scheduler.replicas[0].dispatched > before  # it takes calls again


async def test_no_replica_left_gives_a_clear_error(serve_in_thread):
    b = progserve_process("--log-level", "warning", env=SIM_ENV).start()
    try:
        front = serve_in_thread(front_app([b.url]))
        async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
            stream = asyncio.create_task(chat_stream(client, 0))
            plain = asyncio.create_task(client.post("/v1/chat/completions",
                                                    json=chat_body(1, False)))
            await asyncio.to_thread(wait_until, lambda: running_on(b.url) >= 2, 20)
            await asyncio.sleep(0.2)
            b.kill()
            events, _ = await stream
            resp = await plain
        # Streamed: an in-band error event naming the cause, then [DONE].
        error = events[-1]["error"]
        assert error["type"] == "server_error", error
        assert f"sglang {b.url}" in error["message"] and "failed" in error["message"]
        # Non-streamed: a 502 in OpenAI's error shape, with the same cause.
        assert resp.status_code == 502
        assert f"sglang {b.url}" in resp.json()["error"]["message"]
    finally:
        b.stop()


async def test_unreachable_replica_fails_fast_and_new_work_gets_503(serve_in_thread):

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    front = serve_in_thread(front_app([nowhere]))
    scheduler = front.app.state.runtime.scheduler
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=chat_body(0, False))
        assert first.status_code == 502, first.text
        assert "unreachable" in first.json()["error"]["message"]
        assert not scheduler.replicas[0].healthy
        # Nothing could serve new work: a clear 503 at once instead of a queue that waits.
        second = await client.post("/v1/chat/completions", json=chat_body(1, False))
        assert second.status_code == 503, second.text
        assert second.json()["error"]["code"] == "no_healthy_replica"
        programs = await client.post("/v1/programs", json={"calls": [
            {"id": "a", "prompt": "x", "output": "v"}]})
        assert programs.status_code == 503
        assert programs.headers["content-type"].startswith("application/problem+json")
        assert (await client.get("/v1/programs")).status_code == 200  # reads still work
