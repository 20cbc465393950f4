"""`OpenAIHTTPEngine` against the upstream behaviours issue 19 found in vLLM and
llama-cpp-python, played by `FakeOpenAI` behind an injected transport (no server)."""

from __future__ import annotations

import pytest
from fake_openai import FakeOpenAI, word_tokenizer

from engine_backend.errors import (
    EngineUnavailableError,
    StreamInterruptedError,
)
from engine_backend.openai_http import OpenAIHTTPEngine
from engine_backend.types import ChatPrompt, FinishType, GenerateRequest, SamplingParams

PROMPT = "one two three four five"


def request(rid: str = "r", text: str = PROMPT, max_tokens: int = 10, **kw) -> GenerateRequest:
    return GenerateRequest(rid=rid, text=text, sampling=SamplingParams(
        max_new_tokens=max_tokens, temperature=0), **kw)


def chat_request(rid: str = "c", max_tokens: int = 10, **kw) -> GenerateRequest:
    messages = [{"role": "user", "content": PROMPT}]
    return request(rid, "<rendered by progserve> " + PROMPT, max_tokens,
                   chat=ChatPrompt(messages=messages, **kw.pop("chat_kw", {})), **kw)


async def started(fake: FakeOpenAI, **kw) -> OpenAIHTTPEngine:
    engine = OpenAIHTTPEngine("http://upstream:8000/v1", transport=fake.transport(), **kw)
    await engine.start()
    return engine


async def collect(engine: OpenAIHTTPEngine, req: GenerateRequest) -> list:
    return [chunk async for chunk in engine.generate(req)]


def text_of(chunks: list) -> str:
    return "".join(c.text for c in chunks)


async def test_the_probe_learns_what_the_upstream_can_do():
    vllm = await started(FakeOpenAI(owned_by="vllm"))
    assert vllm.features.vllm and vllm.features.continuous_usage and vllm.features.logprobs
    assert vllm.features.tokenize == "vllm" and vllm.features.model == "fake/model"
    assert vllm.model_info().max_context_len == 2048
    llama = await started(FakeOpenAI(owned_by="llamacpp"))
    assert not llama.features.vllm and not llama.features.continuous_usage
    assert llama.features.tokenize == "llama-cpp-python"
    bare = await started(FakeOpenAI(owned_by="llamacpp", tokenize=False))
    assert bare.features.tokenize is None


# ------------------------------------------------------------------ defect 1: prefill only


@pytest.mark.parametrize("owned_by", ["vllm", "llamacpp"])
async def test_prefill_only_never_sends_max_tokens_0(owned_by):
    fake = FakeOpenAI(owned_by=owned_by)
    engine = await started(fake)
    chunks = await collect(engine, request(max_tokens=0))
    final = chunks[-1]
    assert [b["max_tokens"] for b in fake.sent("/v1/completions")][-1] == 1
    assert text_of(chunks) == "" and final.completion_tokens == 0
    assert final.finish_reason.type is FinishType.LENGTH
    assert final.prompt_tokens == 5
    # Prompt logprobs with no output (select's scoring call) too.
    chunks = await collect(engine, request("s", max_tokens=0, return_logprob=True,
                                           logprob_start_len=0))
    assert fake.sent("/v1/completions")[-1]["max_tokens"] == 1
    assert len(chunks[-1].input_logprobs) == 5 and not chunks[-1].output_logprobs
    assert chunks[-1].text == "" and chunks[-1].completion_tokens == 0


# ------------------------------------------------------------------ defect 2: cut streams


@pytest.mark.parametrize("counter", ["tokenize route", "local tokenizer"])
async def test_a_cut_stream_resumes_on_the_replica_within_max_tokens(tmp_path, counter):
    fake = FakeOpenAI(owned_by="llamacpp", cut_after=4, cuts=2,
                      tokenize=counter == "tokenize route")
    engine = await started(fake, tokenizer=word_tokenizer(tmp_path / "tok")
                           if counter == "local tokenizer" else None)
    chunks = await collect(engine, request(max_tokens=10))
    assert text_of(chunks) == "".join(f" w{i}" for i in range(4)) * 2 + " w0 w1"
    final = chunks[-1]
    assert final.finish_reason.type is FinishType.LENGTH
    assert final.completion_tokens == 10 and final.prompt_tokens == 5
    bodies = fake.sent("/v1/completions")[-3:]
    assert [b["max_tokens"] for b in bodies] == [10, 6, 2]  # the rest, each time
    assert bodies[1]["prompt"] == PROMPT + " w0 w1 w2 w3"  # prompt plus the output so far
    stats = await engine.stats()
    assert stats.preemptions == 2  # counted as the engine's own preemptions


