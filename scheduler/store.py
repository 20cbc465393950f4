"""Program history behind a small interface: in memory (the default) or in Redis.

The store is the source of truth for the history the policies rank by. With Redis
(`store_redis.py`, behind `store_resilient.py`), several progserve replicas in front of
the same engines share it, so a program whose calls land on different progserve processes
is still ranked by all the service it received. Each finished call is one atomic update
(`record_call`), which returns the new totals.
"""

from __future__ import annotations

import struct
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

    def health(self) -> StoreHealth:
        """Whether the store's backend takes its writes (for /health and /metrics)."""
        ...


@dataclass(slots=True, frozen=True)
class StoreHealth:
    """A store's state for /health and /metrics. `degraded`: serving on local state (the
    backend is unreachable, or some writes wait for a retry); never "down": serving goes
    on either way."""

    backend: str  # memory | redis
    reachable: bool = True
    pending_writes: int = 0  # programs whose latest history is not yet in the backend
    dropped_writes: int = 0  # writes the backend kept refusing, given up and counted
    outages: int = 0  # times the backend became unreachable
    resyncs: int = 0  # times the backend had lost this instance's writes and got them back

    @property
    def status(self) -> str:
        return "ok" if self.reachable and not self.pending_writes else "degraded"

    def to_json(self) -> dict[str, object]:
        return {"status": self.status, "backend": self.backend, "reachable": self.reachable,
                "pending_writes": self.pending_writes, "dropped_writes": self.dropped_writes,
                "outages": self.outages, "resyncs": self.resyncs}


class StoreError(Exception):
    """A shared backend's failure, as the resilient wrapper needs to tell them apart."""


class StoreUnavailableError(StoreError):
    """The backend cannot be reached (or did not answer in time)."""


class StoreWriteRejectedError(StoreError):
    """The backend answered, and refused this one operation (a key of the wrong type, out
    of memory, read-only): retrying it at once would fail again, other keys may work."""


class StoreDataLostError(StoreError):
    """The backend no longer holds what this instance wrote (it restarted empty)."""


# An ended program's history, packed: service, engine_time_s, weighted_tokens, wait_s,
# calls_finished, then the engines used, in one `bytes` (about 80 bytes, against about 230
# in a tuple of float objects: up to 100,000 ended programs are kept). Bytes hold no
# references, so the cycle collector never tracks them: tens of thousands of ended
# programs add nothing to the full collections' pauses, as live `HistoryTotals` (each
# with its set) would.
PackedTotals = bytes
_TOTALS = struct.Struct("<4dq")


def pack_totals(totals: HistoryTotals) -> PackedTotals:
    engines = sorted(totals.engines_used)
    return _TOTALS.pack(totals.service, totals.engine_time_s, totals.weighted_tokens,
                        totals.wait_s, totals.calls_finished) + \
        struct.pack(f"<{len(engines)}q", *engines)


def unpack_totals(packed: PackedTotals) -> HistoryTotals:
    service, engine_time_s, weighted_tokens, wait_s, calls_finished = \
        _TOTALS.unpack_from(packed)
    engines = {engine for (engine,) in struct.iter_unpack("<q", packed[_TOTALS.size:])}
    return HistoryTotals(service, engine_time_s, weighted_tokens, wait_s, calls_finished,
                         engines)


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

    def health(self) -> StoreHealth:
        return StoreHealth("memory")


def add_record(totals: HistoryTotals, record: CallRecord) -> None:
    """One finished call into a program's totals."""
    totals.service += record.service
    totals.engine_time_s += record.engine_time_s
    totals.weighted_tokens += record.weighted_tokens
    totals.wait_s += record.wait_s
    totals.calls_finished += 1
    if record.replica >= 0:
        totals.engines_used.add(record.replica)
