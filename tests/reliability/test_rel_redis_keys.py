"""A program id (or tenant) cannot break the shared Redis store (issue 18.8).

Ids may contain `:`, Redis's key separator: `X-Program-Id: foo:engines` used to name the
engine set of program `foo`, Redis answered WRONGTYPE, and the store stayed "unreachable"
for every tenant, with nothing in /metrics or /health. Now no id can name another key;
a write Redis refuses anyway (a key of the wrong type put there by someone else) is
retried a bounded number of times, then dropped and counted, and every other program
keeps reaching Redis; the store's state shows in /health and /metrics."""

from __future__ import annotations

import time

import httpx
import pytest
from redis import Redis

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
# Each pair would share a key name (or a program's and another's sub-key) if ids were
# concatenated into key names.
IDS = ["foo", "foo:engines", "foo:engines:engines", "a:b", "a", "b:a", "x.y", "x:y",
       "status", "foo:created"]


def chat(url: str, program_id: str, text: str, *, end: bool = False) -> httpx.Response:
    headers = {"X-Program-Id": program_id}
    if end:
        headers["X-Program-End"] = "true"
    return httpx.post(url + CHAT, headers=headers, timeout=30, json={
        "model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": text}]})


def metric(url: str, name: str, store: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'store="{store}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{store={store!r}}} is not in /metrics")


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def history_on(url: str, program_id: str) -> dict:
    """The history another replica reads from Redis: it opens the program with one call."""
    assert chat(url, program_id, "and now?").status_code == 200
    return httpx.get(f"{url}/v1/programs/{program_id}", timeout=10).json()["history"]


def test_colliding_program_ids_keep_their_own_histories(redis_server, serve_in_thread):
    settings = Settings(redis_url=redis_server.url, sim={"time_scale": 0.001})
    a = serve_in_thread(create_app(ServerRuntime(settings)))
    calls = {pid: 1 + i % 3 for i, pid in enumerate(IDS)}
    for pid, n in calls.items():
        for turn in range(n):
            assert chat(a.url, pid, f"turn {turn}", end=turn == n - 1).status_code == 200
    # another replica sees each program's own history, nothing merged or lost
    b = serve_in_thread(create_app(ServerRuntime(settings)))
    for pid, n in calls.items():
        assert history_on(b.url, pid)["calls_finished"] == n + 1, pid
    for replica in (a, b):  # and neither store ever lost its backend
        health = httpx.get(replica.url + "/health", timeout=10).json()
        assert health["status"] == "ok", health
        assert health["stores"]["history"]["status"] == "ok"
        assert metric(replica.url, "progserve_store_up", "history") == 1.0
        assert metric(replica.url, "progserve_store_outages_total", "history") == 0.0


def test_a_refused_write_is_dropped_after_retries_and_blocks_nobody(redis_server,
                                                                     serve_in_thread):
    settings = Settings(redis_url=redis_server.url, sim={"time_scale": 0.001})
    a = serve_in_thread(create_app(ServerRuntime(settings)))
    store = a.app.state.runtime.store
    redis = Redis.from_url(redis_server.url)
    # Someone else's string where the program's history hash would go: WRONGTYPE.
    redis.set(store.backend.key("default", "victim"), "not a hash")
    for turn in range(3):
        assert chat(a.url, "victim", f"turn {turn}").status_code == 200  # still served
    for turn in range(3):
        assert chat(a.url, "bystander", f"turn {turn}").status_code == 200

    def dropped() -> bool:
        return metric(a.url, "progserve_store_dropped_writes_total", "history") >= 1
    wait_for(dropped)
    health = httpx.get(a.url + "/health", timeout=10).json()
    assert health["stores"]["history"]["dropped_writes"] >= 1
    assert health["stores"]["history"]["reachable"] is True  # degraded at most, never down
    # the store went on: other programs reach Redis, before and after the refusals
    wait_for(lambda: store.healthy)
    assert chat(a.url, "bystander", "more").status_code == 200
    b = serve_in_thread(create_app(ServerRuntime(settings)))
    assert history_on(b.url, "bystander")["calls_finished"] == 5
    assert redis.get(store.backend.key("default", "victim")) == b"not a hash"  # untouched
