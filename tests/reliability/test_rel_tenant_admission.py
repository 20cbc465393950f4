"""Issue 18.7: admission is per tenant. Before the fix, with `max_queued_calls=100`, Bob's
300-call program was admitted whole (the check ran before its body was read, on a queue
that was still empty) and then every request of Alice's got 429, whose text (and
`/get_server_info`) told her the server's queue length. Now each tenant has a share of
the queue, a request's calls are counted when they are created (after its body is
parsed), a tenant past its share is refused while the others are not, and a refused
tenant hears only about itself."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from progserve.app import create_app
from progserve.auth import hash_key
from progserve.config import Settings
from progserve.overload import within_share
from progserve.runtime import ServerRuntime

KEYS = {"k-alice-3b1f": "alice", "k-bob-77c0": "bob"}
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in KEYS)
LIMIT = 100


@pytest.fixture(scope="module")
def server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    settings = Settings(api_keys=keys_file, sim={"time_scale": 1.0},
                        limits={"max_queued_calls": LIMIT},
                        scheduler={"max_inflight_requests": 256})  # all run: Alice waits on none
    return serve_in_thread(create_app(ServerRuntime(settings)))


def fan_out(calls: int, tokens: int = 2000) -> dict:
    return {"calls": [{"id": f"c{i}", "prompt": f"part {i} of the report", "output": f"v{i}",
                       "sampling": {"max_new_tokens": tokens, "ignore_eos": True}}
                      for i in range(calls)]}


async def test_one_tenants_load_never_refuses_another(server):
    tenant_calls = server.app.state.runtime.scheduler.tenant_calls
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        # The program: 300 calls can never fit a queue of 100; it is refused
        # whole, after its body was read, instead of overshooting the limit.
        too_big = await client.post("/v1/programs", headers=BOB, json=fan_out(300))
        assert too_big.status_code == 400 and too_big.json()["code"] == "too_many_calls"
        assert tenant_calls.total == 0
        # Bob fills the queue with programs that fit...
        bob = []
        for _ in range(2):
            resp = await client.post("/v1/programs", headers=BOB, json=fan_out(50))
            assert resp.status_code == 201, resp.text
            bob.append(resp.json()["program_id"])
        assert tenant_calls.open == {"bob": 100}
        # ...and is over his share: one call more is refused, and told only about himself.
        more = await client.post("/generate", headers=BOB, json={"text": "x"})
        assert more.status_code == 429 and int(more.headers["retry-after"]) >= 1
        assert "your tenant has 100 LLM calls" in more.json()["error"]["message"]
        # The one-call program opened for the refused call is not left open.
        scheduler = server.app.state.runtime.scheduler
        assert (await scheduler.stats()).programs_open == 2
        # Alice is within her share: served, though the server as a whole is full.
        answers = await asyncio.gather(*(client.post(
            "/v1/chat/completions", headers=ALICE, json={
                "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            for _ in range(5)))
        assert [r.status_code for r in answers] == [200] * 5, [r.text for r in answers]
        # Counted when created: a program that would take Alice past her share (50 of 100
        # while two tenants share it) is refused whole; nothing of it was queued.
        refused = await client.post("/v1/programs", headers=ALICE, json=fan_out(60))
        assert refused.status_code == 429, refused.text
        body = refused.json()
        assert body["code"] == "overloaded" and "your tenant has 0 LLM calls" in body["detail"]
        assert "100" not in body["detail"]  # not Bob's figures, nor the server's
        assert tenant_calls.open.get("alice", 0) == 0
        # Alice's view of the server's load is her own.
        info = (await client.get("/get_server_info", headers=ALICE)).json()
        assert info["internal_states"] == [
            {"tenant": "alice", "requests_in_progress": 0, "open_llm_calls": 0}]
        for program in bob:
            await client.delete(f"/v1/programs/{program}", headers=BOB)
        for _ in range(500):  # running calls end as their cancelled tasks unwind
            if tenant_calls.total == 0:
                break
            await asyncio.sleep(0.01)
        assert tenant_calls.total == 0 and tenant_calls.open == {}
        # The load is gone: Bob is admitted again.
        assert (await client.post("/generate", headers=BOB, json={
            "text": "x", "sampling_params": {"max_new_tokens": 1}})).status_code == 200


def test_fair_share_rule():
    # Alone, a tenant may use the whole limit (and not more).
    assert within_share(0, 0, 1, 100, 100) and not within_share(100, 100, 1, 1, 100)
    # A newcomer gets its share (limit / tenants) even when the server is full...
    assert within_share(0, 100, 2, 50, 100) and not within_share(0, 100, 2, 51, 100)
    # ...while the tenant that filled it is refused until it is back within its own.
    assert not within_share(100, 150, 2, 1, 100) and within_share(40, 90, 2, 10, 100)
    # Never past twice the limit.
    assert not within_share(0, 195, 3, 10, 100)


@pytest.fixture(scope="module")
def small_server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    settings = Settings(api_keys=keys_file, sim={"time_scale": 1.0},
                        limits={"max_inflight_requests": 4})
    return serve_in_thread(create_app(ServerRuntime(settings)))


async def test_requests_in_progress_are_shared_too(small_server):
    admission = small_server.app.state.overload
    long = {"text": "Write a long story", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=small_server.url, timeout=60) as client:
        streams = [asyncio.create_task(client.post("/generate", headers=BOB, json=long))
                   for _ in range(4)]
        for _ in range(500):
            if admission.inflight_by_tenant.get("bob") == 4:
                break
            await asyncio.sleep(0.01)
        assert admission.inflight_by_tenant == {"bob": 4}
        refused = await client.post("/generate", headers=BOB, json={"text": "x"})
        assert refused.status_code == 429
        assert refused.json()["error"]["message"].startswith("your tenant has 4 requests")
        served = await client.post("/generate", headers=ALICE, json={
            "text": "x", "sampling_params": {"max_new_tokens": 2}})
        assert served.status_code == 200  # within her share (2 of 4), though the server is full
        await client.post("/abort_request", headers=BOB, json={"abort_all": True})
        await asyncio.gather(*streams)
    # The server counts a request out after its last byte is sent: give it a moment.
    for _ in range(200):
        if admission.inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert admission.inflight == 0 and admission.inflight_by_tenant == {}
