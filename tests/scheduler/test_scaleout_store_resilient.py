"""`ResilientStateStore` over a real redis-server: shared history while Redis is up, local
history while it is down, and a re-sync (journal replay, lost-history restore) when it
returns. Two wrappers over one Redis stand for two progserve replicas."""

from __future__ import annotations

import asyncio
import time

from scheduler.store import CallRecord
from scheduler.store_redis import RedisStateStore
from scheduler.store_resilient import ResilientStateStore


def record(service: float, replica: int = 0) -> CallRecord:
    return CallRecord(service=service, engine_time_s=service, weighted_tokens=service,
                      wait_s=0.0, replica=replica)  # fmt: skip


def replica_store(url: str) -> ResilientStateStore:
    return ResilientStateStore(RedisStateStore(url), timeout_s=0.3, probe_interval_s=0.05)


async def wait_healthy(*stores: ResilientStateStore, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(s.healthy for s in stores):
        assert time.monotonic() < deadline, "the stores did not re-sync"
        await asyncio.sleep(0.05)


async def test_two_replicas_share_one_history(redis_server) -> None:  # type: ignore[no-untyped-def]
    a, b = replica_store(redis_server.url), replica_store(redis_server.url)
    try:
        await a.record_call("t", "p", record(1.0, replica=0))
        totals = await b.record_call("t", "p", record(2.0, replica=1))
        assert totals.service == 3.0 and totals.calls_finished == 2
        assert totals.engines_used == {0, 1}
        seen_by_a = await a.load("t", "p")
        assert seen_by_a is not None and seen_by_a.service == 3.0
    finally:
        await a.close()
        await b.close()


async def test_outage_serves_locally_then_replays(make_redis_server) -> None:  # type: ignore[no-untyped-def]
    redis = make_redis_server(appendonly=True)  # a Redis that keeps its data across restarts
    a, b = replica_store(redis.url), replica_store(redis.url)
    try:
        await a.record_call("t", "p", record(1.0, replica=0))
        await b.record_call("t", "p", record(1.0, replica=1))
        redis.kill()
        started = time.monotonic()
        during_a = await a.record_call("t", "p", record(5.0, replica=0))
        during_b = await b.record_call("t", "p", record(7.0, replica=1))
        new_program = await a.record_call("t", "new", record(4.0))
        assert time.monotonic() - started < 2.0  # never stuck on the dead Redis
        assert not a.healthy and not b.healthy
        # each replica ranks by the last shared totals it saw plus its own calls since
        assert during_a.service == 1.0 + 5.0 and during_b.service == 2.0 + 7.0
        assert new_program.service == 4.0
        assert (await a.load("t", "new")).service == 4.0  # type: ignore[union-attr]
        await a.end_program("t", "new", "finished")
        await asyncio.sleep(0.3)  # Redis stays down for a while
        redis.start()
        await wait_healthy(a, b)
        shared = await RedisStateStore(redis.url).load("t", "p")
        assert shared is not None
        assert shared.service == 1.0 + 1.0 + 5.0 + 7.0 and shared.calls_finished == 4
        assert (await b.load("t", "new")).service == 4.0  # type: ignore[union-attr]
        after = await b.record_call("t", "p", record(1.0, replica=1))
        assert after.service == 15.0 and after.calls_finished == 5
        assert a.outages == 1 and a.written_back == 2 and b.written_back == 1
    finally:
        await a.close()
        await b.close()


async def test_a_redis_that_restarts_empty_gets_the_history_back(redis_server) -> None:  # type: ignore[no-untyped-def]
    store = replica_store(redis_server.url)
    try:
        await store.record_call("t", "p", record(3.0, replica=0))
        await store.record_call("t", "p", record(2.0, replica=1))
        await store.record_call("t", "idle", record(1.5))
        redis_server.kill()
        await store.record_call("t", "p", record(4.0, replica=0))
        redis_server.start()  # no persistence: Redis comes back empty
        await wait_healthy(store)
        fresh = RedisStateStore(redis_server.url)
        p = await fresh.load("t", "p")
        idle = await fresh.load("t", "idle")
        assert p is not None and p.service == 9.0 and p.calls_finished == 3
        assert p.engines_used == {0, 1}
        assert idle is not None and idle.service == 1.5 and idle.calls_finished == 1
        assert store.resyncs == 1 and store.written_back == 2
        await fresh.close()
    finally:
        await store.close()
