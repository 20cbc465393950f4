"""The trace store: bounded memory, conflict-free sharing between replicas through a real
redis-server, and no loss across a Redis outage."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from progserve.trace_store import ProgramRecord, TraceStore, merge_records, program_key


def span(program_id: str, n: int, tenant: str = "default") -> dict[str, Any]:
    return {
        "trace_id": "ab" * 16, "span_id": f"{program_id}-{n}", "parent_id": None,
        "name": f"llm c{n}", "kind": "llm", "program_id": program_id, "call_id": f"c{n}",
        "program_key": program_key(tenant, program_id), "tenant": tenant,
        "start_ns": 1_000 + n, "end_ns": 1_010 + n, "status": "ok", "error": None,
        "attributes": {"progserve.replica": 0}, "events": [],
    }  # fmt: skip


async def test_the_ring_evicts_whole_programs_oldest_first() -> None:
    store = TraceStore("i1", max_spans=100)
    for p in range(30):
        for n in range(5):
            store.add_span(span(f"p{p}", n))
    kept = [p for p in range(30) if await store.program_spans(f"p{p}")]
    assert kept == list(range(10, 30))  # 20 programs x 5 spans = the bound
    for p in kept:
        assert len(await store.program_spans(f"p{p}")) == 5


async def test_deferred_spans_are_built_once_when_read_and_never_when_evicted() -> None:
    store = TraceStore("i1", max_spans=10)
    built: list[str] = []

    def builder(program_id: str, n: int):  # type: ignore[no-untyped-def]
        def build() -> dict[str, Any]:
            built.append(f"{program_id}-{n}")
            return span(program_id, n)
        return build

    for p in range(4):
        for n in range(5):
            store.add_deferred_span(program_key("default", f"p{p}"), builder(f"p{p}", n))
    assert built == []  # nothing read yet: nothing built
    assert [s["span_id"] for s in await store.program_spans("p3")] == [
        f"p3-{n}" for n in range(5)]
    assert await store.program_spans("p3") == await store.program_spans("p3")
    assert built == [f"p3-{n}" for n in range(5)]  # built once, kept built
    assert await store.program_spans("p0") == []  # evicted with the ring, unbuilt
    assert not any(b.startswith(("p0", "p1")) for b in built)
    store.add_span(span("p3", 9))  # built and deferred spans live side by side
    assert len(await store.program_spans("p3")) == 6


def test_summaries_merge_the_parts_each_instance_saw() -> None:
    now = time.time_ns()
    a = ProgramRecord("p", "acme", "i1", "running", started_ns=now - 5_000_000, llm_calls=3,
                      completion_tokens=30, updated_ns=now - 2_000_000)  # fmt: skip
    b = ProgramRecord("p", "acme", "i2", "finished", started_ns=now - 4_000_000,
                      ended_ns=now - 1_000_000, llm_calls=2, tool_calls=1,
                      completion_tokens=20, updated_ns=now - 1_000_000)  # fmt: skip
    merged = merge_records([a, b], now)
    assert merged["status"] == "finished" and merged["calls"] == 6
    assert merged["completion_tokens"] == 50 and merged["instances"] == ["i1", "i2"]
    assert merged["latency_ms"] == 4.0  # first start to the end
    failed = ProgramRecord("p", "acme", "i3", "failed", ended_ns=now, updated_ns=now - 9)
    assert merge_records([a, b, failed], now)["status"] == "failed"
    idle = merge_records([a], now)
    assert idle["status"] == "idle" and idle["latency_ms"] == 3.0  # to its last activity


async def test_replicas_share_spans_and_summaries_and_survive_an_outage(redis_server) -> None:  # type: ignore[no-untyped-def]
    from redis.asyncio import Redis

    stores = [
        TraceStore(f"i{i}", redis=Redis.from_url(redis_server.url), flush_interval_s=0.02,
                   redis_timeout_s=0.3)
        for i in (1, 2)
    ]  # fmt: skip
    one, two = stores
    try:
        for i, store in enumerate(stores):
            store.add_span(span("p", i, "acme"))
            rec = store.record("acme", "p")
            rec.llm_calls += 1
            store.touch(rec)
        await asyncio.sleep(0.15)
        for store in stores:  # each sees both replicas' spans and one merged summary
            assert [s["span_id"] for s in await store.program_spans("acme/p")] == ["p-0", "p-1"]
            summary = await store.program_summary("acme/p")
            assert summary is not None and summary["llm_calls"] == 2
            assert summary["instances"] == ["i1", "i2"]
        assert [p["id"] for p in await one.program_summaries(tenant="acme")] == ["p"]
        assert await one.program_spans("p") == []  # the default tenant's "p" is another
        assert await one.program_summaries(tenant="globex") == []

        redis_server.kill()
        one.add_span(span("p", 2, "acme"))  # Redis down: recorded locally, queued for Redis
        await asyncio.sleep(0.15)
        assert not one.redis_ok
        assert [s["span_id"] for s in await one.program_spans("acme/p")][-1] == "p-2"
        redis_server.start()  # back, and empty (no persistence)
        deadline = time.monotonic() + 5
        while not one.redis_ok or one._pending_spans:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # the span made during the outage reached Redis: the other replica sees it (its
        # first read may still meet its connection that died with the old Redis)
        while "p-2" not in [s["span_id"] for s in await two.program_spans("acme/p")]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert one.dropped_spans == 0
    finally:
        for store in stores:
            await store.close()


async def test_a_flush_writes_per_program_and_retries_a_refused_index(redis_server) -> None:  # type: ignore[no-untyped-def]
    """Spans of a program go in one HSET; a tenant index Redis refuses (WRONGTYPE) is its
    programs' write refused: retried, then dropped, while other tenants are written."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_server.url)
    store = TraceStore("i1", redis=redis, flush_interval_s=3600, max_write_attempts=2)
    await redis.set(store._key("tenant_progs", "bad"), "not a sorted set")
    try:
        for tenant in ("good", "bad"):
            for n in range(3):
                store.add_span(span(f"{tenant}-p", n, tenant))
            store.touch(store.record(tenant, f"{tenant}-p"))
        await store.flush()
        good, bad = program_key("good", "good-p"), program_key("bad", "bad-p")
        assert len(await redis.hgetall(store._key("trace", good))) == 3
        assert len(await redis.hgetall(store._key("trace", bad))) == 3
        assert await redis.zscore(store._key("tenant_progs", "good"), good) is not None
        assert await redis.zscore(store._key("progs"), bad) is not None
        assert store.dropped_writes == 0 and bad in store._dirty  # to be retried
        await store.flush()
        assert store.dropped_writes == 1 and bad not in store._dirty  # given up
        await store.flush()
        assert store.dropped_writes == 1
    finally:
        await store.close()
        await redis.aclose()
