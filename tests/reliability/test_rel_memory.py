"""Memory comes back: after programs end (graph programs via `end`, proxy programs via
`X-Program-End`), nothing keeps them alive beyond the configured retention. Regression:
each program's idle-end timer held the ended program, with its calls, graph and specs,
for `program_idle_timeout_s` (10 minutes) after it ended."""

from __future__ import annotations

import asyncio
import gc

import httpx

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.program import CallNode, Program


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


async def graph_program(client: httpx.AsyncClient, i: int) -> None:
    spec = {"calls": [{"id": "a", "prompt": f"task {i}", "output": "v",
                       "sampling": {"max_new_tokens": 4}}]}
    pid = (await client.post("/v1/programs", json=spec)).json()["program_id"]
    assert (await client.get(f"/v1/programs/{pid}/variables/v",
                             params={"timeout": 30})).status_code == 200
    assert (await client.post(f"/v1/programs/{pid}/end")).status_code == 200


async def proxy_program(client: httpx.AsyncClient, i: int) -> None:
    for turn in range(2):
        headers = {"X-Program-Id": f"chat-{i}"}
        if turn == 1:
            headers["X-Program-End"] = "true"
        resp = await client.post("/v1/chat/completions", headers=headers, json={
            "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200


async def test_ended_programs_are_freed():
    settings = Settings(sim={"time_scale": 0.001},
                        scheduler={"keep_finished_programs": 0, "retention_timeout_s": 0.05})
    runtime = ServerRuntime(settings)
    app = create_app(runtime)
    await runtime.start()
    try:
        before_programs, before_calls = live(Program), live(CallNode)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://progserve", timeout=60) as client:
            await asyncio.gather(*(graph_program(client, i) for i in range(100)),
                                 *(proxy_program(client, i) for i in range(100)))
        await asyncio.sleep(0.3)  # past the KV-retention timeout
        assert runtime.scheduler.list_programs() == []
        assert live(Program) - before_programs <= 2, "ended programs are still referenced"
        assert live(CallNode) - before_calls <= 4
    finally:
        await runtime.close()
