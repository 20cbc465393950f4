"""Issue 18.1: a batch larger than the scheduler's in-flight budget must never wedge the
server. Any batch up to `limits.max_batch` completes whatever the budget (each call frees
its replica slot when its engine stream ends, not when the whole batch closes), a larger
one gets 400, a client that leaves frees everything, `/health` reports a scheduler that
makes no progress while work waits, and SIGTERM ends the process in bounded time."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from rel_support import raw_post, wait_until

from progserve.app import create_app
from progserve.bench.server_process import progserve_process
from progserve.config import Settings
from progserve.runtime import ServerRuntime

BUDGET = 32  # scheduler.max_inflight_requests, the default
PROMPTS = [f"Prompt number {i}" for i in range(BUDGET + 1)]


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.1}))))


def scheduler_of(server):
    return server.app.state.runtime.scheduler


def sse_events(text: str) -> list[dict]:
    lines = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


BATCHES = {
    "generate": ("/generate", {"text": PROMPTS, "sampling_params": {"max_new_tokens": 2}}),
    "completions": ("/v1/completions", {"model": "m", "prompt": PROMPTS, "max_tokens": 2}),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("route", list(BATCHES))
def test_a_batch_over_the_inflight_budget_completes(server, route, stream):
    path, body = BATCHES[route]
    answer = httpx.post(server.url + path, json={**body, "stream": stream}, timeout=30)
    assert answer.status_code == 200, answer.text
    if not stream:
        results = answer.json() if route == "generate" else answer.json()["choices"]
        assert len(results) == len(PROMPTS)
    elif route == "generate":
        finished = {e["index"] for e in sse_events(answer.text) if e["meta_info"]["finish_reason"]}
        assert finished == set(range(len(PROMPTS)))
    else:
        finished = {c["index"] for e in sse_events(answer.text) for c in e["choices"]
                    if c["finish_reason"]}
        assert finished == set(range(len(PROMPTS)))
    scheduler = scheduler_of(server)
    wait_until(lambda: scheduler.queued() == 0
               and all(r.inflight_requests == 0 for r in scheduler.replicas), 2)


@pytest.mark.parametrize("route", list(BATCHES))
def test_a_batch_over_max_batch_gets_400(server, route):
    path, body = BATCHES[route]
    limit = server.app.state.runtime.settings.limits.max_batch
    many = [f"p{i}" for i in range(limit + 1)]
    key = "text" if route == "generate" else "prompt"
    answer = httpx.post(server.url + path, json={**body, key: many, "stream": True}, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == key and str(limit) in error["message"]
    assert scheduler_of(server).queued() == 0


@pytest.mark.parametrize("route", list(BATCHES))
def test_a_client_that_leaves_a_big_streamed_batch_frees_everything(server, route):
    path, body = BATCHES[route]
    long = {**body, "stream": True, "ignore_eos": True}
    if route == "generate":
        long["sampling_params"] = {"max_new_tokens": 4000, "ignore_eos": True}
    else:
        long["max_tokens"] = 4000
    scheduler = scheduler_of(server)
    runtime = server.app.state.runtime
    sock = raw_post(server.port, path, long)
    wait_until(lambda: scheduler.queued() == 1 and scheduler.replicas[0].inflight_requests
               == BUDGET, 10)
    sock.close()
    wait_until(lambda: scheduler.queued() == 0
               and scheduler.replicas[0].inflight_requests == 0, 2)
    engine = runtime.engines[0]
    wait_until(lambda: server.call(engine.stats()).running == 0, 2)
    wait_until(lambda: not runtime.requests.by_rid, 2)
    # ... and the server serves the next request.
    again = httpx.post(server.url + path, json={**body, "stream": True}, timeout=30)
    assert again.status_code == 200


def test_health_reports_calls_waiting_with_no_progress(serve_in_thread):
    """One slot, held by a long call; a second call waits. Past `stall_timeout_s` with
    nothing dispatched or ended, /health is 503; once the queue moves, 200 again."""
    settings = Settings(sim={"time_scale": 1.0}, stall_timeout_s=0.5,
                        scheduler={"max_inflight_requests": 1})
    server = serve_in_thread(create_app(ServerRuntime(settings)))
    long = {"text": "Write forever", "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    holder = raw_post(server.port, "/generate", long)
    waiter = raw_post(server.port, "/generate", {**long, "stream": False})
    scheduler = scheduler_of(server)
    wait_until(lambda: scheduler.queued() == 1, 10)
    assert httpx.get(server.url + "/health").status_code == 200
    time.sleep(0.6)
    stalled = httpx.get(server.url + "/health")
    assert stalled.status_code == 503
    assert stalled.json()["code"] == "scheduler_stalled" and stalled.json()["stalled_s"] >= 0.5
    holder.close()  # the queue moves: the waiting call is dispatched
    wait_until(lambda: scheduler.queued() == 0, 5)
    assert httpx.get(server.url + "/health").status_code == 200
    waiter.close()


def test_sigterm_ends_the_server_with_a_big_batch_in_flight():
    """A streamed batch over the budget, its client still connected: SIGTERM gives the
    requests `shutdown_grace_s`, aborts them, and the process exits within 10 s."""
    proc = progserve_process(env={"PROGSERVE_SIM__TIME_SCALE": "1.0"}).start()
    try:
        body = {"text": PROMPTS, "stream": True,
                "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        sock = raw_post(proc.port, "/generate", body)

        def running() -> int:
            info = httpx.get(proc.url + "/get_server_info").json()
            return info["internal_states"][0]["running"]

        wait_until(lambda: running() == BUDGET, 20, poll_s=0.1)
        assert proc.proc is not None
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        try:
            proc.proc.wait(12)
        except Exception:  # noqa: BLE001 - reported below
            pass
        elapsed = time.monotonic() - started
        assert proc.proc.poll() is not None, f"still running after SIGTERM:\n{proc.output()}"
        assert elapsed < 10, f"exited after {elapsed:.1f} s"
        sock.close()
    finally:
        proc.kill()
