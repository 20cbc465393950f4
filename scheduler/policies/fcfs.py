"""FCFS: call arrival order, what SGLang and vLLM do; the baseline in every benchmark.

Urgency is ignored (a baseline of what engines do today). Anti-starvation is off unless
`scheduler.anti_starvation` turns it on; then a starving call goes ahead of the rest.
Engines get no order from it (every call ranks 0): their own arrival order is FCFS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ready_queue import ReadyHeap
from .anti_starvation import NOT_WATCHED, PROMOTED, anti_starvation_for

if TYPE_CHECKING:
    from ..config import SchedulerConfig
    from ..program import CallNode


class FCFSPolicy:
    name = "fcfs"
    levels = 1
    wants_prefix_hint = False

    def __init__(self, config: SchedulerConfig) -> None:
        self._heap = ReadyHeap(self.name)
        self._starvation = anti_starvation_for(
            config, lambda call: call.heap is self._heap, default=False)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def promotions(self) -> int:
        return self._starvation.promotions if self._starvation is not None else 0

    def key(self, call: CallNode) -> tuple[int, ...]:
        if self._starvation is None:
            return (call.seq,)
        return (0 if call.promote_at == PROMOTED else 1, call.seq)

    def push(self, call: CallNode, now: float) -> None:
        call.priority = 0.0
        call.level = 0
        call.promote_at = NOT_WATCHED
        if self._starvation is not None:
            self._starvation.admit(call, now)
        self._heap.push(call, self.key(call))

    def pop(self, now: float) -> CallNode | None:
        starvation = self._starvation
        if starvation is not None and starvation.next_due <= now:
            self._promote_starving(now)
        return self._heap.pop()

    def peek(self, now: float) -> CallNode | None:
        self._promote_starving(now)
        return self._heap.peek()

    def requeue(self, call: CallNode, now: float) -> None:
        self._heap.push(call, call.key)
        if self._starvation is not None and call.promote_at == NOT_WATCHED:
            if self._starvation.admit(call, now):
                self._heap.push(call, self.key(call))

    def remove(self, call: CallNode) -> None:
        if call.heap is not None:
            call.heap.remove(call)

    def rekey(self, call: CallNode, now: float) -> None:
        """Urgency does not change the order."""

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """No history in the order."""

    def engine_rank(self, call: CallNode) -> int:
        return 0

    def level_after_running(self, call: CallNode, ran: float) -> int:
        return 0

    def depth_by_level(self) -> dict[int, int]:
        queued = len(self._heap)
        return {0: queued} if queued else {}

    def _promote_starving(self, now: float) -> None:
        if self._starvation is not None:
            for call in self._starvation.starving(now):
                self._heap.push(call, self.key(call))
