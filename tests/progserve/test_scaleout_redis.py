"""Scale-out: two real `progserve serve` processes share program history and traces through
a real redis-server. A program whose calls alternate between the replicas keeps one
attained-service history; killing Redis for a few seconds neither stops serving nor loses
a program, and the replicas re-sync when it returns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from progserve.bench.server_process import ServerProcess, progserve_process

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def chat(url: str, program_id: str, text: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(
        url + CHAT,
        headers={"X-Program-Id": program_id},
        json={"model": "sim", "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": text}]},
        timeout=30,
    )  # fmt: skip


def state(url: str, program_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/programs/{program_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def start_replicas(redis_url: str, tmp_path: Path) -> list[ServerProcess]:
    env = {"PROGSERVE_SIM__TIME_SCALE": "0.1"}
    replicas = [
        progserve_process("--redis-url", redis_url, "--policy", "plas", "--log-level",
                          "warning", env=env, log=tmp_path / f"replica{i}.log").launch()
        for i in range(2)
    ]  # fmt: skip
    for replica in replicas:
        replica.wait_healthy()
    return replicas


def local_calls(url: str, program_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/v1/programs/{program_id}", timeout=10)
    if r.status_code == 404:  # this replica has not served the program yet
        return []
    assert r.status_code == 200, r.text
    return r.json()["calls"]


def served_service(replicas: list[ServerProcess], program_id: str) -> tuple[float, int]:
    """Total service and count of the program's finished calls, over both replicas."""
    calls = [c for r in replicas for c in local_calls(r.url, program_id)]
    finished = [c for c in calls if c["status"] == "finished"]
    return sum(c["service"] for c in finished), len(finished)


def settled_history(url: str, program_id: str, calls: int) -> dict[str, Any]:
    """The program's history once `calls` calls are recorded (a call's service is written
    to the store just after its response ends)."""
    deadline = time.monotonic() + 5
    while True:
        history = state(url, program_id)["history"]
        if history["calls_finished"] >= calls or time.monotonic() > deadline:
            return history
        time.sleep(0.02)


def settled_view(url: str, program_id: str, calls: int) -> dict[str, Any]:
    """The UI's view of the program once it shows `calls` calls and counts them: spans
    and each instance's program record reach Redis in the trace store's background flush
    (every 0.2 s), so the other replica's newest call may still be on its way when the
    answer arrives (its span and its record's count need not land in the same read)."""
    deadline = time.monotonic() + 5
    while True:
        view = httpx.get(f"{url}/ui/api/programs/{program_id}", timeout=10).json()
        settled = len(view["calls"]) >= calls and view["program"]["llm_calls"] >= calls
        if settled or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


@pytest.fixture
def replicas(redis_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    procs = start_replicas(redis_server.url, tmp_path)
    yield procs
    for proc in procs:
        proc.stop()


def test_calls_on_both_replicas_share_one_history_and_one_trace(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = replicas
    program_id = "agent-run-1"
    for i in range(6):
        replica = (a, b)[i % 2]
        r = chat(replica.url, program_id, f"step {i}: think about the plan " * 3)
        assert r.status_code == 200, r.text
        history = settled_history(replica.url, program_id, i + 1)
        total, count = served_service(replicas, program_id)
        # the replica that served call i knows every call so far, on either replica
        assert history["calls_finished"] == count == i + 1
        assert history["service"] == pytest.approx(total, rel=1e-9)
        assert sorted(history["engines_used"]) == [0]
        # PLAS ranks a call by its program's attained service when it is queued: call i
        # saw every earlier call, wherever it ran
        mine = state(replica.url, program_id)["calls"][-1]
        assert mine["priority"] == pytest.approx(total - mine["service"], rel=1e-9)
    # one trace: each replica's UI shows all six calls, from both instances
    for replica in replicas:
        view = settled_view(replica.url, program_id, calls=6)
        assert len(view["calls"]) == 6
        assert len({s["trace_id"] for s in view["spans"]}) == 1
        assert len(view["program"]["instances"]) == 2
        assert view["program"]["llm_calls"] == 6


def test_redis_outage_serves_on_local_state_and_resyncs(make_redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    redis = make_redis_server(appendonly=True)
    a, b = replicas = start_replicas(redis.url, tmp_path)
    try:
        program_id = "through-the-outage"
        for i in range(2):
            assert chat((a, b)[i % 2].url, program_id, f"before {i}").status_code == 200
        redis.kill()
        started = time.monotonic()
        during: list[httpx.Response] = []
        while time.monotonic() - started < 3.0:  # Redis stays dead for a few seconds
            i = len(during) // 2
            during.append(chat((a, b)[i % 2].url, program_id, f"during {i}"))
            during.append(chat(a.url, "born-in-outage", f"new {i}"))
        assert all(r.status_code == 200 for r in during), [r.text for r in during][:3]
        for replica in replicas:
            assert replica.proc.poll() is None  # no crash
            assert httpx.get(replica.url + "/health", timeout=5).status_code == 200
        redis.start()
        expected_calls = 2 + len(during) // 2
        # re-sync: a call on either replica soon sees every call made on both
        deadline = time.monotonic() + 15
        while True:
            r = chat(b.url, program_id, "after")
            assert r.status_code == 200
            expected_calls += 1
            history = state(b.url, program_id)["history"]
            if history["calls_finished"] == expected_calls:
                break
            assert time.monotonic() < deadline, (history, expected_calls)
            time.sleep(0.3)
        total, count = served_service(replicas, program_id)
        assert count == expected_calls
        assert history["service"] == pytest.approx(total, rel=1e-9)
        # the program born during the outage on A is not lost: B continues its history
        assert chat(b.url, "born-in-outage", "continue").status_code == 200
        born = state(b.url, "born-in-outage")["history"]
        assert born["calls_finished"] == len(during) // 2 + 1
        # and the traces re-synced too: B's UI shows A's spans from during the outage
        deadline = time.monotonic() + 10
        while True:
            view = httpx.get(f"{b.url}/ui/api/programs/{program_id}", timeout=10).json()
            if len(view["calls"]) == expected_calls:
                break
            assert time.monotonic() < deadline, len(view["calls"])
            time.sleep(0.3)
    finally:
        for replica in replicas:
            replica.stop()
