"""`GenerateRequest.stream=False`: the HTTP engines make one non-streamed upstream call
and yield the whole answer as a single final chunk, equal to what the stream rebuilds."""

from __future__ import annotations

import asyncio

import pytest

from engine_backend.openai_http import OpenAIHTTPEngine
from engine_backend.sglang_http import SGLangHTTPEngine
from engine_backend.types import FinishType, GenerateRequest, SamplingParams
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime


def request(rid: str, *, stream: bool, **kw) -> GenerateRequest:
    return GenerateRequest(rid=rid, text="The capital of France is", stream=stream,
                           sampling=SamplingParams(max_new_tokens=12, temperature=0), **kw)


async def collect(engine, req):
    return [chunk async for chunk in engine.generate(req)]


@pytest.fixture(scope="module")
def upstream(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.5}))))



async def test_sglang_whole_answer_is_one_final_chunk(upstream):
    async with SGLangHTTPEngine(upstream.url) as engine:
        streamed = await collect(engine, request("whole-s1", stream=True))
        whole = await collect(engine, request("whole-s2", stream=False, return_logprob=True))
    assert len(streamed) > 2 and len(whole) == 1
    final = whole[0]
    assert final.finish_reason is not None and final.finish_reason.type is FinishType.LENGTH
    assert final.text == "".join(c.text for c in streamed)
    assert final.token_ids == [t for c in streamed for t in c.token_ids]
    assert final.completion_tokens == 12 and final.prompt_tokens == streamed[-1].prompt_tokens
    assert final.output_logprobs is not None and len(final.output_logprobs) == 12


async def test_openai_whole_answer_is_one_final_chunk(upstream):
    async with OpenAIHTTPEngine(upstream.url + "/v1") as engine:
        streamed = await collect(engine, request("whole-o1", stream=True))
        whole = await collect(engine, request("whole-o2", stream=False, return_logprob=True))
    assert len(streamed) > 2 and len(whole) == 1
    final = whole[0]
    assert final.finish_reason is not None and final.finish_reason.type is FinishType.LENGTH
    assert final.text == "".join(c.text for c in streamed)
    assert final.completion_tokens == 12 and final.prompt_tokens == streamed[-1].prompt_tokens
    assert final.output_logprobs is not None and len(final.output_logprobs) == 12


def upstream_running(upstream) -> int:
    return upstream.call(upstream.app.state.runtime.engines[0].stats()).running


async def test_cancelled_whole_answer_aborts_upstream(upstream):
    """A non-streamed call whose consumer goes away (its client left) stops upstream."""
    long = SamplingParams(max_new_tokens=4000, ignore_eos=True)
    async with SGLangHTTPEngine(upstream.url) as engine:
        req = GenerateRequest(rid="whole-cancel", text="Tell me a story", stream=False,
                              sampling=long)
        task = asyncio.create_task(collect(engine, req))
        for _ in range(200):
            if upstream_running(upstream) == 1:
                break
            await asyncio.sleep(0.005)
        assert upstream_running(upstream) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if upstream_running(upstream) == 0:
                break
            await asyncio.sleep(0.005)
        assert upstream_running(upstream) == 0
