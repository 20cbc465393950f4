"""Program history behind a small interface: in memory (the default) or in Redis.

The store is the source of truth for the history the policies rank by. With Redis,
several progserve replicas in front of the same engines share it, so a program whose calls
land on different progserve processes is still ranked by all the service it received.
Each finished call is one atomic increment (`record_call`), which returns the new totals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class HistoryTotals:
    service: float = 0.0
    engine_time_s: float = 0.0
    weighted_tokens: float = 0.0
    wait_s: float = 0.0
    calls_finished: int = 0
    engines_used: set[int] = field(default_factory=set)


@dataclass(slots=True)
class CallRecord:
    service: float
    engine_time_s: float
    weighted_tokens: float
    wait_s: float
    replica: int  # -1 for tool calls


@runtime_checkable
class StateStore(Protocol):
    # True when no method ever suspends (nothing outside the process): callers may then
    # rely on a store update completing before the event loop runs anything else.
    in_process: bool

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        """The program's history, or None if the store has never seen it."""
        ...

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        """Add one finished call to the program's history; returns the new totals."""
        ...

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        """The program ended; the store may expire its history."""
        ...

    async def close(self) -> None: ...


# An ended program's history, packed: (service, engine_time_s, weighted_tokens, wait_s,
# calls_finished, engines used). A tuple of numbers holds no references, so the cycle
# collector stops tracking it after its first pass: tens of thousands of ended programs
# then add nothing to the full collections' pauses, as live `HistoryTotals` (each with
# its set) would.
PackedTotals = tuple[float, float, float, float, int, tuple[int, ...]]


def pack_totals(totals: HistoryTotals) -> PackedTotals:
    return (totals.service, totals.engine_time_s, totals.weighted_tokens, totals.wait_s,
            totals.calls_finished, tuple(sorted(totals.engines_used)))


def unpack_totals(packed: PackedTotals) -> HistoryTotals:
    service, engine_time_s, weighted_tokens, wait_s, calls_finished, engines = packed
    return HistoryTotals(service, engine_time_s, weighted_tokens, wait_s, calls_finished,
                         set(engines))


class InMemoryStateStore:
    """The default: one process, a dict. No method ever suspends.

    A running program's totals are a live object; an ended program's are packed (see
    `PackedTotals`) and kept for the `max_ended` most recent ones, so a program reopened
    after its end goes on from its history. A call recorded after its program ended (it
    was cancelled mid-call, or reopened) updates the packed totals: nothing outlives the
    ended programs' bound."""

    in_process = True

    def __init__(self, max_ended: int = 100_000) -> None:
        self._totals: dict[tuple[str, str], HistoryTotals] = {}
        self._ended: dict[tuple[str, str], PackedTotals | None] = {}
        self.max_ended = max_ended

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        key = (tenant, program_id)
        totals = self._totals.get(key)
        if totals is None:
            packed = self._ended.get(key)
            return unpack_totals(packed) if packed is not None else None
        return totals

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        key = (tenant, program_id)
        totals = self._totals.get(key)
        if totals is not None:
            add_record(totals, record)
            return totals
        if key in self._ended:
            packed = self._ended[key]
            totals = unpack_totals(packed) if packed is not None else HistoryTotals()
            add_record(totals, record)
            self._ended[key] = pack_totals(totals)
            return totals
        totals = self._totals[key] = HistoryTotals()
        add_record(totals, record)
        return totals

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        key = (tenant, program_id)
        totals = self._totals.pop(key, None)
        packed = self._ended.pop(key, None)  # re-inserted: the newest end is evicted last
        self._ended[key] = pack_totals(totals) if totals is not None else packed
        if len(self._ended) > self.max_ended:  # forget the oldest ended programs
            del self._ended[next(iter(self._ended))]

    async def close(self) -> None:
        self._totals.clear()
        self._ended.clear()


