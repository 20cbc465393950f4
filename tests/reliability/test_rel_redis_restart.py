"""Redis restarted under load (a real redis-server, SIGKILL, back empty on the same port):
serving goes on without a pause, no program is lost or fails, and when Redis returns the
shared history re-syncs, every program's finished calls counted exactly once."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.store_redis import RedisStateStore

pytestmark = pytest.mark.slow

CHAIN = 6  # calls per graph program
TURNS = 4  # chat turns per proxy program, at least: they go on until the test says stop


def chain_spec(i: int) -> dict:
    calls = [{"id": "c0", "prompt": f"Task {i}", "output": "v0",
              "sampling": {"max_new_tokens": 24, "ignore_eos": True}}]
    calls += [{"id": f"c{k}", "prompt": f"Step {k}: {{{{v{k - 1}}}}}", "output": f"v{k}",
               "sampling": {"max_new_tokens": 24, "ignore_eos": True}} for k in range(1, CHAIN)]
    return {"program_id": f"chain-{i}", "calls": calls}


async def graph_program(client: httpx.AsyncClient, i: int) -> str:
    resp = await client.post("/v1/programs", json=chain_spec(i))
    assert resp.status_code == 201, resp.text
    value = await client.get(f"/v1/programs/chain-{i}/variables/v{CHAIN - 1}",
                             params={"timeout": 60})
    assert value.status_code == 200, value.text
    return f"chain-{i}"


async def chat_program(client: httpx.AsyncClient, i: int, stop: asyncio.Event,
                       turns: dict[str, int]) -> str:
    """Chat turns until `stop` is set (and at least `TURNS`): calls keep coming through
    the outage however fast the machine is."""
    messages = [{"role": "user", "content": f"Hello {i}"}]
    turns[f"chat-{i}"] = 0
    while turns[f"chat-{i}"] < TURNS or not stop.is_set():
        resp = await client.post("/v1/chat/completions", headers={"X-Program-Id": f"chat-{i}"},
                                 json={"model": "m", "messages": messages, "max_tokens": 24,
                                       "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        turns[f"chat-{i}"] += 1
        messages += [{"role": "assistant", "content": resp.json()["choices"][0]["message"]
                      ["content"]}, {"role": "user", "content": "more"}]
        await asyncio.sleep(0.1)
    return f"chat-{i}"


async def test_redis_restart_loses_nothing_and_resyncs(make_redis_server, serve_in_thread):
    redis_server = make_redis_server()
    settings = Settings(redis_url=redis_server.url, sim={"time_scale": 0.5})
    server = serve_in_thread(create_app(ServerRuntime(settings)))
    store = server.app.state.runtime.store
    scheduler = server.app.state.runtime.scheduler
    async with httpx.AsyncClient(base_url=server.url, timeout=90) as client:
        work = [asyncio.create_task(graph_program(client, i)) for i in range(12)]
        stop, turns = asyncio.Event(), {}
        work += [asyncio.create_task(chat_program(client, i, stop, turns)) for i in range(12)]
        await asyncio.sleep(0.8)  # every program has history in Redis by now
        redis_server.kill()
        finished_before = scheduler.calls_finished
        await asyncio.sleep(1.5)  # serving on local history meanwhile
        assert not store.healthy
        assert scheduler.calls_finished > finished_before + 10  # no pause in serving
        assert not any(task.done() and task.exception() for task in work)
        redis_server.start()  # back, and empty
        stop.set()
        program_ids = await asyncio.gather(*work)  # all complete, none failed
        for _ in range(100):  # the store notices and re-syncs
            if store.healthy:
                break
            await asyncio.sleep(0.1)
        assert store.healthy

        states = {pid: (await client.get(f"/v1/programs/{pid}")).json() for pid in program_ids}
    shared = RedisStateStore(redis_server.url)
    try:
        for pid, state in states.items():
            finished = sum(1 for c in state["calls"] if c["status"] == "finished")
            assert finished == (CHAIN if pid.startswith("chain") else turns[pid]), state["calls"]
            totals = await shared.load("default", pid)
            assert totals is not None, f"{pid} is missing from Redis after the re-sync"
            assert totals.calls_finished == finished, (pid, totals)
    finally:
        await shared.close()
