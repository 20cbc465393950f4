"""Finished spans and per-program summaries for the tracing UI.

A bounded in-memory store, always on. With Redis (`--redis-url`) every progserve replica
also mirrors what it observed into Redis, so any replica's UI shows a program whose calls
ran on several replicas. The mirror is conflict-free by construction:

- a program's spans are one hash, span id -> span (`HSET`): a write repeated after an
  outage or a re-sync never shows twice;
- a program's summary is a hash with one field per progserve instance (`HSET prog:{id}
  {instance} {json}`): each replica writes only its own part, and readers merge the parts.

Key names escape the tenant and program id (`scheduler.redis_keys`): no id names another
program's key or a key of another type.

Redis being down never blocks serving: writes are queued locally (bounded) and flushed in
the background; the first flush that succeeds after an outage writes everything queued.
A Redis that restarted empty is noticed by this instance's marker (checked in the same
transaction as each flush, and every `watch_interval_s` when idle): the instance then
writes back every span and summary it still holds, so a trace is never left with only
the spans that happened to be queued. A write Redis refuses (a key of the wrong type, out
of memory) is retried `max_write_attempts` times, then dropped and counted; it never
blocks the others. Reads fall back to local data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from scheduler.redis_keys import MARKER_TTL_S, marker_key, new_instance_id, redis_key
from scheduler.store import StoreHealth

log = logging.getLogger(__name__)

SpanDict = dict[str, Any]
# A span not built yet: called (once) when something reads it (`add_deferred_span`).
SpanBuilder = Callable[[], SpanDict]


def _nothing() -> None:
    pass


def program_key(tenant: str, program_id: str) -> str:
    """A program's key across tenants (the scheduler's convention: tenants may reuse ids).
    Tenant names never contain "/", program ids neither, so keys cannot collide."""
    return program_id if tenant == "default" else f"{tenant}/{program_id}"


ENDED_STATUSES = ("finished", "failed", "cancelled")
# Errors that mean "Redis is unreachable right now": keep serving from local state.
REDIS_DOWN_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(slots=True)
class ProgramRecord:
    """What one progserve instance observed of one program."""

    program_id: str
    tenant: str
    instance: str = ""  # the progserve instance that observed it
    status: str = "running"  # running | finished | failed | cancelled
    started_ns: int = 0
    ended_ns: int | None = None
    llm_calls: int = 0
    tool_calls: int = 0
    failed_calls: int = 0
    inflight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    updated_ns: int = 0

    @property
    def key(self) -> str:
        return program_key(self.tenant, self.program_id)


def merge_records(parts: list[ProgramRecord], now_ns: int) -> dict[str, Any]:
    """One program's summary from the parts its instances observed."""
    ended = [p for p in parts if p.status in ENDED_STATUSES]
    # A failure anywhere marks the program failed; else the last instance's word wins.
    if ended:
        failed = [p for p in ended if p.status != "finished"]
        status = (failed or sorted(ended, key=lambda p: p.updated_ns))[-1].status
    else:
        status = "running" if any(p.inflight > 0 for p in parts) else "idle"
    started = min((p.started_ns for p in parts if p.started_ns), default=now_ns)
    ended_ns = max((p.ended_ns or 0 for p in ended), default=0) or None
    inflight = sum(p.inflight for p in parts)
    # An open program's latency so far: up to now while a call runs, else to its last
    # activity (an idle program waiting on its client is not getting slower).
    last = ended_ns or (now_ns if inflight else max(p.updated_ns for p in parts))
    llm = sum(p.llm_calls for p in parts)
    tools = sum(p.tool_calls for p in parts)
    return {
        "id": parts[0].program_id,
        "tenant": parts[0].tenant,
        "key": parts[0].key,
        "status": status,
        "calls": llm + tools,
        "llm_calls": llm,
        "tool_calls": tools,
        "failed_calls": sum(p.failed_calls for p in parts),
        "inflight": inflight,
        "prompt_tokens": sum(p.prompt_tokens for p in parts),
        "completion_tokens": sum(p.completion_tokens for p in parts),
        "cached_tokens": sum(p.cached_tokens for p in parts),
        "started_ms": started / 1e6,
        "ended_ms": ended_ns / 1e6 if ended_ns else None,
        "latency_ms": (last - started) / 1e6,
        "updated_ms": max(p.updated_ns for p in parts) / 1e6,
        "instances": sorted({p.instance for p in parts}),
    }


