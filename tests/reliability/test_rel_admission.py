"""Admission control: past the configured limits new work gets a clear 429 with a
Retry-After (in the route's documented error shape), the number of requests served at
once and the queue stay bounded, reads stay available, and work is admitted again once
the load drains."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

INFLIGHT = 4


@pytest.fixture(scope="module")
def server(serve_in_thread):
    settings = Settings(sim={"time_scale": 1.0},
                        limits={"max_inflight_requests": INFLIGHT, "max_queued_calls": 6},
                        scheduler={"max_inflight_requests": 2})
    return serve_in_thread(create_app(ServerRuntime(settings)))


def long_generate(tokens: int = 150) -> dict:
    return {"text": "Write a long story", "sampling_params": {"max_new_tokens": tokens,
                                                              "ignore_eos": True}}


async def test_overload_answers_429_with_retry_after_and_stays_bounded(server):
    admission = server.app.state.overload
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        flood = [asyncio.create_task(client.post("/generate", json=long_generate()))
                 for _ in range(24)]
        await asyncio.sleep(0.3)
        # Reads are always admitted, even now.
        assert (await client.get("/v1/programs")).status_code == 200
        assert (await client.get("/health")).status_code == 200
        answers = await asyncio.gather(*flood)
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) >= INFLIGHT and statuses.count(429) >= 10, statuses
    assert set(statuses) <= {200, 429}
    for resp in answers:
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1
            error = resp.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
            assert "limit" in error["message"]
    assert admission.peak_inflight <= INFLIGHT  # never more than the limit at once
    # The load is gone: new work is admitted again.
    ok = httpx.post(server.url + "/generate", json=long_generate(2), timeout=30)
    assert ok.status_code == 200


async def test_a_full_queue_refuses_new_programs_as_problem_json(server):
    scheduler = server.app.state.runtime.scheduler
    spec = {"calls": [{"id": f"c{i}", "prompt": f"task {i}", "output": f"v{i}",
                       "sampling": {"max_new_tokens": 200, "ignore_eos": True}}
                      for i in range(5)]}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        answers = [await client.post("/v1/programs", json=spec) for _ in range(4)]
        assert answers[0].status_code == 201
        refused = [r for r in answers if r.status_code == 429]
        assert refused, [r.status_code for r in answers]
        body = refused[0].json()
        assert refused[0].headers["content-type"].startswith("application/problem+json")
        assert body["status"] == 429 and body["code"] == "overloaded"
        assert "queued" in body["detail"]
        assert int(refused[0].headers["retry-after"]) >= 1
        # Bounded: the queue never grows past the limit by more than one admitted batch.
        assert scheduler.dispatcher.queued() < 6 + 5
        for resp in answers:
            if resp.status_code == 201:
                await client.delete(f"/v1/programs/{resp.json()['program_id']}")
