"""`SGLangHTTPEngine` against a real server speaking SGLang's native protocol (progserve
serving the sim engine), and against recorded answers in SGLang's documented format."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from engine_backend.engine_rank import RANK_MAX
from engine_backend.errors import (
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
)
from engine_backend.priority_file import program_of_rid
from engine_backend.sglang_http import SGLangHTTPEngine
from engine_backend.sglang_priority_writer import ProgramPriorityWriter
from engine_backend.types import FinishType, GenerateRequest, SamplingParams
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sglang"


def request(rid: str, text: str = "The capital of France is", **kw) -> GenerateRequest:
    sampling = kw.pop("sampling", None) or SamplingParams(max_new_tokens=12, temperature=0)
    return GenerateRequest(rid=rid, text=text, sampling=sampling, **kw)


async def collect(engine, req):
    return [chunk async for chunk in engine.generate(req)]


# ------------------------------------------------------------------ live server


@pytest.fixture(scope="module")
def upstream(serve_in_thread):
    """A server speaking SGLang's protocol; real-time decoding a few ms per token."""
    return serve_in_thread(create_app(ServerRuntime(Settings(
        sim={"time_scale": 0.5}, limits={"max_tokens": 5000}))))


@pytest.fixture
async def engine(upstream):
    async with SGLangHTTPEngine(upstream.url) as eng:
        yield eng


def upstream_running(upstream) -> int:
    return upstream.call(upstream.app.state.runtime.engines[0].stats()).running


