"""A state store that keeps serving when its shared backend (Redis) is unreachable.

`ResilientStateStore` wraps a shared store (`RedisStateStore`) with a local copy:

- while the backend answers, every call goes to it (so replicas share one history) and
  the totals it returns are cached locally;
- when it fails or stalls (`timeout_s`), the store is *degraded*: finished calls are
  added to the local totals (so the policies keep ranking by everything this replica has
  seen) and journalled; `load` answers from the local copy;
- a background task probes the backend. When it answers again, the store first restores
  the history of recently active programs that the backend no longer has (a Redis that
  restarted empty; `restore` writes only where nothing exists, so replicas never double
  it), then replays the journal in order (each record is one atomic increment, so other
  replicas' increments are kept), and is healthy again.

Nothing waits on a dead Redis for longer than `timeout_s`, and no program is lost: a
program first seen while degraded lives in the local copy and reaches Redis on replay.
Caveat: a write that reached Redis but whose reply was lost (a timeout at the wrong
moment) is replayed and counted twice; the history is a ranking signal, so that rare
over-count is tolerated rather than paying for idempotency keys on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .store import CallRecord, HistoryTotals, InMemoryStateStore, StateStore, add_record

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, program id)
T = TypeVar("T")


@dataclass(slots=True)
class _Entry:
    """One program's history as this replica knows it."""

    totals: HistoryTotals  # what `load`/`record_call` answer
    touched: float  # loop time of the last use
    ended: bool = False


@dataclass(slots=True)
class _Journal:
    """Writes not yet in the backend, in order, per program."""

    calls: OrderedDict[Key, list[CallRecord]] = field(default_factory=OrderedDict)
    ended: dict[Key, str] = field(default_factory=dict)
    size: int = 0

    def __bool__(self) -> bool:
        return bool(self.calls or self.ended)


