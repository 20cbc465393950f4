"""A state store that keeps serving when its shared backend (Redis) fails.

`ResilientStateStore` wraps `store_redis.RedisStateStore` with a local copy of every
program this instance has used (up to `max_programs`, newest kept), including ended ones:
per program, the totals it answers and this instance's own part (exact: every call it
recorded).

- While the backend answers, calls go to it (so replicas share one history) and the
  local copy follows its answers.
- When it is unreachable or stalls (`timeout_s`), the store is *degraded*: calls are
  added to the local copy, whose programs are marked *pending*; `load` answers locally.
- When Redis answers but refuses one program's write (WRONGTYPE, OOM, READONLY), only
  that program is pending: every other program keeps going to Redis.
- A background task retries the pending programs every `probe_interval_s`, writing this
  instance's whole part of each (absolute values: idempotent, so a write that reached
  Redis but whose reply was lost is not counted twice, and other replicas' parts are
  never touched). A program whose write is refused `max_write_attempts` times is given
  up and counted (`dropped_writes`), so one bad key never blocks the rest.
- When Redis lost this instance's writes (restarted empty: `store_redis` notices the
  missing instance marker atomically with each operation and writes nothing), the task
  writes back *everything* the local copy holds whose Redis TTL has not run out, ended
  programs included, and only then sets the marker again. A record is never started
  from a later call alone.

Nothing waits on a dead Redis for longer than `timeout_s`. What does not survive: the
part of a program's history written by an instance that is gone when Redis restarts
empty, and programs this instance evicted from its local copy (`max_programs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import TypeVar

from .store import (
    CallRecord,
    HistoryTotals,
    StoreDataLostError,
    StoreHealth,
    StoreUnavailableError,
    StoreWriteRejectedError,
    add_record,
)
from .store_redis import RedisStateStore, SharedHistory, WriteBack

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, program id)
T = TypeVar("T")
WRITE_BACK_BATCH = 500  # programs per round trip when writing back


@dataclass(slots=True)
class _Entry:
    """One program's history as this instance knows it."""

    totals: HistoryTotals  # what `load` / `record_call` answer
    own: HistoryTotals  # this instance's part: exact when `own_known`, else added since
    own_known: bool  # False: first seen while Redis was away (its earlier part unknown)
    touched: float  # loop time of the last use
    created: float  # unix time
    status: str | None = None  # set once the program ended
    ended_at: float = 0.0  # loop time of the end
    version: int = 0  # local changes so far: a write-back is current if none came after


