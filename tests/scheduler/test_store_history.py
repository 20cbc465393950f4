"""The program-history store: in memory and in a real redis-server (fixture)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest
from sched_fake_engine import FakeEngine

from engine_backend.types import GenerateRequest, SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler
from scheduler.store import CallRecord, HistoryTotals, InMemoryStateStore, pack_totals
from scheduler.store_redis import RedisStateStore


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    if request.param == "memory":
        return lambda: InMemoryStateStore()
    server = request.getfixturevalue("redis_server")
    return lambda: RedisStateStore(server.url, prefix="test:prog")


async def test_record_call_accumulates_and_load_returns_totals(make_store):
    store = make_store()
    assert await store.load("t", "p") is None
    await store.record_call("t", "p", CallRecord(1.5, 2.0, 1.5, 0.25, replica=0))
    totals = await store.record_call("t", "p", CallRecord(0.5, 1.0, 0.5, 0.75, replica=2))
    assert totals.service == pytest.approx(2.0)
    assert totals.engine_time_s == pytest.approx(3.0)
    assert totals.wait_s == pytest.approx(1.0)
    assert totals.calls_finished == 2
    assert totals.engines_used == {0, 2}
    loaded = await store.load("t", "p")
    assert loaded is not None and loaded.service == pytest.approx(2.0)
    # tenants are separate namespaces
    assert await store.load("other", "p") is None
    await store.end_program("t", "p", "finished")
    await store.close()


async def test_ended_history_resumes_and_stays_out_of_the_cycle_collector(make_store):
    """An ended program reopened later goes on from its history; in memory, what is kept
    of ended programs is not tracked by the cycle collector (no weight on full passes),
    and only the newest `max_ended` of them are kept."""
    store = make_store()
    await store.record_call("t", "p", CallRecord(1.0, 2.0, 1.0, 0.5, replica=1))
    await store.end_program("t", "p", "finished")
    loaded = await store.load("t", "p")
    assert loaded is not None and loaded.calls_finished == 1 and loaded.engines_used == {1}
    totals = await store.record_call("t", "p", CallRecord(0.5, 1.0, 0.5, 0.0, replica=0))
    assert totals.service == pytest.approx(1.5)
    assert totals.calls_finished == 2 and totals.engines_used == {0, 1}
    await store.end_program("t", "p", "finished")
    if isinstance(store, InMemoryStateStore):
        store.max_ended = 2
        for i in range(3):
            await store.record_call("t", f"q{i}", CallRecord(1.0, 1.0, 1.0, 0.0, replica=0))
            await store.end_program("t", f"q{i}", "finished")
        assert await store.load("t", "p") is None  # the oldest ended ones are forgotten
        assert await store.load("t", "q0") is None
        assert (await store.load("t", "q2")).service == pytest.approx(1.0)
        # 1,000 more ended programs add nothing for the collector to walk (their packed
        # totals are bytes), and each costs under 100 bytes (up to 100,000 are kept)
        store.max_ended = 2_000
        gc.collect()
        before = len(gc.get_objects())
        for i in range(1_000):
            await store.record_call("t", f"r{i}", CallRecord(1.0, 1.0, 1.0, 0.0, replica=0))
            await store.end_program("t", f"r{i}", "cancelled")
            # a call that finishes after its program was cancelled is still counted
            late = await store.record_call("t", f"r{i}", CallRecord(1.0, 1.0, 1.0, 0.0, 1))
            assert late.calls_finished == 2 and late.engines_used == {0, 1}
        gc.collect()
        gc.collect()
        assert len(gc.get_objects()) - before < 50
        tracemalloc.start()
        before_bytes = tracemalloc.get_traced_memory()[0]
        packed = [pack_totals(HistoryTotals(1.5 + i, 2.5, 3.5, 0.25, i, {0, 1}))
                  for i in range(1_000)]
        per_program = (tracemalloc.get_traced_memory()[0] - before_bytes) / len(packed)
        tracemalloc.stop()
        assert per_program < 100, per_program
    await store.close()


async def test_redis_history_expires_after_the_program_ends(redis_server):
    store = RedisStateStore(redis_server.url, prefix="ttl", ended_ttl_s=1)
    await store.record_call("t", "p", CallRecord(1.0, 1.0, 1.0, 0.0, replica=0))
    await store.end_program("t", "p", "finished")
    import redis.asyncio as redis

    client = redis.from_url(redis_server.url, decode_responses=True)
    assert await client.hget(store.key("t", "p"), "status") == "finished"
    assert 0 < await client.ttl(store.key("t", "p")) <= 1
    await client.aclose()
    await store.close()


async def test_two_schedulers_share_program_history_through_redis(redis_server):
    """Two progserve processes in front of the same engines: the second sees the service
    the first gave a program, so PLAS ranks that program's next call by all of it."""
    url = redis_server.url
    config = SchedulerConfig(policy="plas")
    first = Scheduler([FakeEngine(token_s=0.001)], config, store=RedisStateStore(url))
    second = Scheduler([FakeEngine(token_s=0.001)], config, store=RedisStateStore(url))
    await first.start()
    await second.start()
    try:
        pid = await first.open_program("shared", tenant="acme")
        request = GenerateRequest(rid="r1", text="hi", sampling=SamplingParams(max_new_tokens=50))
        async for _ in first.llm_call(pid, request, tenant="acme"):
            pass
        served = first.program_state(pid, tenant="acme").history.service
        assert served > 0.5
        await second.open_program("shared", tenant="acme")
        history = second.program_state("shared", tenant="acme").history
        assert history.service == pytest.approx(served)
        assert history.calls_finished == 1
        # its next call on the second process ranks at that service (PLAS)
        request2 = GenerateRequest(rid="r2", text="hi", sampling=SamplingParams(max_new_tokens=1))
        async for _ in second.llm_call("shared", request2, tenant="acme"):
            pass
        call = second.program_state("shared", tenant="acme").calls[0]
        assert call.priority == pytest.approx(served)
        after = second.program_state("shared", tenant="acme").history
        assert after.calls_finished == 2 and after.service > served
    finally:
        await first.close()
        await second.close()
    await asyncio.sleep(0)
