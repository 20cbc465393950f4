"""Token counts a client asks for are bounded on every route, and no engine builds more
output than it may send (issue 18.2): `min_new_tokens` never exceeds `max_new_tokens`
(a clear 400), so `limits.max_tokens` caps both; the sim engine's responder, asked for a
minimum its (context-clamped) maximum cannot hold, neither materialises the minimum nor
fails with an internal error."""

from __future__ import annotations

import time
import tracemalloc

import httpx
import pytest

from engine_backend.sim import ReplyBuilder, SimConfig, SimEngine, SimTokenizer, SyntheticResponder
from engine_backend.sim.responders import PromptView, hash_text
from engine_backend.types import FinishType, GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

HUGE = 1_000_000_000


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.001}))))


def _sglang(min_new: int, max_new: int, **extra) -> dict:
    return {"text": "Say something.",
            "sampling_params": {"min_new_tokens": min_new, "max_new_tokens": max_new, **extra}}


def _program(min_new: int, max_new: int) -> dict:
    return {"calls": [{"id": "c", "prompt": "Say something.", "output": "out",
                       "sampling": {"min_new_tokens": min_new, "max_new_tokens": max_new}}]}


def _chat(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Say something."}], **extra}


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/generate", _sglang(HUGE, 4), "min_new_tokens"),
    ("/generate", _sglang(30_000_000, 30_000_000), "max_new_tokens"),
    ("/generate", _sglang(50, 4, stop=["."]), "min_new_tokens"),  # was an IndexError
    ("/generate", {"text": ["a", "b"], "sampling_params": [
        {"max_new_tokens": 4}, {"min_new_tokens": HUGE, "max_new_tokens": 4}]}, "min_new_tokens"),
    ("/v1/programs", _program(HUGE, 4), "min_new_tokens"),
    ("/v1/programs", _program(HUGE, HUGE), "max_new_tokens"),
    ("/v1/chat/completions", _chat(min_tokens=HUGE, max_tokens=4), "min_tokens"),
    ("/v1/chat/completions", _chat(min_tokens=HUGE), "min_new_tokens"),  # over the default
    ("/v1/completions", {"model": "m", "prompt": "Say", "min_tokens": 40}, "min_tokens"),
])
def test_min_tokens_over_max_or_the_limit_is_a_clear_400(server, route, body, param):
    started = time.monotonic()
    resp = httpx.post(server.url + route, json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    text = resp.text
    assert param in text and "IndexError" not in text and "internal" not in text
    assert time.monotonic() - started < 5.0
    # the server is still there and quick
    ok = httpx.post(server.url + "/generate", json=_sglang(3, 4), timeout=30)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] >= 3


def test_min_tokens_within_the_cap_are_honoured(server):
    resp = httpx.post(server.url + "/generate", json=_sglang(12, 16, stop=["."]), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta_info"]["completion_tokens"] >= 12
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json=_chat(min_tokens=10, max_tokens=10), timeout=30)
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 10


def test_the_sim_responder_never_builds_past_max_new_tokens():
    """Engines lower `max_new_tokens` to what the context holds without revalidating, so
    the responder itself must not build `min_new_tokens` tokens first (1e9 of them took
    the server to 22 GB)."""
    builder = ReplyBuilder(SimTokenizer(), seed=1)
    responder = SyntheticResponder(builder, mean_tokens=5)
    sampling = SamplingParams(max_new_tokens=4).model_copy(update={"min_new_tokens": 2_000_000})
    ids = builder.tokenizer.encode("hi")
    view = PromptView("r", ids, sampling, seed=hash_text("r") & 0xFFFF,
                      tokenizer=builder.tokenizer, _text="hi")
    tracemalloc.start()
    try:
        reply = responder.reply(view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(reply) == 4 and reply.finish.type is FinishType.LENGTH
    assert peak < 2_000_000, f"built {peak / 1e6:.0f} MB for a 4-token reply"


def test_a_context_clamped_request_with_a_stop_string_finishes_cleanly():
    """max_new_tokens clamped by the context below min_new_tokens, with a stop string:
    the reply ends at the clamp ("length"), not with an internal IndexError."""
    async def main() -> list:
        engine = SimEngine(SimConfig(max_context_len=64, time_scale=1.0, stream_interval=0))
        await engine.start()
        try:
            request = GenerateRequest(rid="r", text="Tell me a story.", sampling=SamplingParams(
                max_new_tokens=60, min_new_tokens=60, stop=["."]))
            return [chunk async for chunk in engine.generate(request)]
        finally:
            await engine.close()

    chunks = run_virtual(main())
    final = chunks[-1]
    assert final.finish_reason is not None and final.finish_reason.type is FinishType.LENGTH
    assert final.completion_tokens == 64 - final.prompt_tokens
