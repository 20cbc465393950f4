"""The engine-priority contract end to end: the order a policy dispatches calls in reaches
the wire as engine priorities in the same order, for SGLang (both conventions) and vLLM,
with many queue levels, urgent and plain calls, and many programs in play; and the unit
itself (packing, the adapters' mappings) on its own.

Regression: priorities were `level * 1e9 + order` floats and the SGLang adapter sent
`-round(p * 1000)` clamped to int32, so every call of a level above 0 reached SGLang as
-2147483647 and the program order was lost."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from engine_backend.engine_rank import RANK_MAX, clamp_rank
from engine_backend.openai_http import OpenAIHTTPEngine
from engine_backend.openai_protocol import vllm_priority
from engine_backend.sglang_http import SGLangHTTPEngine
from engine_backend.types import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.events import EventKind, SchedulerEvent
from scheduler.policies.engine_rank import LeveledRanks
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec
from scheduler.store import CallRecord, InMemoryStateStore

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT32 = 2**31 - 1


@pytest.fixture(scope="module")
def upstream(recorded_upstream):
    """One loopback server speaking both protocols with recorded answers; it keeps every
    request body it got."""
    recorded, server = recorded_upstream()
    for name in ("get_model_info", "get_server_info"):
        recorded.answer("GET", f"/{name}", FIXTURES / "sglang" / f"{name}.json")
    recorded.answer("POST", "/generate", FIXTURES / "sglang" / "generate_stream.sse",
                    content_type="text/event-stream")
    recorded.answer("POST", "/abort_request", b"")
    recorded.answer("GET", "/v1/models", b'{"data": [{"id": "m"}]}')
    recorded.answer("POST", "/v1/completions", FIXTURES / "openai" / "completions_stream.sse",
                    content_type="text/event-stream")
    return recorded, server


# adapter -> (engine factory, request path, prompt field, sign that makes "served first"
# the smaller number)
ADAPTERS = {
    "sglang": (lambda url: SGLangHTTPEngine(url), "/generate", "text", -1),
    "sglang-low-first": (lambda url: SGLangHTTPEngine(url, low_priority_values_first=True),
                         "/generate", "text", 1),
    "vllm": (lambda url: OpenAIHTTPEngine(url + "/v1", logprobs=False, send_priority=True),
             "/v1/completions", "prompt", 1),
}
# Attained service per program (s): with first bound 0.5 and growth 2 this spans all 8
# queues of PLAS.
SERVICES = (0.0, 0.3, 0.7, 1.5, 3.0, 6.0, 12.0, 25.0, 50.0, 200.0)


def program_spec(i: int) -> ProgramSpec:
    """Three independent calls; every third program's second call is latency-critical."""
    return ProgramSpec(program_id=f"p{i}", calls=[
        CallSpec(id=f"c{j}", prompt=f"program {i} call {j}", output=f"v{j}",
                 sampling=SamplingParams(max_new_tokens=4),
                 latency_critical=(j == 1 and i % 3 == 0))
        for j in range(3)])


