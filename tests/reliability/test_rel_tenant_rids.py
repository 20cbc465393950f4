"""Issue 18.5: request ids are per tenant. Before the fix, while Alice's `/generate
rid=alice-job-7` ran, Bob's request with the same rid got 400 "already in flight": Bob
learned Alice's rids and could squat them. Now each tenant has its own rid space, in
flight and for aborts; answers carry the rid the client sent."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from progserve.app import create_app
from progserve.auth import hash_key
from progserve.config import Settings
from progserve.runtime import ServerRuntime

KEYS = {"k-alice-3b1f": "alice", "k-bob-77c0": "bob"}
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture(scope="module")
def server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    return serve_in_thread(create_app(ServerRuntime(Settings(api_keys=keys_file,
                                                       sim={"time_scale": 0.5}))))


def job(tokens: int, rid: str = "alice-job-7", stream: bool = False) -> dict:
    return {"text": "Summarise the quarter", "rid": rid, "stream": stream,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}


async def wait_in_flight(server, tenant: str, rid: str) -> None:
    registry = server.app.state.runtime.requests
    for _ in range(500):
        if registry.in_flight(tenant, rid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{tenant}'s {rid} never started")


async def test_the_same_rid_in_two_tenants_is_two_requests(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        alice = asyncio.create_task(client.post("/generate", headers=ALICE, json=job(1000)))
        await wait_in_flight(server, "alice", "alice-job-7")
        bob = await client.post("/generate", headers=BOB, json=job(3))
        assert bob.status_code == 200, bob.text  # not "already in flight"
        assert bob.json()["meta_info"]["id"] == "alice-job-7"
        assert bob.json()["meta_info"]["completion_tokens"] == 3
        # Bob's abort of "his" rid (done already, or Alice's) never reaches Alice.
        for body in ({"rid": "alice-job-7"}, {"abort_all": True}):
            answer = await client.post("/abort_request", headers=BOB, json=body)
            assert answer.json()["aborted"] == 0
        # Within a tenant a rid stays unique while it runs.
        again = await client.post("/generate", headers=ALICE, json=job(3))
        assert again.status_code == 400 and "already in flight" in again.text
        done = (await alice).json()["meta_info"]
        assert done["id"] == "alice-job-7" and done["finish_reason"]["type"] == "length"
        assert done["completion_tokens"] == 1000


async def test_each_tenant_aborts_only_its_own_rid(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        runs = {who: asyncio.create_task(client.post("/generate", headers=headers,
                                                     json=job(7000, "shared-rid", stream=True)))
                for who, headers in (("alice", ALICE), ("bob", BOB))}
        for who in runs:
            await wait_in_flight(server, who, "shared-rid")
        answer = await client.post("/abort_request", headers=BOB, json={"rid": "shared-rid"})
        assert answer.json()["aborted"] == 1
        bob_events = (await runs["bob"]).text
        assert '"type":"abort"' in bob_events.replace(" ", "")
        assert server.app.state.runtime.requests.in_flight("alice", "shared-rid")
        await client.post("/abort_request", headers=ALICE, json={"rid": "shared-rid"})
        alice_events = (await runs["alice"]).text
        assert '"id":"shared-rid"' in alice_events.replace(" ", "")
