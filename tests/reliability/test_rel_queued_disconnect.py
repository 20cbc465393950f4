"""Issue 18.13: a streamed request whose client leaves while its call still waits in the
queue is dropped from the queue at once, and never reaches the engine (as a non-streamed
one already was)."""

from __future__ import annotations

import pytest
from rel_support import raw_post, wait_until

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

LONG = {"sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(serve_in_thread):
    settings = Settings(sim={"time_scale": 1.0}, scheduler={"max_inflight_requests": 1})
    return serve_in_thread(create_app(ServerRuntime(settings)))


BODIES = {
    "sglang-stream": ("/generate", {"text": "Queued story", "stream": True, **LONG}),
    "completions-stream": ("/v1/completions", {"model": "m", "prompt": "Queued story",
                                               "stream": True, "max_tokens": 4000,
                                               "ignore_eos": True}),
    "chat-stream": ("/v1/chat/completions", {"model": "m", "stream": True, "max_tokens": 4000,
                                             "ignore_eos": True, "messages": [
                                                 {"role": "user", "content": "Queued story"}]}),
    "sglang": ("/generate", {"text": "Queued story", **LONG}),
}


@pytest.mark.parametrize("kind", list(BODIES))
def test_a_queued_call_whose_client_leaves_is_dropped_at_once(server, kind):
    scheduler = server.app.state.runtime.scheduler
    engine = server.app.state.runtime.engines[0]
    holder = raw_post(server.port, "/generate", {"text": "Hold the slot", **LONG})
    wait_until(lambda: scheduler.replicas[0].inflight_requests == 1, 10)
    dispatched = scheduler.dispatcher.dispatched
    path, body = BODIES[kind]
    queued = raw_post(server.port, path, body)
    wait_until(lambda: scheduler.queued() == 1, 10)
    queued.close()
    elapsed = wait_until(lambda: scheduler.queued() == 0, 2, poll_s=0.002)
    assert elapsed < 0.5, f"dropped after {elapsed * 1000:.0f} ms"
    assert scheduler.replicas[0].inflight_requests == 1  # the holder still runs
    assert scheduler.dispatcher.dispatched == dispatched  # it never reached the engine
    holder.close()
    wait_until(lambda: scheduler.replicas[0].inflight_requests == 0, 2)
    wait_until(lambda: server.call(engine.stats()).running == 0, 2)