def add_record(totals: HistoryTotals, record: CallRecord) -> None:
    """One finished call into a program's totals."""
    totals.service += record.service
    totals.engine_time_s += record.engine_time_s
    totals.weighted_tokens += record.weighted_tokens
    totals.wait_s += record.wait_s
    totals.calls_finished += 1
    if record.replica >= 0:
        totals.engines_used.add(record.replica)


class RedisStateStore:
    """Program history in Redis hashes, shared by several progserve processes.

    Keys: `{prefix}:{tenant}:{program_id}` (a hash of float counters) and `...:engines` (a
    set of replica indices). Every write refreshes a TTL (`ttl_s`), so abandoned programs
    expire; an ended program keeps its history for `ended_ttl_s`.
    """

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "progserve:prog",
        ttl_s: int = 24 * 3600,
        ended_ttl_s: int = 3600,
    ) -> None:
        import redis.asyncio as redis  # imported here: the in-memory store needs no redis

        self._redis = redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.ended_ttl_s = ended_ttl_s

    def _key(self, tenant: str, program_id: str) -> str:
        return f"{self.prefix}:{tenant}:{program_id}"

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        key = self._key(tenant, program_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.smembers(f"{key}:engines")
            fields, engines = await pipe.execute()
        if not fields:
            return None
        return _totals(fields, engines)

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        key = self._key(tenant, program_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrbyfloat(key, "service", record.service)
            pipe.hincrbyfloat(key, "engine_time_s", record.engine_time_s)
            pipe.hincrbyfloat(key, "weighted_tokens", record.weighted_tokens)
            pipe.hincrbyfloat(key, "wait_s", record.wait_s)
            pipe.hincrby(key, "calls_finished", 1)
            pipe.hsetnx(key, "created", time.time())
            if record.replica >= 0:
                pipe.sadd(f"{key}:engines", record.replica)
            pipe.expire(key, self.ttl_s)
            pipe.expire(f"{key}:engines", self.ttl_s)
            pipe.hgetall(key)
            pipe.smembers(f"{key}:engines")
            results = await pipe.execute()
        return _totals(results[-2], results[-1])

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        key = self._key(tenant, program_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "status", status)
            pipe.expire(key, self.ended_ttl_s)
            pipe.expire(f"{key}:engines", self.ended_ttl_s)
            await pipe.execute()

    async def restore(self, tenant: str, program_id: str, totals: HistoryTotals) -> bool:
        """Write a program's whole history *only if Redis has none* (it restarted empty);
        atomic, so of several replicas giving back what they knew, the first wins. Used
        by `store_resilient.ResilientStateStore` on re-sync. True if written."""
        key = self._key(tenant, program_id)
        args = [
            totals.service, totals.engine_time_s, totals.weighted_tokens, totals.wait_s,
            totals.calls_finished, time.time(), self.ttl_s, *sorted(totals.engines_used),
        ]  # fmt: skip
        return bool(await self._redis.eval(_RESTORE_LUA, 2, key, f"{key}:engines", *args))

    async def close(self) -> None:
        await self._redis.aclose()


_RESTORE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'service', ARGV[1], 'engine_time_s', ARGV[2],
           'weighted_tokens', ARGV[3], 'wait_s', ARGV[4], 'calls_finished', ARGV[5],
           'created', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
for i = 8, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
if #ARGV >= 8 then redis.call('EXPIRE', KEYS[2], ARGV[7]) end
return 1
"""


def _totals(fields: dict[str, str], engines: set[str]) -> HistoryTotals:
    return HistoryTotals(
        service=float(fields.get("service", 0.0)),
        engine_time_s=float(fields.get("engine_time_s", 0.0)),
        weighted_tokens=float(fields.get("weighted_tokens", 0.0)),
        wait_s=float(fields.get("wait_s", 0.0)),
        calls_finished=int(fields.get("calls_finished", 0)),
        engines_used={int(e) for e in engines},
    )


def make_store(redis_url: str | None) -> StateStore:
    return RedisStateStore(redis_url) if redis_url else InMemoryStateStore()