async def test_a_cut_stream_that_cannot_be_counted_fails_clearly_and_the_replica_stays_up():
    fake = FakeOpenAI(owned_by="llamacpp", cut_after=2, cuts=1, tokenize=False)
    engine = await started(fake)
    with pytest.raises(StreamInterruptedError, match="cannot be counted"):
        await collect(engine, request(max_tokens=5))
    assert StreamInterruptedError.status_code == 503  # busy, retry: not a dead replica
    assert not issubclass(StreamInterruptedError, EngineUnavailableError)


async def test_a_cut_before_any_output_is_sent_again():
    fake = FakeOpenAI(owned_by="llamacpp", cut_after=0, cuts=1)
    engine = await started(fake)
    chunks = await collect(engine, request(max_tokens=3))
    assert text_of(chunks) == " w0 w1 w2" and chunks[-1].completion_tokens == 3


async def test_a_cut_chat_answer_continues_where_the_upstream_can(tmp_path):
    fake = FakeOpenAI(owned_by="vllm", cut_after=3, cuts=1)
    engine = await started(fake)
    chunks = await collect(engine, chat_request(max_tokens=5))
    assert text_of(chunks) == " w0 w1 w2 w3 w4"  # vLLM continued the partial answer
    body = fake.sent("/v1/chat/completions")[-1]
    assert body["continue_final_message"] is True and body["max_tokens"] == 2
    assert body["messages"][-1] == {"role": "assistant", "content": " w0 w1 w2"}
    assert chunks[-1].completion_tokens == 5


async def test_a_cut_chat_answer_that_cannot_continue_fails_clearly(tmp_path):
    fake = FakeOpenAI(owned_by="llamacpp", cut_after=3, cuts=1)
    engine = await started(fake, tokenizer=word_tokenizer(tmp_path / "tok"))
    with pytest.raises(StreamInterruptedError, match="cannot continue a partial chat"):
        await collect(engine, chat_request(max_tokens=5))


async def test_the_scheduler_keeps_a_replica_up_through_cut_streams(tmp_path):
    from scheduler.config import SchedulerConfig
    from scheduler.scheduler import Scheduler

    fake = FakeOpenAI(owned_by="llamacpp", cut_after=2, cuts=3)
    engine = OpenAIHTTPEngine("http://upstream:8000", transport=fake.transport(),
                              tokenizer=word_tokenizer(tmp_path / "tok"))
    scheduler = Scheduler([engine], SchedulerConfig())
    await scheduler.start()
    try:
        pid = await scheduler.open_program(None)
        chunks = [c async for c in scheduler.llm_call(pid, request(max_tokens=7))]
        assert chunks[-1].completion_tokens == 7 and len(text_of(chunks).split()) == 7
        assert scheduler.replicas[0].healthy
        assert scheduler.health.counters.downs == 0
    finally:
        await scheduler.close()
        await engine.close()


# ------------------------------------------------------------------ defect 3: chat upstream


async def test_chat_goes_to_the_chat_route_with_tools_and_tool_choice():
    fake = FakeOpenAI(owned_by="vllm")
    engine = await started(fake)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = await collect(engine, chat_request(chat_kw={"tools": tools, "tool_choice": choice}))
    body = fake.sent("/v1/chat/completions")[-1]
    assert body["messages"] == [{"role": "user", "content": PROMPT}]  # not a ChatML text
    assert body["tools"] == tools and body["tool_choice"] == choice
    assert "prompt" not in body
    assert not [b for b in fake.sent("/v1/completions") if PROMPT in str(b.get("prompt"))]
    assert text_of(chunks) == "".join(f" w{i}" for i in range(10))


