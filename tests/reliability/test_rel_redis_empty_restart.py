"""Redis restarted empty: after it returns, the replica writes back everything it holds
(issue 18.9). Before, programs that had ended before the outage lost their history and
traces in Redis, a program that ended during the outage came back with a partial count
(2 of 3 calls: its record was started by the replayed calls alone), and a trace kept only
the spans that happened to be queued.

Another replica that starts afterwards reads Redis only: it must see, for every program
(ended before, during or after the outage), every call in the history and every span."""

from __future__ import annotations

import time

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def chat(url: str, program_id: str, text: str, *, end: bool = False) -> None:
    headers = {"X-Program-Id": program_id}
    if end:
        headers["X-Program-End"] = "true"
    resp = httpx.post(url + CHAT, headers=headers, timeout=30, json={
        "model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": text}]})
    assert resp.status_code == 200, resp.text


def run_turns(url: str, turns: dict[str, int], program_id: str, n: int, *, end: bool) -> None:
    for i in range(n):
        turns[program_id] = turns.get(program_id, 0) + 1
        chat(url, program_id, f"turn {turns[program_id]}", end=end and i == n - 1)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def spans_seen(url: str, program_id: str) -> int:
    resp = httpx.get(f"{url}/ui/api/programs/{program_id}", timeout=10)
    return len(resp.json()["calls"]) if resp.status_code == 200 else 0


def test_an_empty_restart_gets_every_program_back(make_redis_server, serve_in_thread):
    redis = make_redis_server()  # no persistence: a restart is empty
    settings = Settings(redis_url=redis.url, sim={"time_scale": 0.001})
    a = serve_in_thread(create_app(ServerRuntime(settings)))
    turns: dict[str, int] = {}
    for i in range(15):
        run_turns(a.url, turns, f"before-{i}", 3, end=True)  # ended before the outage
    for i in range(8):
        run_turns(a.url, turns, f"across-{i}", 2, end=False)  # open through it
    time.sleep(0.6)  # the trace mirror flushes every 0.2 s
    assert health(a.url)["status"] == "ok"

    redis.kill()
    for i in range(8):
        run_turns(a.url, turns, f"during-{i}", 3, end=True)  # begun and ended during it
        run_turns(a.url, turns, f"across-{i}", 1, end=False)
    outage = health(a.url)
    assert outage["status"] == "degraded" and outage["stores"]["history"]["reachable"] is False
    redis.start()  # back, and empty
    for i in range(8):
        run_turns(a.url, turns, f"across-{i}", 1, end=True)
    wait_for(lambda: health(a.url)["status"] == "ok", timeout_s=20)
    stores = health(a.url)["stores"]
    assert stores["history"]["resyncs"] >= 1 and stores["traces"]["resyncs"] >= 1

    b = serve_in_thread(create_app(ServerRuntime(settings)))  # knows only what Redis holds
    for program_id, n in turns.items():
        assert spans_seen(b.url, program_id) == n, f"{program_id}: trace incomplete in Redis"
    for program_id, n in turns.items():
        chat(b.url, program_id, "one more")
        state = httpx.get(f"{b.url}/v1/programs/{program_id}", timeout=10).json()
        assert state["history"]["calls_finished"] == n + 1, f"{program_id}: history in Redis"