class ResilientStateStore:
    """A `StateStore` over a shared backend that degrades to local state and re-syncs."""

    in_process = False

    def __init__(
        self,
        backend: StateStore,
        *,
        timeout_s: float = 0.5,
        probe_interval_s: float = 0.5,
        restore_window_s: float = 3600.0,
        max_programs: int = 200_000,
        max_journal: int = 1_000_000,
    ) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self.restore_window_s = restore_window_s
        self.max_programs = max_programs
        self.max_journal = max_journal
        self._local: OrderedDict[Key, _Entry] = OrderedDict()
        self._journal = _Journal()
        self._healthy = True
        self._resync: asyncio.Task[None] | None = None
        self.outages = 0
        self.replayed_calls = 0
        self.restored_programs = 0
        self.dropped_records = 0  # journal overflow during a very long outage

    @property
    def healthy(self) -> bool:
        return self._healthy

    # -- StateStore ----------------------------------------------------------------------

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        key = (tenant, program_id)
        if self._healthy:
            try:
                totals = await self._backend(self.backend.load(tenant, program_id))
            except Exception as exc:  # noqa: BLE001 - any backend failure degrades
                self._degrade(exc)
            else:
                if totals is not None:
                    self._remember(key, totals)
                    return _copy(totals)
        entry = self._local.get(key)
        return _copy(entry.totals) if entry is not None else None

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        key = (tenant, program_id)
        if self._healthy:
            try:
                totals = await self._backend(self.backend.record_call(tenant, program_id, record))
            except Exception as exc:  # noqa: BLE001
                self._degrade(exc)
            else:
                self._remember(key, totals)
                return _copy(totals)
        self._journal_call(key, record)
        return _copy(self._add_locally(key, record))

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        key = (tenant, program_id)
        entry = self._local.get(key)
        if entry is not None:
            entry.ended = True
        if self._healthy:
            try:
                await self._backend(self.backend.end_program(tenant, program_id, status))
                return
            except Exception as exc:  # noqa: BLE001
                self._degrade(exc)
        self._journal.ended[key] = status

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
            self._resync = None
        await self.backend.close()

    # -- local copy ----------------------------------------------------------------------

    async def _backend(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self.timeout_s)

    def _remember(self, key: Key, totals: HistoryTotals) -> None:
        entry = self._local.get(key)
        now = asyncio.get_running_loop().time()
        if entry is None:
            self._local[key] = _Entry(_copy(totals), now)
            while len(self._local) > self.max_programs:
                self._local.popitem(last=False)
        else:
            entry.totals = _copy(totals)
            entry.touched = now
            self._local.move_to_end(key)

    def _add_locally(self, key: Key, record: CallRecord) -> HistoryTotals:
        entry = self._local.get(key)
        if entry is None:
            self._remember(key, HistoryTotals())
            entry = self._local[key]
        else:
            entry.touched = asyncio.get_running_loop().time()
            self._local.move_to_end(key)
        add_record(entry.totals, record)
        return entry.totals

    # -- degraded mode and re-sync -------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            self.outages += 1
            log.warning("state store backend unreachable (%r): serving on local history", exc)
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(
                self._resync_loop(), name="state-store-resync"
            )

    def _journal_call(self, key: Key, record: CallRecord) -> None:
        self._journal.calls.setdefault(key, []).append(record)
        self._journal.size += 1
        while self._journal.size > self.max_journal:
            oldest_key, records = next(iter(self._journal.calls.items()))
            records.pop(0)
            self._journal.size -= 1
            self.dropped_records += 1
            if not records:
                del self._journal.calls[oldest_key]

    async def _resync_loop(self) -> None:
        restored = False
        while not self._healthy:
            await asyncio.sleep(self.probe_interval_s)
            try:
                if not restored:
                    await self._restore_lost_history()
                    restored = True
                await self._replay()
            except Exception:  # noqa: BLE001 - still down; the next probe retries
                continue
            if not self._journal:  # nothing arrived while the last await ran
                self._healthy = True
                log.warning(
                    "state store backend is back: %d calls replayed, %d programs restored",
                    self.replayed_calls,
                    self.restored_programs,
                )

    async def _restore_lost_history(self) -> None:
        """Give back to a backend that lost its data (restarted empty) the history of the
        open programs this replica used recently, *before* replaying increments on top.
        `restore` writes only where the backend has nothing, so when several replicas do
        this the first wins and none doubles the totals."""
        restore = getattr(self.backend, "restore", None)
        if restore is None:
            return
        horizon = asyncio.get_running_loop().time() - self.restore_window_s
        recent: list[tuple[Key, HistoryTotals]] = []
        for key, entry in reversed(self._local.items()):
            if entry.touched < horizon:
                break
            if entry.ended:
                continue
            # What the backend had: the local totals minus this replica's journalled calls.
            baseline = _minus(entry.totals, self._journal.calls.get(key, ()))
            if baseline.calls_finished > 0:
                recent.append((key, baseline))
        for key, baseline in recent:
            if await self._backend(restore(*key, baseline)):
                self.restored_programs += 1

    async def _replay(self) -> None:
        """Push the journal to the backend, oldest first. A record leaves the journal only
        once the backend has it, so a failure midway resumes where it stopped."""
        journal = self._journal
        while journal.calls:
            key, records = next(iter(journal.calls.items()))
            while records:
                totals = await self._backend(self.backend.record_call(*key, records[0]))
                records.pop(0)
                journal.size -= 1
                self.replayed_calls += 1
                if not records:
                    self._remember(key, totals)
            del journal.calls[key]
        while journal.ended:
            key, status = next(iter(journal.ended.items()))
            await self._backend(self.backend.end_program(*key, status))
            del journal.ended[key]


def _copy(totals: HistoryTotals) -> HistoryTotals:
    return replace(totals, engines_used=set(totals.engines_used))


def _minus(totals: HistoryTotals, records: list[CallRecord] | tuple[()]) -> HistoryTotals:
    out = _copy(totals)
    for record in records:
        out.service -= record.service
        out.engine_time_s -= record.engine_time_s
        out.weighted_tokens -= record.weighted_tokens
        out.wait_s -= record.wait_s
        out.calls_finished -= 1
    return out


def make_resilient_store(redis_url: str | None) -> StateStore:
    """In memory without a URL; Redis behind the resilient wrapper with one."""
    if not redis_url:
        return InMemoryStateStore()
    from .store import RedisStateStore

    return ResilientStateStore(RedisStateStore(redis_url))