async def test_structured_tool_calls_become_tool_call_blocks():
    from progserve.chat_template import parse_tool_calls

    deltas = [{"role": "assistant", "content": None, "tool_calls": [{
                  "index": 0, "id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
              {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}]

    async def events():
        for i, delta in enumerate(deltas):
            yield {"choices": [{"index": 0, "delta": delta,
                                "finish_reason": "tool_calls" if i == len(deltas) - 1 else None}]}
        yield {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}

    fake = FakeOpenAI(owned_by="vllm")
    transport = fake.transport()
    plain = transport.handler

    def handler(req):
        from engine_backend.http.transport import MockResponse

        if req.target.endswith("/chat/completions") and req.json().get("stream"):
            return MockResponse.sse(events())
        return plain(req)

    transport.handler = handler
    engine = OpenAIHTTPEngine("http://upstream:8000", transport=transport)
    await engine.start()
    chunks = await collect(engine, chat_request())
    content, calls = parse_tool_calls(text_of(chunks), {"get_weather", "get_time"})
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert not (content or "").strip()
    assert chunks[-1].finish_reason.type is FinishType.STOP


# ------------------------------------------------------------------ defect 4: usage


async def test_usage_is_counted_when_the_upstream_sends_none(tmp_path):
    fake = FakeOpenAI(owned_by="llamacpp", tokenize=False)  # no usage, no tokenize route
    bare = await started(fake)
    final = (await collect(bare, request(max_tokens=4)))[-1]
    assert final.prompt_tokens > 0  # estimated: never 0 for a prompt that is not empty
    assert final.completion_tokens == 4  # one event per token
    counted = await started(fake, tokenizer=word_tokenizer(tmp_path / "tok"))
    final = (await collect(counted, request(max_tokens=4)))[-1]
    assert (final.prompt_tokens, final.completion_tokens) == (5, 4)
    chat = (await collect(counted, chat_request(max_tokens=3)))[-1]
    assert chat.prompt_tokens > 0 and chat.completion_tokens == 3
    remote = await started(FakeOpenAI(owned_by="llamacpp"))  # llama-cpp-python's route
    final = (await collect(remote, request(max_tokens=4)))[-1]
    assert (final.prompt_tokens, final.completion_tokens) == (5, 4)


async def test_streams_ask_for_usage_on_every_chunk_where_the_upstream_has_it():
    fake = FakeOpenAI(owned_by="vllm")
    engine = await started(fake)
    chunks = await collect(engine, request(max_tokens=4))
    assert fake.sent("/v1/completions")[-1]["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True}
    assert [c.completion_tokens for c in chunks[:-1]] == [1, 2, 3, 4]
    assert chunks[-1].prompt_tokens == 5


# ------------------------------------------------------------------ defect 5: top logprobs


async def test_top_logprobs_are_carried_for_completions_and_chat():
    fake = FakeOpenAI(owned_by="vllm")
    engine = await started(fake)
    chunks = await collect(engine, request(max_tokens=2, return_logprob=True,
                                           top_logprobs_num=3))
    tops = [t for c in chunks for t in (c.output_top_logprobs or ())]
    assert len(tops) == 2 and [len(t) for t in tops] == [3, 3]
    assert tops[0][0] == (-0.5, -1, " w0") and tops[0][1][2] == " alt0"
    chunks = await collect(engine, chat_request(max_tokens=2, return_logprob=True,
                                                top_logprobs_num=2))
    assert fake.sent("/v1/chat/completions")[-1]["top_logprobs"] == 2
    tops = [t for c in chunks for t in (c.output_top_logprobs or ())]
    assert [[text for _, _, text in t] for t in tops] == [[" w0", " alt0"], [" w1", " alt0"]]
    whole = await collect(engine, request(max_tokens=2, return_logprob=True, top_logprobs_num=2,
                                          stream=False))
    assert len(whole[-1].output_top_logprobs) == 2
    without = await collect(engine, request(max_tokens=2, return_logprob=True))
    assert all(c.output_top_logprobs is None for c in without)


# ------------------------------------------------------------------ 18.4: cache salt


async def test_the_tenant_salt_reaches_vllm_as_cache_salt():
    fake = FakeOpenAI(owned_by="vllm")
    engine = await started(fake)
    await collect(engine, request(cache_salt="tenant-alice"))
    await collect(engine, chat_request(cache_salt="tenant-bob", stream=False))
    assert fake.sent("/v1/completions")[-1]["cache_salt"] == "tenant-alice"
    assert fake.sent("/v1/chat/completions")[-1]["cache_salt"] == "tenant-bob"
    other = FakeOpenAI(owned_by="llamacpp")  # auto: only where it is honoured
    engine = await started(other)
    await collect(engine, request(cache_salt="tenant-alice"))
    assert "cache_salt" not in other.sent("/v1/completions")[-1]
    forced = await started(other, cache_salt="on")
    await collect(forced, request(cache_salt="tenant-alice"))
    assert other.sent("/v1/completions")[-1]["cache_salt"] == "tenant-alice"


# ------------------------------------------------------------------ 18.10: broken streams


async def test_a_broken_stream_says_what_it_delivered(tmp_path):
    fake = FakeOpenAI(owned_by="vllm", die_after=3)
    engine = await started(fake)
    chunks = []
    with pytest.raises(EngineUnavailableError, match="openai http://upstream:8000") as info:
        async for chunk in engine.generate(request(max_tokens=10)):
            chunks.append(chunk)
    assert len(chunks) == 3 and chunks[-1].completion_tokens == 3  # usage on each chunk
    assert info.value.resumable and info.value.delivered_tokens == 3
    assert info.value.prompt_tokens == 5


async def test_a_broken_stream_is_counted_locally_or_not_resumed(tmp_path):
    fake = FakeOpenAI(owned_by="llamacpp", die_after=3)
    counted = await started(fake, tokenizer=word_tokenizer(tmp_path / "tok"))
    with pytest.raises(EngineUnavailableError) as info:
        await collect(counted, request(max_tokens=10))
    assert info.value.resumable and info.value.delivered_tokens == 3
    assert info.value.prompt_tokens == 5
    blind = await started(fake)  # no per-chunk usage, no local tokenizer
    with pytest.raises(EngineUnavailableError, match="cannot resume") as info:
        await collect(blind, request(max_tokens=10))
    assert not info.value.resumable
    with pytest.raises(EngineUnavailableError) as info:  # nothing delivered: resumable
        await collect(await started(FakeOpenAI(owned_by="llamacpp", die_after=0)), request())
    assert info.value.resumable and info.value.delivered_tokens == 0


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_the_scheduler_resumes_a_broken_call_for_the_rest_of_its_tokens(kind):
    """Replica 0 dies after 3 tokens; the call goes on on replica 1 with 7 more tokens at
    most (a chat answer continued), and usage counts the 10 the client got."""
    from scheduler.config import SchedulerConfig
    from scheduler.scheduler import Scheduler

    dying, healthy = FakeOpenAI(die_after=3), FakeOpenAI()
    engines = [OpenAIHTTPEngine(f"http://replica{i}:8000", transport=fake.transport())
               for i, fake in enumerate((dying, healthy))]
    scheduler = Scheduler(engines, SchedulerConfig(balance="round_robin"))
    await scheduler.start()
    try:
        pid = await scheduler.open_program(None)
        req = chat_request(max_tokens=10) if kind == "chat" else request(max_tokens=10)
        chunks = [c async for c in scheduler.llm_call(pid, req)]
    finally:
        await scheduler.close()
        for engine in engines:
            await engine.close()
    assert text_of(chunks).split() == [f"w{i}" for i in range(3)] + (
        [f"w{i}" for i in range(3, 10)] if kind == "chat" else [f"w{i}" for i in range(7)])
    assert chunks[-1].completion_tokens == 10
    assert chunks[-1].prompt_tokens == 5  # the original prompt, not the resumed one
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    resumed = healthy.sent(route)[-1]
    assert resumed["max_tokens"] == 7
    assert scheduler.health.counters.failovers == 1