def _span_json(span: SpanDict) -> bytes:
    # A copy of exactly its size: orjson hands back its whole output buffer (about 8 KB
    # of memory behind a 1 KB span), which made the span ring about 8x its bound.
    return bytes(memoryview(orjson.dumps(span)))


class TraceStore:
    """Spans and program summaries: local ring, optionally mirrored to Redis."""

    def __init__(
        self,
        instance_id: str,
        *,
        max_spans: int = 50_000,
        max_programs: int = 5_000,
        redis: Redis | None = None,
        key_prefix: str = "progserve:obs",
        ttl_s: int = 86_400,
        flush_interval_s: float = 0.2,
        redis_timeout_s: float = 1.0,
        watch_interval_s: float = 1.0,
        max_write_attempts: int = 3,
    ):
        self.instance_id = instance_id
        self._max_spans = max_spans
        self._max_programs = max_programs
        self._redis = redis
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        self._flush_interval_s = flush_interval_s
        self._redis_timeout_s = redis_timeout_s
        self._watch_interval_s = watch_interval_s
        self._max_write_attempts = max_write_attempts
        # Spans are kept as JSON (a third of a dict's memory; Redis gets the same bytes), or
        # as their builders until first read (`add_deferred_span`).
        self._spans: OrderedDict[str, list[bytes | SpanBuilder]] = OrderedDict()
        self._span_count = 0
        self._records: OrderedDict[str, ProgramRecord] = OrderedDict()
        # Not yet written to Redis: (program key, span id, span json) and programs whose
        # record changed; writes Redis refused, by (kind, program key), with their count.
        self._pending_spans: list[tuple[str, str, bytes]] = []
        self._dirty: set[str] = set()
        self._refusals: dict[tuple[str, str], int] = {}
        self._redis_down = False
        self._marker = marker_key(key_prefix, f"{instance_id}-{new_instance_id()}")
        self._marker_set = False  # written on the first flush
        self._marker_checked = 0.0  # loop time of the last idle check
        self.dropped_spans = 0  # pending spans dropped during a long Redis outage
        self.dropped_writes = 0  # writes Redis kept refusing, given up
        self.flushes_failed = 0
        self.outages = 0
        self.resyncs = 0  # times Redis had lost this instance's writes
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # Applies observability events not yet applied (`EventBatch.flush`): every read and
        # every Redis write calls it first, so nothing reads behind the scheduler.
        self.catch_up: Callable[[], None] = _nothing

    # -- lifecycle --------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def redis_ok(self) -> bool:
        return self._redis is not None and not self._redis_down

    def health(self) -> StoreHealth:
        if self._redis is None:
            return StoreHealth("memory")
        queued = len(self._pending_spans) + len(self._dirty) if self._redis_down else 0
        return StoreHealth("redis", reachable=not self._redis_down,
                           pending_writes=queued + len(self._refusals),
                           dropped_writes=self.dropped_writes + self.dropped_spans,
                           outages=self.outages, resyncs=self.resyncs)

    async def start(self) -> None:
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        """Start the background Redis writer (idempotent; a no-op without Redis or
        outside an event loop). Writes call it too, so the mirror runs even when nobody
        called `start`."""
        if self._redis is None or self._flusher is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flusher = loop.create_task(self._flush_loop(), name="trace-store-flush")

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.flush()
        if self._redis is not None:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self._redis.aclose()

    # -- writes (sync, on the event loop: called from span export and event listeners) --

    def add_span(self, span: SpanDict) -> None:
        key = span["program_key"]
        blob = _span_json(span)
        self._keep_span(key, blob)
        if self._redis is not None:
            self._ensure_flusher()
            self._pending_spans.append((key, span["span_id"], blob))
            if len(self._pending_spans) > self._max_spans:
                overflow = len(self._pending_spans) - self._max_spans
                del self._pending_spans[:overflow]
                self.dropped_spans += overflow

    def add_deferred_span(self, key: str, build: SpanBuilder) -> None:
        """A span of program `key` that `build()` returns when first read: most spans are
        never read, so assembling and encoding each one when its call ends was work done
        for nobody. Only for a store without Redis (a mirror needs the bytes now): with
        one, the span is built at once."""
        if self._redis is not None:
            self.add_span(build())
        else:
            self._keep_span(key, build)

    def _keep_span(self, key: str, item: bytes | SpanBuilder) -> None:
        spans = self._spans.get(key)
        if spans is None:
            spans = self._spans[key] = []
        spans.append(item)
        self._span_count += 1
        self._evict_spans(keep=key)

    def _blobs(self, key: str) -> list[bytes]:
        """Program `key`'s spans as JSON, deferred ones built now (and kept built)."""
        spans = self._spans.get(key)
        if not spans:
            return []
        for i, item in enumerate(spans):
            if not isinstance(item, bytes):
                spans[i] = _span_json(item())
        return spans  # type: ignore[return-value] # all bytes now

    def record(self, tenant: str, program_id: str) -> ProgramRecord:
        """This instance's record of a program (created on first sight). Call `touch`
        after changing it."""
        key = program_key(tenant, program_id)
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = ProgramRecord(program_id, tenant, self.instance_id)
            while len(self._records) > self._max_programs:
                self._records.popitem(last=False)
        return rec

    def touch(self, rec: ProgramRecord) -> None:
        rec.updated_ns = time.time_ns()
        key = rec.key
        self._records.move_to_end(key)
        if self._redis is not None:
            self._ensure_flusher()
            self._dirty.add(key)

    def local_tenant_of(self, program_id: str) -> str | None:
        """The tenant of a program this instance has seen under that id, if any."""
        self.catch_up()
        for rec in reversed(self._records.values()):
            if rec.program_id == program_id:
                return rec.tenant
        return None

    def _evict_spans(self, keep: str) -> None:
        while self._span_count > self._max_spans and len(self._spans) > 1:
            oldest = next(iter(self._spans))
            if oldest == keep:
                self._spans.move_to_end(keep)
                continue
            self._span_count -= len(self._spans.pop(oldest))

    # -- reads --------------------------------------------------------------------------

    async def program_spans(self, key: str) -> list[SpanDict]:
        """Every finished span of a program (by `program_key`), from this instance and
        (with Redis) all."""
        self.catch_up()
        spans: dict[str, SpanDict] = {}
        for blob in self._blobs(key):
            span = orjson.loads(blob)
            spans[span["span_id"]] = span
        if self._redis is not None:
            try:
                raw = await self._call(self._redis.hvals(self._key("trace", key)))
            except REDIS_DOWN_ERRORS:
                raw = []
            for item in raw:
                span = orjson.loads(item)
                spans.setdefault(span["span_id"], span)
        return sorted(spans.values(), key=lambda s: (s["start_ns"], s["span_id"]))

    async def program_summary(self, key: str) -> dict[str, Any] | None:
        self.catch_up()
        parts = await self._parts([key])
        return merge_records(parts[key], time.time_ns()) if parts.get(key) else None

    async def program_summaries(
        self, limit: int = 200, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """The most recently updated programs, newest first (only `tenant`'s if given)."""
        self.catch_up()
        keys = [
            key
            for key, rec in reversed(self._records.items())
            if tenant is None or rec.tenant == tenant
        ][:limit]
        if self._redis is not None:
            index = self._key("progs") if tenant is None else self._key("tenant_progs", tenant)
            try:
                remote = await self._call(self._redis.zrevrange(index, 0, limit - 1))
                keys = list(dict.fromkeys(keys + [r.decode() for r in remote]))
            except REDIS_DOWN_ERRORS:
                pass
        parts = await self._parts(keys)
        now = time.time_ns()
        out = [merge_records(parts[key], now) for key in keys if parts.get(key)]
        if tenant is not None:
            out = [p for p in out if p["tenant"] == tenant]
        out.sort(key=lambda p: p["updated_ms"], reverse=True)
        return out[:limit]

    async def _parts(self, keys: list[str]) -> dict[str, list[ProgramRecord]]:
        parts: dict[str, dict[str, ProgramRecord]] = {key: {} for key in keys}
        if self._redis is not None and keys:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(self._key("prog", key))
                rows = await self._call(pipe.execute())
            except REDIS_DOWN_ERRORS:
                rows = [{} for _ in keys]
            for key, row in zip(keys, rows, strict=True):
                for instance, blob in row.items():
                    parts[key][instance.decode()] = ProgramRecord(**orjson.loads(blob))
        for key in keys:  # this instance's own part is freshest locally
            rec = self._records.get(key)
            if rec is not None:
                parts[key][self.instance_id] = rec
        return {key: list(by_instance.values()) for key, by_instance in parts.items()}

    # -- trace context shared across replicas ----------------------------------------

    async def bind_trace_parent(self, key: str, traceparent: str) -> str:
        """Record the W3C traceparent a program's trace hangs under; the first replica to
        bind wins. Returns the binding in force (ours or the earlier one)."""
        if self._redis is None:
            return traceparent
        redis_key = self._key("tracectx", key)
        try:
            if await self._call(self._redis.set(redis_key, traceparent, nx=True, ex=self._ttl_s)):
                return traceparent
            earlier = await self._call(self._redis.get(redis_key))
        except REDIS_DOWN_ERRORS:
            return traceparent
        return earlier.decode() if earlier else traceparent

    async def lookup_trace_parent(self, key: str) -> str | None:
        if self._redis is None:
            return None
        try:
            found = await self._call(self._redis.get(self._key("tracectx", key)))
        except REDIS_DOWN_ERRORS:
            return None
        return found.decode() if found else None

    # -- the Redis mirror ----------------------------------------------------------------

    def _key(self, kind: str, *parts: str) -> str:
        return redis_key(self._prefix, kind, *parts)

    async def _call(self, awaitable: Any) -> Any:
        return await asyncio.wait_for(awaitable, self._redis_timeout_s)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except REDIS_DOWN_ERRORS:
                pass  # flush() logged it; retried on the next tick
            except Exception:  # never let the mirror die: serving must not notice
                log.exception("trace store flush failed")

    async def flush(self) -> None:
        """Write queued spans and changed program records to Redis. On failure they stay
        queued (the next flush retries them), so an outage loses nothing but memory. When
        Redis lost this instance's writes, everything held locally is written back."""
        self.catch_up()
        if self._redis is None:
            return
        if not (self._pending_spans or self._dirty):
            await self._check_marker_when_idle()
            return
        spans, self._pending_spans = self._pending_spans, []
        dirty, self._dirty = self._dirty, set()
        try:
            if not self._marker_set:  # the first write: this instance's marker first
                await self._call(self._redis.set(self._marker, "1", ex=MARKER_TTL_S))
                self._marker_set = True
            synced = await self._call(self._write(spans, dirty))
            if not synced:
                await self._resync()
        except REDIS_DOWN_ERRORS as exc:
            self._pending_spans[:0] = spans
            self._dirty |= dirty
            self._went_down(exc)
            raise
        self._came_back(len(spans), len(dirty))

    async def _check_marker_when_idle(self) -> None:
        """Notice an empty restart even when nothing is queued."""
        now = asyncio.get_running_loop().time()
        if not self._marker_set or now - self._marker_checked < self._watch_interval_s:
            return  # nothing written yet, or checked a moment ago
        self._marker_checked = now
        assert self._redis is not None
        try:
            if not await self._call(self._redis.exists(self._marker)):
                await self._resync()
        except REDIS_DOWN_ERRORS as exc:
            self._went_down(exc)
            raise
        self._came_back(0, 0)

    def _went_down(self, exc: BaseException) -> None:
        self.flushes_failed += 1
        if not self._redis_down:
            self.outages += 1
            log.warning("redis unreachable (%s): traces stay local until it returns", exc)
        self._redis_down = True

    def _came_back(self, spans: int, records: int) -> None:
        if self._redis_down:
            log.warning("redis is back: wrote %d spans, %d programs", spans, records)
            self._redis_down = False

    async def _resync(self) -> None:
        """Redis lost this instance's writes (restarted empty): write back every span and
        summary held here, then the marker, so the next flush knows Redis has them."""
        assert self._redis is not None
        spans = [(key, orjson.loads(blob)["span_id"], blob)
                 for key in self._spans for blob in self._blobs(key)]
        log.warning("redis lost this instance's traces: writing back %d spans of %d programs",
                    len(spans), len(self._records))
        await self._call(self._write(spans, set(self._records), check_marker=False))
        await self._call(self._redis.set(self._marker, "1", ex=MARKER_TTL_S))
        self.resyncs += 1

    async def _write(self, spans: list[tuple[str, str, bytes]], dirty: set[str], *,
                     check_marker: bool = True) -> bool:
        """One transaction. Returns whether Redis still held this instance's marker when
        it ran (else the caller writes everything back). A write Redis refuses goes back
        to the queue until it has been refused `max_write_attempts` times."""
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=True)
        if check_marker:
            pipe.exists(self._marker)
        # One HSET per program for its new spans, one ZADD per index: commands per flush
        # grow with the programs touched, not with spans (each costs Python in redis-py).
        # Per command: (kind, key, what it wrote: spans, or the programs of an index).
        ops: list[tuple[str, str, list[tuple[str, bytes]] | None]] = []
        by_key: dict[str, list[tuple[str, bytes]]] = {}
        for key, span_id, blob in spans:
            by_key.setdefault(key, []).append((span_id, blob))
        for key, entries in by_key.items():
            pipe.hset(self._key("trace", key), mapping=dict(entries))
            pipe.expire(self._key("trace", key), self._ttl_s)
            ops += [("trace", key, entries), ("trace", key, None)]
        scores: dict[str, float] = {}
        by_tenant: dict[str, dict[str, float]] = {}
        for key in dirty:
            rec = self._records.get(key)
            if rec is None:
                continue  # evicted locally; its last flushed state stays in Redis
            score = scores[key] = rec.updated_ns / 1e9
            by_tenant.setdefault(rec.tenant, {})[key] = score
            pipe.hset(self._key("prog", key), self.instance_id, orjson.dumps(asdict(rec)))
            pipe.expire(self._key("prog", key), self._ttl_s)
            ops += [("prog", key, None)] * 2
        if scores:  # a refused index entry is its program's write refused (retried)
            pipe.zadd(self._key("progs"), scores)
            ops.append(("members", "", [(key, b"") for key in scores]))
            for tenant, members in by_tenant.items():
                pipe.zadd(self._key("tenant_progs", tenant), members)
                ops.append(("members", tenant, [(key, b"") for key in members]))
        if dirty:
            pipe.zremrangebyrank(self._key("progs"), 0, -self._max_programs - 1)
            ops.append(("index", "", None))
        results = await pipe.execute(raise_on_error=False)
        synced = bool(results[0]) if check_marker else True
        self._requeue_refused(ops, results[1:] if check_marker else results)
        return synced

    def _requeue_refused(self, ops: list[tuple[str, str, list[tuple[str, bytes]] | None]],
                         results: list[Any]) -> None:
        refused: dict[tuple[str, str], ResponseError] = {}
        for (kind, key, entries), result in zip(ops, results, strict=True):
            if isinstance(result, ResponseError) and kind == "members":
                for program, _ in entries or ():
                    refused["prog", program] = result
            elif isinstance(result, ResponseError):
                refused[kind, key] = result
                for span_id, blob in entries or ():
                    self._pending_spans.append((key, span_id, blob))
            elif isinstance(result, Exception):
                raise result
        for (kind, key), error in refused.items():
            attempts = self._refusals.get((kind, key), 0) + 1
            if attempts < self._max_write_attempts:
                self._refusals[kind, key] = attempts
                if kind == "prog":
                    self._dirty.add(key)
                continue
            self._refusals.pop((kind, key), None)
            self.dropped_writes += 1
            log.warning("redis refused the %s of program %r %d times (%s): dropped",
                        kind, key, attempts, error)
            if kind == "trace":  # its spans were queued again above: drop them
                self._pending_spans = [p for p in self._pending_spans if p[0] != key]
        for kind, key, _ in ops:
            if (kind, key) not in refused:
                self._refusals.pop((kind, key), None)
