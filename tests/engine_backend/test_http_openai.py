"""`OpenAIHTTPEngine` against a real OpenAI-compatible server (progserve serving the sim
engine) and against recorded vLLM-style answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from engine_backend.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    UnknownRequestError,
    UnsupportedError,
)
from engine_backend.openai_http import OpenAIHTTPEngine
from engine_backend.types import FinishType, GenerateRequest, SamplingParams
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

FIXTURES = Path(__file__).parents[1] / "fixtures" / "openai"


def request(rid: str, text: str = "The capital of France is", **kw) -> GenerateRequest:
    sampling = kw.pop("sampling", None) or SamplingParams(max_new_tokens=10, temperature=0)
    return GenerateRequest(rid=rid, text=text, sampling=sampling, **kw)


async def collect(engine, req):
    return [chunk async for chunk in engine.generate(req)]


@pytest.fixture(scope="module")
def upstream(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.5}))))


@pytest.fixture
async def engine(upstream):
    async with OpenAIHTTPEngine(upstream.url + "/v1") as eng:
        yield eng


async def test_stream_matches_the_servers_completion(engine, upstream):
    chunks = await collect(engine, request("oa-1"))
    direct = httpx.post(upstream.url + "/v1/completions", json={
        "model": "m", "prompt": "The capital of France is", "max_tokens": 10,
        "temperature": 0}).json()
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == direct["choices"][0]["text"]
    final = chunks[-1]
    assert final.finish_reason.type is FinishType.LENGTH
    assert final.completion_tokens == 10
    assert final.prompt_tokens == direct["usage"]["prompt_tokens"]


async def test_capabilities_are_honest(engine):
    caps = engine.capabilities()
    assert not caps.priority and not caps.token_ids and not caps.retention
    assert caps.logprobs  # the probe found that this server returns prompt logprobs
    assert engine.model_info().model_path == "progserve/sim-llama-3-8b"  # from /v1/models
    with pytest.raises(UnsupportedError):
        await collect(engine, request("rx", sampling=SamplingParams(regex="(a|b)")))


async def test_logprobs_output_and_prompt(engine):
    chunks = await collect(engine, request("lp-out", return_logprob=True))
    entries = [e for c in chunks for e in (c.output_logprobs or ())]
    assert len(entries) == 10 and all(lp <= 0 for lp, _, _ in entries)
    assert "".join(t for _, _, t in entries) == "".join(c.text for c in chunks)

    prompt = await collect(engine, request("lp-in", return_logprob=True, logprob_start_len=0))
    final = prompt[-1]
    assert len(final.input_logprobs) == final.prompt_tokens
    assert final.input_logprobs[0][0] is None
    assert len(final.output_logprobs) == final.completion_tokens == 10
    assert final.text == "".join(c.text for c in chunks)  # the echo was cut off


async def test_logprobs_refused_when_the_server_has_none(upstream):
    async with OpenAIHTTPEngine(upstream.url, logprobs=False) as engine:
        assert not engine.capabilities().logprobs
        with pytest.raises(UnsupportedError, match="logprobs"):
            await collect(engine, request("no-lp", return_logprob=True))


async def test_abort_mid_stream(engine, upstream):
    stream = engine.generate(request("oa-abort", sampling=SamplingParams(
        max_new_tokens=4000, ignore_eos=True)))
    await anext(stream)
    await engine.abort("oa-abort")
    rest = [c async for c in stream]
    assert rest[-1].finish_reason.type is FinishType.ABORT
    with pytest.raises(UnknownRequestError):
        await engine.abort("oa-abort")


# ------------------------------------------------------------------ recorded answers


@pytest.fixture(scope="module")
def recorded(recorded_upstream):
    upstream, server = recorded_upstream()
    upstream.answer("GET", "/v1/models", b'{"data": [{"id": "Qwen/Qwen2.5-7B-Instruct"}]}')
    return upstream, server


async def recorded_engine(recorded, file: str, status: int = 200) -> OpenAIHTTPEngine:
    upstream, server = recorded
    upstream.answer("POST", "/v1/completions", FIXTURES / file, status=status,
                    content_type="text/event-stream" if file.endswith(".sse")
                    else "application/json")
    engine = OpenAIHTTPEngine(server.url + "/v1", logprobs=False)
    await engine.start()
    return engine


async def test_recorded_vllm_stream_with_usage(recorded):
    engine = await recorded_engine(recorded, "completions_stream.sse")
    chunks = await collect(engine, request("rec", sampling=SamplingParams(
        max_new_tokens=20, temperature=0.2, stop=["\n"], seed=3)))
    assert [c.text for c in chunks if c.text] == [" Paris", " is", " the capital."]
    final = chunks[-1]
    assert final.finish_reason.type is FinishType.STOP
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (6, 5, 4)
    sent = [body for _, path, body in recorded[0].sent if path == "/v1/completions"][-1]
    assert sent == {"model": "Qwen/Qwen2.5-7B-Instruct", "prompt": "The capital of France is",
                    "max_tokens": 20, "temperature": 0.2, "top_p": 1.0, "stream": True,
                    "stream_options": {"include_usage": True}, "stop": ["\n"], "seed": 3}
    assert (await engine.stats()).cache_hit_tokens == 4


async def test_recorded_stream_without_usage_counts_tokens(recorded):
    engine = await recorded_engine(recorded, "completions_stream_no_usage.sse")
    chunks = await collect(engine, request("rec"))
    assert chunks[-1].finish_reason.type is FinishType.LENGTH
    assert chunks[-1].completion_tokens == 2


async def test_recorded_errors_are_typed(recorded):
    engine = await recorded_engine(recorded, "error_400.json", status=400)
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        await collect(engine, request("bad"))
    engine = await recorded_engine(recorded, "error_400.json", status=429)
    with pytest.raises(EngineOverloadedError):
        await collect(engine, request("busy"))


def test_logprob_requests_are_a_clear_400_without_logprobs(upstream, serve_in_thread):
    """A progserve whose engine cannot give logprobs says so: 400, never a 500."""
    import openai

    front = serve_in_thread(create_app(ServerRuntime(Settings(
        engine="openai", engine_url=[upstream.url + "/v1"], http_engine={"logprobs": False}))))
    resp = httpx.post(front.url + "/generate", json={
        "text": "hi", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "logprobs_unsupported"
    assert "logprobs" in resp.json()["error"]["message"]
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="m", logprobs=True, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    ok = client.chat.completions.create(model="m", max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}])
    # The upstream sim's synthetic reply may end (EOS) before the limit: 1 or 2 tokens.
    assert 1 <= ok.usage.completion_tokens <= 2
    assert ok.choices[0].finish_reason in ("stop", "length")
