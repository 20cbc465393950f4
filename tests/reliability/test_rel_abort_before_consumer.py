"""An `/abort_request` that arrives while its request is registered but nothing consumes
its stream yet (the call waits in progserve's queue for the first chunk) must not be
lost. Before the fix the registry answered `aborted: 0` (no task to cancel yet) and the
request ran to its end; the CI caught it as a flaky `test_each_tenant_aborts_only_its_own_rid`."""

from __future__ import annotations

import asyncio

import httpx

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime


def job(tokens: int, rid: str) -> dict:
    return {"text": "Summarise the quarter", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}


async def test_an_abort_before_the_stream_is_consumed_is_kept(serve_in_thread):
    # One request in flight per replica: the second one waits in the queue, registered by
    # its rid but with no first chunk, so its consumer has not started.
    settings = Settings(sim={"time_scale": 0.5}, scheduler={"max_inflight_requests": 1})
    server = serve_in_thread(create_app(ServerRuntime(settings)))
    registry = server.app.state.runtime.requests
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        first = asyncio.create_task(client.post("/generate", json=job(2000, "long")))
        queued = asyncio.create_task(client.post("/generate", json=job(2000, "queued")))
        entry = None
        for _ in range(500):
            entry = next((e for r, e in registry.by_rid.items() if r.endswith("queued")), None)
            if entry is not None:
                break
            await asyncio.sleep(0.01)
        assert entry is not None and entry.task is None, "the queued request is not waiting"
        answer = await client.post("/abort_request", json={"rid": "queued"})
        assert answer.json()["aborted"] == 1
        events = (await asyncio.wait_for(queued, 20)).text.replace(" ", "")
        assert '"type":"abort"' in events
        await client.post("/abort_request", json={"rid": "long"})
        await asyncio.wait_for(first, 20)
