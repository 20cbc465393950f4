"""A heap of ready calls with O(log n) push, pop, re-key and removal.

Removal and re-keying are lazy: a call records the heap it is in and a version; stale heap
entries are skipped when they surface. Keys are tuples; the call's global sequence number
breaks ties, so calls themselves are never compared.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .program import CallNode

Entry = tuple[tuple[Any, ...], int, int, "CallNode"]


class ReadyHeap:
    __slots__ = ("_entries", "live", "name")

    def __init__(self, name: str = "ready") -> None:
        self._entries: list[Entry] = []
        # Calls in the heap: read it directly on hot paths (`len` is a Python call here).
        self.live = 0
        self.name = name

    def __len__(self) -> int:
        return self.live

    def push(self, call: CallNode, key: tuple[Any, ...]) -> None:
        """Insert `call` with `key`, or re-key it if it is already here."""
        if call.heap is not self:
            if call.heap is not None:
                call.heap.remove(call)
            call.heap = self
            self.live += 1
        call.version += 1
        call.key = key
        heapq.heappush(self._entries, (key, call.seq, call.version, call))

    def remove(self, call: CallNode) -> None:
        if call.heap is self:
            call.heap = None
            call.version += 1
            self.live -= 1

    def peek(self) -> CallNode | None:
        entries = self._entries
        while entries:
            _, _, version, call = entries[0]
            if call.heap is self and call.version == version:
                return call
            heapq.heappop(entries)
        return None

    def pop(self) -> CallNode | None:
        call = self.peek()
        if call is not None:
            heapq.heappop(self._entries)
            call.heap = None
            call.version += 1
            self.live -= 1
        return call

    def peek_key(self) -> tuple[Any, ...] | None:
        call = self.peek()
        return None if call is None else call.key

    def live_calls(self) -> list[CallNode]:
        """The calls in the heap, unordered (for introspection, not the hot path)."""
        seen: dict[int, CallNode] = {}
        for _, _, version, call in self._entries:
            if call.heap is self and call.version == version:
                seen[id(call)] = call
        return list(seen.values())
