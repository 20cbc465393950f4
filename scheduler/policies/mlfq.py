"""MLFQ discretisation (Autellix), shared by `mlfq`, `plas` and `atlas`, and plain `mlfq`.

K queues with geometric bounds: queue i holds ranks below `first_bound * growth**i`
(`level_of`). A call enters the queue that holds its rank. Within a queue, urgent calls
(latency-critical for the client, or upstream of one: `CallNode.urgent`) go first, then
FCFS by program arrival (so that a queue's programs finish in order instead of sharing).
A running call is demoted once it runs past its queue's quantum
(`quantum * growth**level`), which matters to abort-and-resume preemption. A call whose
wait is large against its service is promoted to the top queue (`anti_starvation.py`).

Ranks that grow while calls wait (PLAS: a program's service grows each time one of its
calls finishes) are brought up to date when a call reaches the head of the queue, not
when the history changes: a grown rank only moves a call down, so a stored key is never
larger than the current one and the head with an up-to-date key is the true minimum. A
finished call then costs O(1) whatever the number of the program's queued calls, and a
queued call is re-keyed at most K - 1 times.

Plain `mlfq` ranks a call by its own service only (non-zero only after a preemption), with
no program history, FCFS by call arrival within a queue.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..ready_queue import ReadyHeap
from .anti_starvation import NOT_WATCHED, PROMOTED, anti_starvation_for
from .engine_rank import LeveledRanks

if TYPE_CHECKING:
    from ..config import SchedulerConfig
    from ..program import CallNode


class LeveledPolicy:
    """The discretisation; a subclass gives `rank` (and `order`, if not program arrival)."""

    name = "leveled"
    wants_prefix_hint = False
    program_history = True  # anti-starvation's W and T include the program's
    ranks_grow_while_queued = False  # True: re-rank the head before it is taken

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.levels = config.mlfq_queues
        self.first_bound = config.mlfq_first_bound
        self.log_growth = math.log(config.mlfq_growth)
        self._heap = ReadyHeap(self.name)
        self._starvation = anti_starvation_for(
            config, self._in_queue, default=True, program_history=self.program_history
        )
        self._ranks = LeveledRanks(self.levels)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def promotions(self) -> int:
        return self._starvation.promotions if self._starvation is not None else 0

    # --- the order ---------------------------------------------------------------------
    def rank(self, call: CallNode) -> float:
        raise NotImplementedError

    def order(self, call: CallNode) -> int:
        """FCFS within a queue, by program arrival."""
        return call.program.seq

    def level_of(self, rank: float) -> int:
        if rank < self.first_bound:
            return 0
        level = int(math.log(rank / self.first_bound) / self.log_growth) + 1
        return level if level < self.levels else self.levels - 1

    def quantum(self, level: int) -> float:
        return self.config.mlfq_quantum * self.config.mlfq_growth**level

    def key(self, call: CallNode, level: int) -> tuple[int, int, int, int]:
        return (level, 0 if call.urgent else 1, self.order(call), call.seq)

    def engine_rank(self, call: CallNode) -> int:
        return self._ranks.rank(call.level, call.urgent, self.order(call))

    # --- the queue ---------------------------------------------------------------------
    def push(self, call: CallNode, now: float) -> None:
        rank = self.rank(call)
        call.priority = rank
        level = self.level_of(rank)
        call.promote_at = NOT_WATCHED
        if level > 0 and self._starvation is not None and self._starvation.admit(call, now):
            level = 0
        call.level = level
        self._heap.push(call, self.key(call, level))

    def pop(self, now: float) -> CallNode | None:
        starvation = self._starvation
        if starvation is not None and starvation.next_due <= now:
            self._promote_starving(now)
        if self.ranks_grow_while_queued:
            self._rerank_head(now)
        return self._heap.pop()

    def peek(self, now: float) -> CallNode | None:
        if self._starvation is not None:
            self._promote_starving(now)
        if self.ranks_grow_while_queued:
            self._rerank_head(now)
        return self._heap.peek()

    def requeue(self, call: CallNode, now: float) -> None:
        self._heap.push(call, call.key)
        starvation = self._starvation
        if call.level > 0 and starvation is not None and call.promote_at == NOT_WATCHED:
            if starvation.admit(call, now):
                self._promote(call)

    def remove(self, call: CallNode) -> None:
        if call.heap is not None:
            call.heap.remove(call)

    def rekey(self, call: CallNode, now: float) -> None:
        if call.heap is self._heap:
            self._heap.push(call, self.key(call, call.level))

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """The program's history changed: its queued calls follow when they reach the
        head (`_rerank_head`), their deadlines when those pass (`AntiStarvation`)."""

    def level_after_running(self, call: CallNode, ran: float) -> int:
        level = call.level
        budget = self.quantum(level)
        while ran > budget and level < self.levels - 1:
            ran -= budget
            level += 1
            budget = self.quantum(level)
        return level

    def depth_by_level(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for call in self._heap.live_calls():
            level = self._current_level(call)
            depth[level] = depth.get(level, 0) + 1
        return depth

    # --- internals ---------------------------------------------------------------------
    def _promote_starving(self, now: float) -> None:
        assert self._starvation is not None
        for call in self._starvation.starving(now):
            self._promote(call)

    def _rerank_head(self, now: float) -> None:
        """Bring the head's key up to date (its rank may have grown since it was keyed)."""
        heap = self._heap
        while (call := heap.peek()) is not None:
            if call.rank_settled or call.promote_at == PROMOTED:
                return
            rank = self.rank(call)
            if rank == call.priority:
                return
            call.priority = rank
            level = self.level_of(rank)
            if level == call.level:
                return
            if level > 0 and call.promote_at == NOT_WATCHED and self._starvation is not None:
                if self._starvation.admit(call, now):
                    level = 0
            call.level = level
            heap.push(call, self.key(call, level))

    def _in_queue(self, call: CallNode) -> bool:
        return call.heap is self._heap

    def _promote(self, call: CallNode) -> None:
        call.level = 0
        self._heap.push(call, self.key(call, 0))

    def _current_level(self, call: CallNode) -> int:
        if not self.ranks_grow_while_queued or call.promote_at == PROMOTED:
            return call.level
        return self.level_of(self.rank(call))


class MLFQPolicy(LeveledPolicy):
    """Plain MLFQ: a call's own service only; FCFS by call arrival within a queue."""

    name = "mlfq"
    program_history = False

    def rank(self, call: CallNode) -> float:
        return call.service

    def order(self, call: CallNode) -> int:
        return call.seq
