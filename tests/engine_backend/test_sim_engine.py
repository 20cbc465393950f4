"""SimEngine behaviour: batching order, chunked prefill, the prefix cache, retraction,
retention, aborts, determinism, real-time streaming and bad input."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from engine_backend.errors import InvalidRequestError, UnknownRequestError, UnsupportedError
from engine_backend.sim import SimConfig, SimEngine
from engine_backend.sim.cost_model import StepCostModel
from engine_backend.sim.responders import hash_text
from engine_backend.types import Chunk, FinishType, GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(n)]


def request(rid: str, prompt: list[int], out: int = 256, **kw: Any) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=prompt,
                           sampling=SamplingParams(max_new_tokens=out), **kw)


async def collect(engine: SimEngine, req: GenerateRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(req)]


def run(config: SimConfig, body: Callable[[SimEngine], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        async with SimEngine(config, **kw) as engine:
            return await body(engine)

    return run_virtual(main())


def test_waiting_queue_orders_by_priority_then_fcfs() -> None:
    config = SimConfig(max_running=1, stream_interval=0, priority_preemption=False)
    order: list[str] = []

    async def body(engine: SimEngine) -> None:
        async def one(rid: str, priority: float) -> None:
            engine.responder.expect(rid, 5)
            await collect(engine, request(rid, ids(50, hash_text(rid) % 1000), priority=priority))
            order.append(rid)

        blocker = asyncio.ensure_future(one("blocker", 0))
        await asyncio.sleep(0)  # the blocker is admitted first and runs alone
        queued = [("c1", 2.0), ("a1", 1.0), ("c2", 2.0), ("b", 1.5), ("a2", 1.0)]
        tasks = [asyncio.ensure_future(one(rid, p)) for rid, p in queued]
        await asyncio.gather(blocker, *tasks)

    run(config, body)
    assert order == ["blocker", "a1", "a2", "b", "c1", "c2"]


def test_priority_preemption_lets_an_urgent_request_in() -> None:
    config = SimConfig(max_running=1, stream_interval=0)

    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk], Any]:
        engine.responder.expect("slow", 400)
        engine.responder.expect("urgent", 5)
        slow = asyncio.ensure_future(collect(engine, request("slow", ids(100, 1), 500,
                                                            priority=5.0)))
        await asyncio.sleep(0.5)  # slow is decoding, and max_running is 1
        urgent = await collect(engine, request("urgent", ids(100, 2), priority=0.0))
        assert not slow.done()
        stats = await engine.stats()
        return await slow, urgent, stats

    slow, urgent, stats = run(config, body)
    assert stats.preemptions == 1
    assert 50 < stats.recomputed_tokens < 100  # its output so far; its prompt stayed cached
    assert urgent[-1].completion_tokens == 5
    assert slow[-1].completion_tokens == 400  # preempted, resumed, complete
    assert slow[-1].finish_reason.type is FinishType.STOP


def test_chunked_prefill_caps_prefill_tokens_per_step() -> None:
    config = SimConfig(chunked_prefill_tokens=64, stream_interval=0)
    steps: list[int] = []
    base = StepCostModel.llama3_8b_h100()

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(base, name)

        def step_time(self, prefill: int, pairs: int, batch: int, context: int) -> float:
            steps.append(prefill)
            return base.step_time(prefill, pairs, batch, context)

    async def body(engine: SimEngine) -> list[list[Chunk]]:
        engine.batcher.cost = Recording()  # type: ignore[assignment]
        engine.responder.expect("long", 3)
        engine.responder.expect("short", 3)
        return await asyncio.gather(collect(engine, request("long", ids(300, 1))),
                                    collect(engine, request("short", ids(40, 2))))

    long, short = run(config, body)
    assert max(steps) == 64
    assert sum(steps) == 340  # every prompt token prefilled exactly once
    assert len([s for s in steps if s]) == 6  # ceil(340 / 64)
    assert long[-1].completion_tokens == short[-1].completion_tokens == 3


def test_repeated_prefix_hits_the_cache() -> None:
    system = ids(500, 7)

    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk], Any]:
        first = await collect(engine, request("a", system + ids(20, 1), 10))
        second = await collect(engine, request("b", system + ids(20, 2), 10))
        return first, second, await engine.stats()

    first, second, stats = run(SimConfig(stream_interval=0), body)
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == 500
    assert stats.cache_hit_tokens == 500 and stats.cache_query_tokens == 1040


def test_growing_context_hits_previous_turn_including_output() -> None:
    async def body(engine: SimEngine) -> list[int]:
        context = ids(300, 3)
        cached = []
        for turn in range(3):
            rid = f"turn{turn}"
            engine.responder.expect(rid, 40)
            chunks = await collect(engine, request(rid, context, program_id="p"))
            cached.append(chunks[-1].cached_tokens)
            context = context + [t for c in chunks for t in c.token_ids] + ids(30, turn)
        return cached

    cached = run(SimConfig(stream_interval=0), body)
    assert cached == [0, 340, 410]  # prompt + output of the previous turn


def test_retraction_under_memory_pressure_completes_every_request() -> None:
    def workload(capacity: int) -> tuple[list[list[int]], Any]:
        async def body(engine: SimEngine) -> tuple[list[list[int]], Any]:
            reqs = []
            for i in range(8):
                engine.responder.expect(f"r{i}", 300)
                reqs.append(request(f"r{i}", ids(200, i), out=400))
            results = await asyncio.gather(*[collect(engine, r) for r in reqs])
            outputs = [[t for c in chunks for t in c.token_ids] for chunks in results]
            for chunks in results:
                assert chunks[-1].finish_reason.type is FinishType.STOP
                assert chunks[-1].completion_tokens == 300
            return outputs, await engine.stats()

        return run(SimConfig(kv_capacity_tokens=capacity, stream_interval=0), body)

    tight, tight_stats = workload(2_000)
    ample, ample_stats = workload(100_000)
    assert tight_stats.preemptions > 0
    assert tight_stats.recomputed_tokens > 0
    assert ample_stats.preemptions == 0
    assert tight == ample  # same outputs, token for token
    assert tight_stats.kv_used_tokens <= 2_000


def test_retain_keeps_a_pinned_program_prefix_while_others_are_evicted() -> None:
    def scenario(retain: bool) -> int:
        async def body(engine: SimEngine) -> int:
            context = ids(1_000, 99)
            engine.responder.expect("agent-1", 20)
            first = await collect(engine, request("agent-1", context, program_id="agent"))
            context += [t for c in first for t in c.token_ids]
            if retain:
                await engine.retain("agent", True)  # waiting on a tool
            for i in range(12):  # other programs flood the cache meanwhile
                engine.responder.expect(f"other-{i}", 20)
                await collect(engine, request(f"other-{i}", ids(1_000, i), program_id=f"o{i}"))
            if retain:
                await engine.retain("agent", False)
            engine.responder.expect("agent-2", 20)
            second = await collect(engine, request("agent-2", context + ids(10, 5),
                                                   program_id="agent"))
            return second[-1].cached_tokens

        return run(SimConfig(kv_capacity_tokens=4_000, eviction="priority",
                             stream_interval=0), body)

    assert scenario(retain=True) == 1_020
    assert scenario(retain=False) == 0


def test_an_ended_program_context_is_evicted_before_a_live_one() -> None:
    def scenario(hint: bool) -> int:
        async def body(engine: SimEngine) -> int:
            live = ids(1_000, 1)
            engine.responder.expect("live-1", 20)
            first = await collect(engine, request("live-1", live, program_id="live"))
            live += [t for c in first for t in c.token_ids]
            engine.responder.expect("ended-1", 20)  # more recent than live's context
            await collect(engine, request("ended-1", ids(1_000, 2), program_id="ended"))
            if hint:
                await engine.program_ended("ended")
            engine.responder.expect("big", 20)  # needs one of the two contexts' room
            await collect(engine, request("big", ids(2_500, 3), program_id="big"))
            engine.responder.expect("live-2", 20)
            second = await collect(engine, request("live-2", live + ids(10, 4),
                                                   program_id="live"))
            return second[-1].cached_tokens

        return run(SimConfig(kv_capacity_tokens=4_000, eviction="priority",
                             stream_interval=0), body)

    assert scenario(hint=True) == 1_020
    assert scenario(hint=False) == 0  # plain recency evicts the live program's context


def test_abort_queued_running_and_unknown() -> None:
    config = SimConfig(max_running=1, stream_interval=1, priority_preemption=False)

    async def body(engine: SimEngine) -> None:
        engine.responder.expect("running", 200)
        running = engine.generate(request("running", ids(100, 1)))
        first = await running.__anext__()
        assert first.token_ids and first.finish_reason is None
        queued = asyncio.ensure_future(collect(engine, request("queued", ids(100, 2))))
        await asyncio.sleep(0.05)
        assert (await engine.stats()).queue_len == 1
        await engine.abort("queued")
        queued_chunks = await queued
        assert queued_chunks[-1].finish_reason.type is FinishType.ABORT
        assert queued_chunks[-1].completion_tokens == 0
        await engine.abort("running")
        rest = [chunk async for chunk in running]
        assert rest[-1].finish_reason.type is FinishType.ABORT
        assert 0 < rest[-1].completion_tokens < 200
        stats = await engine.stats()
        assert stats.running == 0 and stats.queue_len == 0
        assert stats.kv_used_tokens == engine.cache.total_size()  # no private KV left
        assert engine.cache.protected_size() == 0  # no locks left
        with pytest.raises(UnknownRequestError):
            await engine.abort("running")  # already gone
        with pytest.raises(UnknownRequestError):
            await engine.abort("never-seen")

    run(config, body)


def test_consumer_aclose_aborts_and_frees_kv() -> None:
    async def body(engine: SimEngine) -> None:
        engine.responder.expect("r", 500)
        stream = engine.generate(request("r", ids(400, 1), 600))
        await stream.__anext__()
        await stream.__anext__()
        stats = await engine.stats()
        assert stats.running == 1 and stats.kv_used_tokens > engine.cache.total_size()
        await stream.aclose()  # type: ignore[attr-defined]
        stats = await engine.stats()
        assert stats.running == 0
        assert stats.kv_used_tokens == engine.cache.total_size()
        assert engine.cache.protected_size() == 0
        with pytest.raises(UnknownRequestError):
            await engine.abort("r")

    run(SimConfig(stream_interval=1), body)


def test_cancelled_consumer_task_aborts_the_request() -> None:
    async def body(engine: SimEngine) -> None:
        engine.responder.expect("r", 500)
        task = asyncio.ensure_future(collect(engine, request("r", ids(100, 1), 600)))
        await asyncio.sleep(0.2)
        assert (await engine.stats()).running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await engine.stats()
        assert stats.running == 0 and engine.cache.protected_size() == 0

    run(SimConfig(stream_interval=0), body)


def _mixed_workload(config: SimConfig) -> list[tuple[str, float, list[int], str]]:
    async def body(engine: SimEngine) -> list[tuple[str, float, list[int], str]]:
        loop = asyncio.get_running_loop()
        rng = random.Random(5)
        system = ids(300, 1)
        results: list[tuple[str, float, list[int], str]] = []

        async def one(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            chunks = await collect(engine, request(f"r{i}", system + ids(rng.randrange(5, 200),
                                                                        i), 80))
            results.append((f"r{i}", loop.time(), [t for c in chunks for t in c.token_ids],
                            "".join(c.text for c in chunks)))

        await asyncio.gather(*[one(i, rng.uniform(0, 3)) for i in range(40)])
        return sorted(results)

    return run(config, body)


def test_deterministic_for_a_seed() -> None:
    a = _mixed_workload(SimConfig(seed=3, stream_interval=0))
    b = _mixed_workload(SimConfig(seed=3, stream_interval=0))
    c = _mixed_workload(SimConfig(seed=4, stream_interval=0))
    assert a == b
    assert [r[3] for r in a] != [r[3] for r in c]


def test_event_jumps_match_step_by_step_simulation() -> None:
    """Closed-form macro steps (one chunk at the end) give the same finish times as
    advancing one step at a time (a chunk per token), arrivals mid-plan included."""
    jumps = _mixed_workload(SimConfig(stream_interval=0))
    stepwise = _mixed_workload(SimConfig(stream_interval=1))
    assert [r[2] for r in jumps] == [r[2] for r in stepwise]
    for (rid, t_jump, *_), (_, t_step, *_) in zip(jumps, stepwise, strict=True):
        assert t_jump == pytest.approx(t_step, rel=1e-9, abs=1e-9), rid


def test_prefill_only_request() -> None:
    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk]]:
        prompt = ids(200, 1)
        only = await collect(engine, request("p", prompt, 0))
        again = await collect(engine, request("q", prompt + ids(5, 2), 3))
        return only, again

    only, again = run(SimConfig(stream_interval=0), body)
    assert len(only) == 1 and only[0].token_ids == []
    assert only[0].finish_reason.type is FinishType.LENGTH and only[0].finish_reason.length == 0
    assert only[0].prompt_tokens == 200
    assert again[-1].cached_tokens == 200  # the prompt was cached


def test_max_new_tokens_and_stop_strings() -> None:
    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk]]:
        engine.responder.expect("long", 100)
        capped = await collect(engine, request("long", ids(10, 1), 30))
        engine.responder.expect("stopped", 100)
        stopped = await collect(engine, GenerateRequest(
            rid="stopped", input_ids=ids(10, 1),
            sampling=SamplingParams(max_new_tokens=100, stop=["."])))
        return capped, stopped

    capped, stopped = run(SimConfig(stream_interval=0), body)
    assert capped[-1].finish_reason.type is FinishType.LENGTH
    assert capped[-1].completion_tokens == 30
    finish = stopped[-1].finish_reason
    assert finish.type is FinishType.STOP and finish.matched == "."
    text = "".join(c.text for c in stopped)
    assert "." not in text and 0 < stopped[-1].completion_tokens < 100


def test_real_time_mode_streams_token_chunks_spaced_in_time() -> None:
    scale = 0.5
    config = SimConfig(time_scale=scale, stream_interval=1)

    async def main() -> list[tuple[float, Chunk]]:
        async with SimEngine(config) as engine:
            engine.responder.expect("rt", 20)
            return [(time.perf_counter(), c)
                    async for c in engine.generate(request("rt", ids(50, 1)))]

    start = time.perf_counter()
    timed = asyncio.run(main())
    tokens = [t for _, c in timed for t in c.token_ids]
    assert len(tokens) == 20
    assert all(len(c.token_ids) == 1 for _, c in timed)  # one token per chunk
    step = StepCostModel.llama3_8b_h100().step_time(0, 0, 1, 70) * scale
    elapsed = timed[-1][0] - start
    assert elapsed >= 19 * step * 0.9  # real time passes: ~3.6 ms per chunk here
    gaps = [b - a for (a, _), (b, _) in zip(timed, timed[1:], strict=False)]
    assert sorted(gaps)[len(gaps) // 2] >= step * 0.5


def test_bad_input_raises_typed_errors() -> None:
    with pytest.raises(ValidationError):
        SamplingParams(max_new_tokens=-1)
    with pytest.raises(ValidationError):
        GenerateRequest(rid="x", text="")

    async def body(engine: SimEngine) -> None:
        bad_sampling = SamplingParams.model_construct(**{**SamplingParams().__dict__,
                                                         "max_new_tokens": -5})
        cases: list[tuple[GenerateRequest, type[Exception]]] = [
            (GenerateRequest.model_construct(rid="neg", text="hi", input_ids=None,
                                             sampling=bad_sampling), InvalidRequestError),
            (GenerateRequest.model_construct(rid="empty", text="", input_ids=None,
                                             sampling=SamplingParams()), InvalidRequestError),
            (GenerateRequest.model_construct(rid="empty-ids", text=None, input_ids=[],
                                             sampling=SamplingParams()), InvalidRequestError),
            (request("negative-id", [1, -2, 3]), InvalidRequestError),
            (request("too-long", [1] * 40_000), InvalidRequestError),
            (GenerateRequest(rid="schema", text="hi",
                             sampling=SamplingParams(json_schema="{}")), UnsupportedError),
            (GenerateRequest(rid="regex", text="hi",
                             sampling=SamplingParams(regex=r"\d+")), UnsupportedError),
        ]
        for req, error in cases:
            with pytest.raises(error):
                engine.generate(req)
        with pytest.raises(InvalidRequestError):
            engine.generate({"rid": "dict"})  # type: ignore[arg-type]
        # a duplicate of a running rid
        engine.responder.expect("dup", 50)
        stream = engine.generate(request("dup", [1, 2, 3]))
        await stream.__anext__()
        with pytest.raises(InvalidRequestError):
            engine.generate(request("dup", [1, 2, 3]))
        await stream.aclose()  # type: ignore[attr-defined]
        with pytest.raises(UnknownRequestError):
            await engine.abort("nope")
        # the engine still serves after all that
        chunks = await collect(engine, request("ok", [1, 2, 3], 4))
        assert chunks[-1].completion_tokens >= 1

    run(SimConfig(stream_interval=1), body)


def test_text_prompts_capabilities_and_info() -> None:
    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk]]:
        a = await collect(engine, GenerateRequest(rid="a", text="Hello there, how are you?",
                                                  sampling=SamplingParams(max_new_tokens=8)))
        b = await collect(engine, GenerateRequest(rid="b", text="Hello there, how are you? Fine",
                                                  sampling=SamplingParams(max_new_tokens=8)))
        return a, b

    a, b = run(SimConfig(stream_interval=0), body)
    assert a[-1].prompt_tokens == 7
    assert b[-1].cached_tokens == 7  # prefix-stable tokenization
    engine = SimEngine()
    caps = engine.capabilities()
    assert caps.priority and caps.logprobs and caps.token_ids and caps.retention
    assert engine.model_info().max_context_len == SimConfig().max_context_len


def _check_invariants(engine: SimEngine) -> None:
    b = engine.batcher
    assert 0 <= b.kv_used() <= b.capacity
    private = sum(len(r.prompt) + b.generated(r) - r.tree_len for r in b.decoding)
    assert private == b._private_key + b.n_dec * b.step
    assert b._prefill_private == sum(r.fill_len - r.extend_start + 1 for r in b.prefilling)
    assert b.n_dec == len(b.decoding)
    for r in b.decoding:
        assert 0 < b.generated(r) <= r.target


@pytest.mark.parametrize("seed", range(12))
def test_random_pressure_workloads_keep_the_books_straight(seed: int) -> None:
    """Small KV, priorities, shared prefixes, aborts and cancellations at random times:
    KV never exceeds capacity, the lazy sums match the requests, every request ends with
    its whole reply (or an abort), and nothing stays locked."""
    rng = random.Random(seed)
    config = SimConfig(kv_capacity_tokens=rng.choice([1_500, 3_000, 6_000]),
                       max_running=rng.choice([4, 16, 64]),
                       chunked_prefill_tokens=rng.choice([64, 256, 8192]),
                       priority_preemption=rng.random() < 0.7,
                       eviction=rng.choice(["lru", "priority"]),
                       stream_interval=rng.choice([0, 0, 3]), seed=seed)
    system = ids(300, seed)

    async def body(engine: SimEngine) -> None:
        plan = engine.batcher.plan

        def checked_plan() -> Any:
            _check_invariants(engine)
            return plan()

        commit = engine.batcher.commit

        def checked_commit(step_plan: Any) -> None:
            commit(step_plan)
            assert engine.batcher.kv_used() <= engine.batcher.capacity  # the steps had KV

        engine.batcher.plan = checked_plan  # type: ignore[method-assign]
        engine.batcher.commit = checked_commit  # type: ignore[method-assign]
        outcomes: dict[str, tuple[int, FinishType]] = {}
        expected: dict[str, int] = {}

        async def one(i: int) -> None:
            await asyncio.sleep(rng.uniform(0, 4))
            rid = f"r{i}"
            expected[rid] = rng.randrange(1, 300)
            engine.responder.expect(rid, expected[rid])
            prompt = (system if rng.random() < 0.7 else []) + ids(rng.randrange(1, 400), i)
            req = request(rid, prompt, 400, priority=rng.choice([0.0, 1.0, 2.0]),
                          program_id=f"p{i % 7}")
            chunks = await collect(engine, req)
            tokens = [t for c in chunks for t in c.token_ids]
            assert len(tokens) == chunks[-1].completion_tokens
            outcomes[rid] = (len(tokens), chunks[-1].finish_reason.type)

        async def aborter() -> None:
            for _ in range(6):
                await asyncio.sleep(rng.uniform(0, 4))
                live = sorted(engine._requests)
                if live:
                    await engine.abort(rng.choice(live))
                await engine.retain(f"p{rng.randrange(7)}", rng.random() < 0.6)

        tasks = [asyncio.ensure_future(one(i)) for i in range(60)]
        await asyncio.sleep(rng.uniform(0, 3))
        tasks[0].cancel()  # a consumer that goes away
        await asyncio.gather(aborter(), *tasks, return_exceptions=True)
        for rid, (n, finish) in outcomes.items():
            if finish is FinishType.ABORT:
                assert n <= expected[rid]
            else:
                assert (n, finish) == (expected[rid], FinishType.STOP), rid
        assert sum(f is not FinishType.ABORT for _, f in outcomes.values()) >= 50
        stats = await engine.stats()
        assert stats.running == stats.queue_len == 0
        assert engine.cache.protected_size() == 0
        assert stats.kv_used_tokens == engine.cache.total_size() <= config.kv_capacity_tokens

    run(config, body)


def test_busy_seconds_count_steps_not_idle_time() -> None:
    """A request alone keeps the engine busy from its arrival to its last token; the idle
    gap before the next one adds nothing, and mid-request the steps so far are counted."""

    async def body(engine: SimEngine) -> tuple[float, float, float, float, float]:
        loop = asyncio.get_running_loop()
        engine.responder.expect("a", 40)
        start = loop.time()
        await collect(engine, request("a", ids(200, 1), 64))
        alone = loop.time() - start
        after_first = (await engine.stats()).busy_s
        await asyncio.sleep(5.0)
        after_idle = engine.busy_seconds()
        engine.responder.expect("b", 400)
        second = asyncio.ensure_future(collect(engine, request("b", ids(100, 2), 512)))
        await asyncio.sleep(0.2)
        midway = engine.busy_seconds() - after_idle
        await second
        return alone, after_first, after_idle, midway, engine.busy_seconds()

    alone, after_first, after_idle, midway, total = run(SimConfig(stream_interval=0), body)
    assert alone > 0 and after_first == pytest.approx(alone)
    assert after_idle == after_first
    assert midway == pytest.approx(0.2)  # one multi-step plan, counted as it runs
    assert total > after_idle + 0.2