async def test_stream_deltas_rebuild_the_servers_answer(engine, upstream):
    chunks = await collect(engine, request("live-1"))
    direct = httpx.post(upstream.url + "/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()
    assert len(chunks) > 2  # streamed
    assert "".join(c.text for c in chunks) == direct["text"]
    assert [t for c in chunks for t in c.token_ids] == direct["output_ids"]
    final = chunks[-1]
    assert final.finish_reason is not None and final.finish_reason.type is FinishType.LENGTH
    assert final.completion_tokens == 12
    assert final.prompt_tokens == direct["meta_info"]["prompt_tokens"]
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_cached_tokens_and_logprobs(engine):
    prompt = "A shared system prompt for caching. " * 10
    await collect(engine, request("warm", prompt))
    chunks = await collect(engine, request("hot", prompt, return_logprob=True,
                                           logprob_start_len=0))
    final = chunks[-1]
    assert final.cached_tokens > 0
    assert len(final.input_logprobs) == final.prompt_tokens
    assert final.input_logprobs[0][0] is None
    outputs = [e for c in chunks for e in (c.output_logprobs or ())]
    assert len(outputs) == final.completion_tokens
    assert [e[1] for e in outputs] == [t for c in chunks for t in c.token_ids]
    assert "".join(e[2] for e in outputs) == "".join(c.text for c in chunks)


async def test_model_info_and_health(engine, upstream):
    assert engine.model_info().model_path == "progserve/sim-llama-3-8b"
    assert engine.model_info().max_context_len == 32768
    assert await engine.health()
    caps = engine.capabilities()
    assert caps.priority and caps.logprobs and caps.token_ids and caps.abort


async def test_abort_ends_the_stream_with_abort(engine, upstream):
    req = request("live-abort", sampling=SamplingParams(max_new_tokens=4000, ignore_eos=True))
    stream = engine.generate(req)
    first = await anext(stream)
    assert first.finish_reason is None
    await engine.abort("live-abort")
    rest = [c async for c in stream]
    assert rest[-1].finish_reason.type is FinishType.ABORT
    assert upstream_running(upstream) == 0
    with pytest.raises(UnknownRequestError):
        await engine.abort("live-abort")


async def test_closing_the_stream_aborts_upstream(engine, upstream):
    stream = engine.generate(request("live-close",
                                     sampling=SamplingParams(max_new_tokens=4000,
                                                             ignore_eos=True)))
    await anext(stream)
    assert upstream_running(upstream) == 1
    await stream.aclose()
    for _ in range(100):
        if upstream_running(upstream) == 0:
            break
        await asyncio.sleep(0.005)
    assert upstream_running(upstream) == 0


async def test_upstream_rejection_is_invalid_request(engine):
    too_long = request("too-long", sampling=SamplingParams(max_new_tokens=6000))
    with pytest.raises(InvalidRequestError, match="over this server's limit"):
        await collect(engine, too_long)


async def test_unreachable_replica():
    engine = SGLangHTTPEngine("http://127.0.0.1:9", connect_timeout=0.5)
    await engine.start()  # a replica that is down does not stop the server from starting
    try:
        assert not await engine.health()
        with pytest.raises(EngineUnavailableError):
            await collect(engine, request("down"))
    finally:
        await engine.close()


# ------------------------------------------------------------------ recorded answers


@pytest.fixture(scope="module")
def recorded(recorded_upstream):
    """A loopback server answering with SGLang's recorded responses."""
    upstream, server = recorded_upstream()
    for name in ("get_model_info", "get_server_info"):
        upstream.answer("GET", f"/{name}", FIXTURES / f"{name}.json")
    upstream.answer("POST", "/abort_request", b"")
    return upstream, server


async def recorded_engine(recorded, stream_file: str, status: int = 200, **kw):
    upstream, server = recorded
    upstream.answer("POST", "/generate", FIXTURES / stream_file, status=status,
                    content_type="text/event-stream")
    engine = SGLangHTTPEngine(server.url, **kw)
    await engine.start()
    return engine


def last_generate(recorded) -> dict:
    return next(body for method, path, body in reversed(recorded[0].sent)
                if path == "/generate")


async def test_recorded_stream_and_request_format(recorded):
    engine = await recorded_engine(recorded, "generate_stream.sse")
    req = request("rec-1", priority=250,
                  sampling=SamplingParams(max_new_tokens=16, temperature=0.5, stop=["\n"],
                                          seed=7))
    chunks = await collect(engine, req)
    assert [c.text for c in chunks] == [" Paris", " is", " the capital."]
    assert [c.token_ids for c in chunks] == [[12366], [374], [279, 6864, 13]]
    final = chunks[-1]
    assert final.finish_reason.type is FinishType.STOP and final.finish_reason.matched == 128009
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (6, 5, 4)
    assert engine.model_info().model_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert engine.model_info().max_context_len == 131072
    assert (await engine.stats()).kv_capacity_tokens == 455000
    body = last_generate(recorded)
    assert body["rid"] == "rec-1" and body["stream"] is True
    assert body["text"] == "The capital of France is"
    # An engine rank is lower first; SGLang serves larger values first by default.
    assert body["priority"] == -250
    assert body["sampling_params"] == {"max_new_tokens": 16, "temperature": 0.5, "top_p": 1.0,
                                       "top_k": -1, "ignore_eos": False, "stop": ["\n"],
                                       "sampling_seed": 7}
    await engine.close()


async def test_priority_conventions(recorded):
    default = await recorded_engine(recorded, "generate_stream.sse")
    low_first = await recorded_engine(recorded, "generate_stream.sse",
                                      low_priority_values_first=True)
    assert default.sglang_priority(0) > default.sglang_priority(1)  # urgent ranks higher
    assert low_first.sglang_priority(0) < low_first.sglang_priority(1)
    # A rank is never clamped; only a value outside the unit (a client hint) is bounded.
    assert default.sglang_priority(RANK_MAX) == -RANK_MAX
    assert default.sglang_priority(1e12) == -RANK_MAX
    no_priority = await recorded_engine(recorded, "generate_stream.sse", send_priority=False)
    await collect(no_priority, request("p"))
    assert "priority" not in last_generate(recorded)
    assert not no_priority.capabilities().priority
    for engine in (default, low_first, no_priority):
        await engine.close()


async def test_recorded_incremental_ids_logprobs_and_abort(recorded):
    engine = await recorded_engine(recorded, "generate_stream_incremental_ids.sse")
    chunks = await collect(engine, request("rec-2"))
    assert [t for c in chunks for t in c.token_ids] == [12366, 374, 279, 6864, 13]
    assert chunks[-1].finish_reason.type is FinishType.LENGTH

    engine = await recorded_engine(recorded, "generate_stream_logprobs.sse")
    chunks = await collect(engine, request("rec-3", return_logprob=True, logprob_start_len=0))
    assert last_generate(recorded)["return_text_in_logprobs"] is True
    assert [c.output_logprobs for c in chunks] == [[(-0.05, 12366, " Paris")],
                                                  [(-0.4, 374, " is")]]
    assert chunks[-1].input_logprobs[0] == (None, 128000, "<|begin_of_text|>")

    engine = await recorded_engine(recorded, "generate_stream_abort.sse")
    chunks = await collect(engine, request("rec-6"))
    assert chunks[-1].finish_reason.type is FinishType.ABORT
    assert chunks[-1].finish_reason.message == "Abort before prefill"


async def test_recorded_failures(recorded):
    engine = await recorded_engine(recorded, "generate_stream_error.sse")
    with pytest.raises(InvalidRequestError, match="context length"):
        await collect(engine, request("err"))
    engine = await recorded_engine(recorded, "generate_stream_truncated.sse")
    with pytest.raises(EngineUnavailableError, match="without a finish reason"):
        await collect(engine, request("cut"))
    engine = await recorded_engine(recorded, "generate_stream.sse", status=503)
    with pytest.raises(EngineOverloadedError, match="sglang"):
        await collect(engine, request("busy"))


async def test_connections_are_kept_alive(engine, upstream):
    """A finished stream returns its connection to the pool: one connection serves many
    calls (a new TCP connection per call would cost more than the proxy itself)."""
    for i in range(5):
        await collect(engine, request(f"ka-{i}", sampling=SamplingParams(max_new_tokens=2)))
    assert len(engine.client.transport._idle) == 1


async def test_retention_hints_reach_the_priority_file_and_rids_name_the_program(
        recorded, tmp_path):
    path = tmp_path / "priorities.json"
    writer = ProgramPriorityWriter(path, interval_s=0.01)
    engine = await recorded_engine(recorded, "generate_stream.sse", priority_writer=writer)
    plain = await recorded_engine(recorded, "generate_stream.sse")
    assert engine.capabilities().retention and not plain.capabilities().retention
    await collect(engine, request("chatcmpl-1", program_id="tenant/prog-1"))
    assert program_of_rid(last_generate(recorded)["rid"]) == "tenant/prog-1"
    await collect(engine, request("tenant/prog-1/c2/ab12", program_id="tenant/prog-1"))
    assert last_generate(recorded)["rid"] == "tenant/prog-1/c2/ab12"  # names it already
    await collect(plain, request("chatcmpl-2", program_id="tenant/prog-1"))
    assert last_generate(recorded)["rid"] == "chatcmpl-2"  # hints off: passed through
    await engine.retain("prog-2", True)
    await engine.program_ended("tenant/prog-1")
    assert not path.exists()  # written off the hot path, a moment later
    for _ in range(2000):  # up to 10 s on a loaded machine
        if path.exists():
            break
        await asyncio.sleep(0.005)
    assert json.loads(path.read_text()) == {
        "pinned": ["prog-2"], "priorities": {}, "ended": ["tenant/prog-1"]}
    await engine.program_ended("prog-2")  # ending also unpins
    await engine.close()  # writes what is pending
    assert json.loads(path.read_text())["ended"] == ["tenant/prog-1", "prog-2"]
    assert json.loads(path.read_text())["pinned"] == []
    await plain.close()


async def test_abort_reaches_a_request_renamed_for_its_program(upstream, tmp_path):
    writer = ProgramPriorityWriter(tmp_path / "priorities.json")
    async with SGLangHTTPEngine(upstream.url, priority_writer=writer) as engine:
        req = request("renamed", program_id="prog-9",
                      sampling=SamplingParams(max_new_tokens=4000, ignore_eos=True))
        stream = engine.generate(req)
        await anext(stream)
        await engine.abort("renamed")
        rest = [c async for c in stream]
        assert rest[-1].finish_reason.type is FinishType.ABORT
        assert upstream_running(upstream) == 0


async def test_the_scheduler_tells_sglang_when_a_program_ends(upstream, tmp_path):
    """progserve's scheduler over an SGLang replica with the priority file: a tagged
    program's calls reach SGLang under rids naming it, and its end lands in the file
    the plugin reads; an untagged call's program is never listed."""
    from scheduler.config import SchedulerConfig
    from scheduler.scheduler import Scheduler

    path = tmp_path / "priorities.json"
    engine = SGLangHTTPEngine(upstream.url, priority_writer=ProgramPriorityWriter(
        path, interval_s=0.01))
    scheduler = Scheduler([engine], SchedulerConfig())
    await scheduler.start()
    seen: list[str] = []
    real_json = engine.request_json
    engine.request_json = lambda req, rid=None: seen.append(rid) or real_json(req, rid)
    try:
        pid = await scheduler.open_program("agent-7")
        for turn in range(2):
            async for _ in scheduler.llm_call(pid, request(f"chatcmpl-{turn}")):
                pass
        await scheduler.end_program(pid)
        single = await scheduler.open_program(None)
        async for _ in scheduler.llm_call(single, request("chatcmpl-solo")):
            pass
    finally:
        await scheduler.close()
        await engine.close()
    assert [program_of_rid(rid) for rid in seen[:2]] == ["agent-7", "agent-7"]
    assert seen[2] == "chatcmpl-solo"  # an untagged call has no program to name
    assert json.loads(path.read_text())["ended"] == ["agent-7"]


# ------------------------------------------------------------------ injected transports


def sglang_transport(generate_events=None, **answers):
    """An SGLang upstream in-process: model info, and `/generate` answered with
    `generate_events` (cumulative events) or a one-token answer."""
    from engine_backend.http.transport import MockResponse, MockTransport

    def handler(req):
        if req.target == "/get_model_info":
            return MockResponse.json({"model_path": "m", "is_generation": True})
        if req.target in answers:
            return answers[req.target](req)
        if req.target == "/generate":
            events = generate_events or [{"text": " a", "output_ids": [1], "meta_info": {
                "id": "x", "finish_reason": {"type": "length", "length": 1},
                "prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0}}]
            if req.json().get("stream"):
                return MockResponse.sse(events)
            return MockResponse.json(events[-1])
        return MockResponse.json({"detail": "Not Found"}, status=404)

    return MockTransport(handler)


async def test_a_server_that_is_not_sglang_fails_at_start():
    """`--engine sglang` in front of an OpenAI-only server (vLLM) must not turn every call
    into a 404 `unknown_request`: start-up fails, naming the upstream."""
    from fake_openai import FakeOpenAI

    from engine_backend.errors import UpstreamProtocolError
    from progserve.runtime import ServerRuntime

    engine = SGLangHTTPEngine("http://vllm:8000", transport=FakeOpenAI().transport())
    with pytest.raises(UpstreamProtocolError, match="sglang http://vllm:8000.*get_model_info"):
        await engine.start()
    runtime = ServerRuntime(Settings(engine="sglang"), engines=[SGLangHTTPEngine(
        "http://vllm:8000", transport=FakeOpenAI().transport())])
    with pytest.raises(UpstreamProtocolError, match="--engine openai"):
        await runtime.start()


async def test_a_generate_route_that_answers_404_is_a_502_naming_the_upstream():
    from engine_backend.errors import UpstreamProtocolError
    from engine_backend.http.transport import MockResponse
    from progserve.errors import classify

    gone = sglang_transport(**{"/generate": lambda req: MockResponse.json(
        {"detail": "Not Found"}, status=404)})
    async with SGLangHTTPEngine("http://proxy:1", transport=gone) as engine:
        for stream in (True, False):
            with pytest.raises(UpstreamProtocolError) as info:
                await collect(engine, request("x", stream=stream))
            assert classify(info.value).status == 502
            assert "sglang http://proxy:1: /generate answered 404" in str(info.value)


@pytest.mark.parametrize("field", ["cache_salt", "extra_key", "off"])
async def test_the_tenant_salt_reaches_sglang(field):
    transport = sglang_transport()
    async with SGLangHTTPEngine("http://sglang:30000", transport=transport,
                                cache_salt_field=field) as engine:
        await collect(engine, request("salted", cache_salt="tenant-alice"))
        await collect(engine, request("plain"))
    salted, plain = transport.sent("/generate")
    if field == "off":
        assert "cache_salt" not in salted and "extra_key" not in salted
    else:
        assert salted[field] == "tenant-alice"
    assert "cache_salt" not in plain and "extra_key" not in plain


async def test_top_logprobs_come_through_from_sglang():
    def event(n, finish=None):
        return {"text": "".join(f" t{i}" for i in range(n)), "output_ids": list(range(n)),
                "meta_info": {"id": "x", "finish_reason": finish, "prompt_tokens": 2,
                              "completion_tokens": n, "cached_tokens": 0,
                              "output_token_logprobs": [[-0.1, i, f" t{i}"] for i in range(n)],
                              "output_top_logprobs": [[[-0.1, i, f" t{i}"], [-2.0, 99, " z"]]
                                                      for i in range(n)],
                              **({"input_token_logprobs": [[None, 5, "a"], [-1.0, 6, "b"]],
                                  "input_top_logprobs": [None, [[-1.0, 6, "b"]]]}
                                 if finish else {})}}

    transport = sglang_transport([event(1), event(2, {"type": "length", "length": 2})])
    async with SGLangHTTPEngine("http://sglang:30000", transport=transport) as engine:
        chunks = await collect(engine, request("top", return_logprob=True, top_logprobs_num=2,
                                               logprob_start_len=0))
    tops = [t for c in chunks for t in (c.output_top_logprobs or ())]
    assert tops == [[(-0.1, 0, " t0"), (-2.0, 99, " z")], [(-0.1, 1, " t1"), (-2.0, 99, " z")]]
    assert chunks[-1].input_top_logprobs == [[], [(-1.0, 6, "b")]]