class ResilientStateStore:
    """A `StateStore` over Redis that degrades to local state and re-syncs."""

    in_process = False

    def __init__(
        self,
        backend: RedisStateStore,
        *,
        timeout_s: float = 0.5,
        probe_interval_s: float = 0.5,
        watch_interval_s: float = 1.0,
        max_programs: int = 200_000,
        max_write_attempts: int = 3,
    ) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self.watch_interval_s = watch_interval_s
        self.max_programs = max_programs
        self.max_write_attempts = max_write_attempts
        self._local: OrderedDict[Key, _Entry] = OrderedDict()
        self._pending: dict[Key, int] = {}  # program -> refused writes so far
        self._reachable = True
        self._lost = False  # Redis lost our writes: write back everything held
        self._resync: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.outages = 0
        self.resyncs = 0
        self.written_back = 0  # program histories written back after a failure
        self.dropped_writes = 0

    @property
    def healthy(self) -> bool:
        return self._reachable and not self._lost and not self._pending

    def health(self) -> StoreHealth:
        return StoreHealth("redis", reachable=self._reachable and not self._lost,
                           pending_writes=len(self._pending),
                           dropped_writes=self.dropped_writes, outages=self.outages,
                           resyncs=self.resyncs)

    # -- StateStore ----------------------------------------------------------------------

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        key = (tenant, program_id)
        if self._usable(key):
            try:
                shared = await self._backend(self.backend.load_shared(tenant, program_id))
            except StoreWriteRejectedError:
                pass  # a key Redis cannot read: answer from the local copy
            except Exception as exc:  # noqa: BLE001 - unreachable, stalled or lost
                self._fail(exc)
            else:
                if shared is not None:
                    return _copy(self._remember(key, shared).totals)
        entry = self._local.get(key)
        return _copy(entry.totals) if entry is not None else None

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        key = (tenant, program_id)
        if self._usable(key):
            try:
                shared = await self._backend(self.backend.record_shared(tenant, program_id,
                                                                        record))
            except StoreWriteRejectedError as exc:
                self._refused(key, exc)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
            else:
                return _copy(self._remember(key, shared).totals)
        entry = self._entry(key)
        add_record(entry.totals, record)
        add_record(entry.own, record)
        entry.version += 1
        self._mark_pending(key)
        return _copy(entry.totals)

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        key = (tenant, program_id)
        entry = self._entry(key)
        entry.status = status
        entry.ended_at = asyncio.get_running_loop().time()
        entry.version += 1
        if self._usable(key):
            try:
                await self._backend(self.backend.end_program(tenant, program_id, status))
                return
            except StoreWriteRejectedError as exc:
                self._refused(key, exc)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
        self._mark_pending(key)

    async def close(self) -> None:
        for task in (self._resync, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._resync = self._watch = None
        await self.backend.close()

    # -- local copy ----------------------------------------------------------------------

    def _usable(self, key: Key) -> bool:
        """Redis takes this program's calls directly: it is reachable, has not lost our
        writes, and holds this program's latest state (nothing pending for it)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(
                self._watch_loop(), name="state-store-watch")
        return self._reachable and not self._lost and key not in self._pending

    async def _backend(self, awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailableError(f"no answer within {self.timeout_s} s") from exc

    def _entry(self, key: Key) -> _Entry:
        entry = self._local.get(key)
        now = asyncio.get_running_loop().time()
        if entry is None:
            entry = _Entry(HistoryTotals(), HistoryTotals(), own_known=False, touched=now,
                           created=time.time())
            self._insert(key, entry)
        else:
            entry.touched = now
            self._local.move_to_end(key)
        return entry

    def _remember(self, key: Key, shared: SharedHistory) -> _Entry:
        """Redis's answer into the local copy. Its own part is this instance's exactly."""
        entry = self._entry(key)
        entry.totals = _copy(shared.totals)
        entry.own = _copy(shared.own)
        entry.own_known = True
        if shared.status is not None and entry.status is None:
            entry.status = shared.status
        return entry

    def _insert(self, key: Key, entry: _Entry) -> None:
        self._local[key] = entry
        while len(self._local) > self.max_programs:
            oldest = next(iter(self._local))
            self._local.pop(oldest)
            if self._pending.pop(oldest, None) is not None:
                self.dropped_writes += 1  # its history never reached Redis

    # -- failures and re-sync ------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, StoreDataLostError):
            if not self._lost:
                log.warning("the state store's Redis lost this instance's history (%s): "
                            "writing back every program held", exc)
            self._lost = True
        elif self._reachable:
            self.outages += 1
            log.warning("state store backend unreachable (%r): serving on local history", exc)
        self._reachable = False
        self._start_resync()

    def _refused(self, key: Key, exc: BaseException) -> None:
        if key not in self._pending:
            log.warning("state store refused the history of program %r of tenant %r (%s); "
                        "kept locally, retried %d times", key[1], key[0], exc,
                        self.max_write_attempts)
        self._pending[key] = self._pending.get(key, 0) + 1

    def _mark_pending(self, key: Key) -> None:
        self._pending.setdefault(key, 0)
        self._start_resync()

    def _start_resync(self) -> None:
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(
                self._resync_loop(), name="state-store-resync")

    async def _watch_loop(self) -> None:
        """Notice an outage or an empty restart even when no call comes: the programs held
        here go back to Redis without waiting for traffic."""
        while True:
            await asyncio.sleep(self.watch_interval_s)
            if not self.healthy:
                continue  # the re-sync task is on it
            try:
                if not await self._backend(self.backend.synced()):
                    self._fail(StoreDataLostError("the instance marker is gone"))
            except StoreWriteRejectedError:
                continue
            except Exception as exc:  # noqa: BLE001 - unreachable or stalled
                self._fail(exc)

    async def _resync_loop(self) -> None:
        while not self.healthy:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self._resync_once()
            except StoreUnavailableError:
                continue  # still away: the next probe retries
            except Exception:  # never let the task die: serving must not notice
                log.exception("state store re-sync failed")
                continue
        log.warning("state store backend in sync: %d program histories written back, "
                    "%d dropped, %d re-syncs", self.written_back, self.dropped_writes,
                    self.resyncs)

    async def _resync_once(self) -> None:
        backend = self.backend
        if not self._lost and not await self._backend(backend.synced()):
            self._lost = True  # restarted empty while we were not looking
        if self._lost:
            # Marker checks off: Redis is known to have lost it until `mark_synced`.
            await self._write_back(self._held(), check_marker=False)
            await self._backend(backend.mark_synced())
            self._lost = False
            self.resyncs += 1
        else:
            await self._write_back(list(self._pending), check_marker=True)
        self._reachable = True

    def _held(self) -> list[Key]:
        """Every program held whose Redis record would still be alive (TTL not run out)."""
        now = asyncio.get_running_loop().time()
        ttl, ended_ttl = self.backend.ttl_s, self.backend.ended_ttl_s
        return [key for key, e in self._local.items()
                if (e.ended_at + ended_ttl if e.status else e.touched + ttl) > now]

    async def _write_back(self, keys: list[Key], *, check_marker: bool) -> None:
        for start in range(0, len(keys), WRITE_BACK_BATCH):
            batch = [(key, self._local[key]) for key in keys[start:start + WRITE_BACK_BATCH]
                     if key in self._local]
            items = [self._write_back_item(key, entry) for key, entry in batch]
            results = await self._backend(self.backend.write_back(
                [item for item, _ in items], check_marker=check_marker))
            for (key, entry), (item, version), result in zip(batch, items, results,
                                                             strict=True):
                self._written(key, entry, item, version, result)

    def _write_back_item(self, key: Key, entry: _Entry) -> tuple[WriteBack, int]:
        now = asyncio.get_running_loop().time()
        if entry.status:
            ttl = self.backend.ended_ttl_s - (now - entry.ended_at)
        else:
            ttl = self.backend.ttl_s - (now - entry.touched)
        item = WriteBack(key[0], key[1], _copy(entry.own), set(entry.totals.engines_used),
                         entry.created, int(ttl) + 1, entry.status,
                         "set" if entry.own_known else "add")
        return item, entry.version

    def _written(self, key: Key, entry: _Entry, item: WriteBack, version: int,
                 result: HistoryTotals | Exception) -> None:
        if isinstance(result, StoreDataLostError):
            self._lost = True  # lost again meanwhile: the next probe writes back everything
            return
        if isinstance(result, Exception):  # refused
            attempts = self._pending.get(key, 0) + 1
            if attempts < self.max_write_attempts:
                self._pending[key] = attempts
                return
            self._pending.pop(key, None)
            self.dropped_writes += 1
            log.warning("state store: gave up writing program %r of tenant %r after %d "
                        "refusals (%s)", key[1], key[0], attempts, result)
            return
        self.written_back += 1
        if item.mode == "add":
            # Redis's part is now exact; calls recorded while the write was under way
            # come on top of it.
            _subtract(entry.own, item.own)
            _add_totals(entry.own, result)
            entry.own_known = True
        if entry.version == version:  # nothing changed locally since: in sync
            self._pending.pop(key, None)


def _copy(totals: HistoryTotals) -> HistoryTotals:
    return replace(totals, engines_used=set(totals.engines_used))


def _add_totals(into: HistoryTotals, extra: HistoryTotals) -> None:
    into.service += extra.service
    into.engine_time_s += extra.engine_time_s
    into.weighted_tokens += extra.weighted_tokens
    into.wait_s += extra.wait_s
    into.calls_finished += extra.calls_finished


def _subtract(totals: HistoryTotals, part: HistoryTotals) -> None:
    totals.service -= part.service
    totals.engine_time_s -= part.engine_time_s
    totals.weighted_tokens -= part.weighted_tokens
    totals.wait_s -= part.wait_s
    totals.calls_finished -= part.calls_finished