@pytest.mark.parametrize("policy", ["plas", "atlas", "mlfq"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
async def test_policy_order_reaches_the_wire(upstream, adapter, policy):
    recorded, server = upstream
    make_engine, path, prompt_field, served_first = ADAPTERS[adapter]
    store = InMemoryStateStore()
    # The blocker alone fills the token budget (an idle replica takes any call), so the
    # rest queue until it finishes and one dispatch pass then takes them all, in the
    # policy's order, with no rank changing in between.
    config = SchedulerConfig(policy=policy, max_inflight_requests=1000,
                             max_inflight_tokens=20_000, retain_kv=False)
    scheduler = Scheduler([make_engine(server.url)], config, store=store)
    dispatched: list[SchedulerEvent] = []
    scheduler.add_listener(dispatched.append, kinds=(EventKind.CALL_DISPATCHED,))
    await scheduler.start()
    try:
        programs = 40
        for i in range(programs):
            service = SERVICES[(i * 7) % len(SERVICES)]  # arrival order != service order
            if service:
                await store.record_call("default", f"p{i}",
                                        CallRecord(service, service, service, 0.0, 0))
        sent_before = len(recorded.sent)
        await scheduler.submit_program(ProgramSpec(program_id="blocker", calls=[CallSpec(
            id="big", prompt="x" * 200_000, output="v",
            sampling=SamplingParams(max_new_tokens=4))]))
        for i in range(programs):
            await scheduler.submit_program(program_spec(i))
        await scheduler.wait_variable("blocker", "v", timeout=30)
        for i in range(programs):
            for j in range(3):
                await scheduler.wait_variable(f"p{i}", f"v{j}", timeout=30)
    finally:
        await scheduler.close()

    wire = {body[prompt_field]: body["priority"] for _, p, body in recorded.sent[sent_before:]
            if p == path and body[prompt_field].startswith("program ")}
    assert len(wire) == programs * 3
    assert all(-INT32 < value < INT32 and type(value) is int for value in wire.values())
    assert dispatched[0].program_id == "blocker"
    batch = dispatched[1:]
    urgent = {(f"p{i}", "c1") for i in range(programs) if i % 3 == 0}
    served = [served_first * wire[f"program {e.program_id[1:]} call {e.call_id[1:]}"]
              for e in batch]
    # Served-first order on the wire == the policy's dispatch order ...
    assert served == sorted(served)
    # ... and nothing the policy tells apart collapses into one engine value: calls share a
    # value only within one program, queue and urgency (mlfq: never, it orders by call).
    groups = {(e.program_id, e.queue_level, (e.program_id, e.call_id) in urgent)
              for e in batch}
    assert len(set(served)) == (len(batch) if policy == "mlfq" else len(groups))
    urgent_levels = {e.queue_level for e in batch if (e.program_id, e.call_id) in urgent}
    if policy == "plas":  # every queue in play, and urgent calls (first in their queue)
        assert len({e.queue_level for e in batch}) == 8 and len(urgent_levels) > 3
    if policy == "atlas":  # fresh calls: one queue, urgent calls first, then by program
        assert urgent_levels == {0}


def old_engine_priority(level: int, urgent: bool, order: int) -> float:
    """The value engines got before the unit existed (order-identity reference)."""
    return level * 1e9 + (0.0 if urgent else 1e9 / 2) + order


def test_leveled_ranks_keep_the_policy_order_exactly():
    """Packing is order-identical to the old float priorities (so the sim and torch
    engines order calls as before), within the unit, for every queue count."""
    rng = random.Random(3)
    for levels in (1, 2, 8, 33, 64):
        ranks = LeveledRanks(levels)
        keys = [(rng.randrange(levels), rng.random() < 0.3, rng.randrange(2_000_000))
                for _ in range(3000)]
        keys += [(levels - 1, False, 2_000_000)]  # the largest rank
        values = {key: ranks.rank(*key) for key in keys}
        assert all(0 <= v <= RANK_MAX for v in values.values())
        by_rank = sorted(keys, key=lambda k: (values[k], k))
        by_old = sorted(keys, key=lambda k: (old_engine_priority(*k), k))
        assert by_rank == by_old
        assert len(set(values.values())) == len(set(keys))  # distinct keys, distinct ranks


def test_the_order_origin_moves_with_the_arrivals():
    """Beyond the order field's span the origin moves up: the newest half of the range
    stays exact; ranks stay in the unit."""
    ranks = LeveledRanks(8)
    span = 1 << (30 - 1 - 3)
    assert ranks.rank(0, False, span - 1) < ranks.rank(1, True, 0)
    newest = [ranks.rank(2, False, span + i) for i in range(3)]
    assert newest == sorted(newest) and len(set(newest)) == 3
    assert max(newest) <= RANK_MAX
    assert ranks.rank(2, False, span // 2 + 10) < newest[0]  # within the kept half: exact


def test_adapters_map_ranks_order_preservingly():
    ranks = sorted(random.Random(5).sample(range(RANK_MAX + 1), 2000)) + [0, RANK_MAX]
    ranks = sorted(set(ranks))
    sglang = SGLangHTTPEngine("http://127.0.0.1:9")
    low_first = SGLangHTTPEngine("http://127.0.0.1:9", low_priority_values_first=True)
    for earlier, later in itertools.pairwise(ranks):
        assert sglang.sglang_priority(earlier) > sglang.sglang_priority(later)
        assert low_first.sglang_priority(earlier) < low_first.sglang_priority(later)
        assert vllm_priority(earlier) < vllm_priority(later)
    assert all(abs(sglang.sglang_priority(r)) < INT32 for r in (0, RANK_MAX))
    # a client's own hint (priority passing off) is bounded into the unit, not wrapped
    assert clamp_rank(-5.5) == 0 and clamp_rank(1e30) == RANK_MAX and clamp_rank(7.4) == 7
