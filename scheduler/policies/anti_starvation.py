"""Anti-starvation (DESIGN.md, MLFQ discretisation): a call whose wait is large against its
service is promoted to the top queue, when

    (W_prog + W_call) / (T_prog + T_call) >= beta

W_call is the call's time in the queue (plus its waits before an earlier preemption),
T_call its own service (non-zero after a preemption); W_prog is the program's wall-clock
waiting time and T_prog its attained service (not a sum over its parallel calls, which
would promote a program five times as fast for waiting on five branches). Without program
history (plain MLFQ) only the call's own terms count.

A composable piece: a policy calls `admit` when a call enters a lower queue and
`starving` before it picks the next call (the calls it returns are promoted: the policy
re-keys them into its top queue). `waiting(call)` tells whether a call is still in the
policy's queue: one that left (dispatched, parked for a replica, cancelled) is dropped
when its deadline comes up, and one that came back in the meantime is watched again.
The leveled policies use it by default; fcfs and dlpm can (`scheduler.anti_starvation`).

Cost. A call's deadline is `queued_at - wait + beta * T_call + (beta * T_prog - W_prog)`:
its own constant plus a program term that every queued call of the program shares (W_prog
only moves while none of its calls is queued). So a program's watched calls stay in one
order however its history changes, and one deadline per program sits in the heap: a
finished call costs nothing here, taking a call from the queue costs nothing here, and a
program's deadline is re-checked only when it passes.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import SchedulerConfig
    from ..program import CallNode

# `CallNode.promote_at`: not watched; promoted (in the top queue until it is pushed again);
# any finite value: watched, ordered within its program by that offset.
NOT_WATCHED = math.inf
PROMOTED = -math.inf


def anti_starvation_for(
    config: SchedulerConfig, waiting: Callable[[CallNode], bool], *, default: bool,
    program_history: bool = True,
) -> AntiStarvation | None:
    """The policy's anti-starvation piece, or None when it is off (`anti_starvation`
    unset: the policy's `default`)."""
    enabled = config.anti_starvation if config.anti_starvation is not None else default
    if not enabled:
        return None
    return AntiStarvation(config.starvation_beta, waiting, program_history=program_history)


class _Watch:
    """A program's watched calls (one call's, without program history), by offset."""

    __slots__ = ("key", "calls", "due")

    def __init__(self, key: object) -> None:
        self.key = key
        self.calls: list[tuple[float, int, CallNode]] = []  # lazy: stale entries stay
        self.due = math.nan  # the deadline its entry in the heap stands for; nan: none


class AntiStarvation:
    __slots__ = ("beta", "program_history", "promotions", "next_due", "_waiting", "_watches",
                 "_deadlines", "_tick")

    def __init__(self, beta: float, waiting: Callable[[CallNode], bool], *,
                 program_history: bool = True) -> None:
        self.beta = beta
        self.program_history = program_history
        self.promotions = 0
        # The earliest deadline in the heap (a lower bound): `starving` has work only from
        # then on, so a policy skips the call before (a cheap test on every pop).
        self.next_due = math.inf
        self._waiting = waiting
        self._watches: dict[object, _Watch] = {}
        self._deadlines: list[tuple[float, int, _Watch]] = []
        self._tick = itertools.count()

    def deadline(self, call: CallNode, now: float) -> float:
        """When the call's ratio reaches beta, with the history as it is now."""
        call_wait = call.wait + (now - call.queued_at)
        if self.program_history:
            history = call.program.history
            wait, service = history.wait_wall_s + call_wait, history.service + call.service
        else:
            wait, service = call_wait, call.service
        if service <= 0:
            return now
        return now + self.beta * service - wait

    def admit(self, call: CallNode, now: float) -> bool:
        """The call enters a lower queue. True: it is starving already (promote it now);
        else it is watched until its deadline."""
        due = self.deadline(call, now)
        if due <= now:
            call.promote_at = PROMOTED
            self.promotions += 1
            return True
        key = call.program if self.program_history else call
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(key)
        offset = call.queued_at - call.wait + self.beta * call.service
        call.promote_at = offset
        heapq.heappush(watch.calls, (offset, call.seq, call))
        if not due >= watch.due:  # earlier than the program's deadline in the heap, or none
            self._schedule(watch, due)
        return False

    def starving(self, now: float) -> list[CallNode]:
        """Watched calls whose deadline has passed: now promoted and no longer watched."""
        deadlines = self._deadlines
        promoted: list[CallNode] = []
        while deadlines and deadlines[0][0] <= now:
            due, _, watch = heapq.heappop(deadlines)
            if due != watch.due:
                continue  # superseded by an earlier deadline, or the watch is gone
            watch.due = math.nan
            self._promote_due(watch, now, promoted)
        self.next_due = deadlines[0][0] if deadlines else math.inf
        return promoted

    def _promote_due(self, watch: _Watch, now: float, promoted: list[CallNode]) -> None:
        calls = watch.calls
        while calls:
            offset, _, call = calls[0]
            if call.promote_at != offset:
                heapq.heappop(calls)  # pushed again (a new entry), or promoted
                continue
            if not self._waiting(call):
                heapq.heappop(calls)  # it left the queue: no longer watched
                call.promote_at = NOT_WATCHED
                continue
            due = self.deadline(call, now)
            if due > now:  # the program's service grew since: its deadline moved on
                self._schedule(watch, due)
                return
            heapq.heappop(calls)
            call.promote_at = PROMOTED
            self.promotions += 1
            promoted.append(call)
        self._drop(watch)

    def _schedule(self, watch: _Watch, due: float) -> None:
        watch.due = due
        heapq.heappush(self._deadlines, (due, next(self._tick), watch))
        if due < self.next_due:
            self.next_due = due

    def _drop(self, watch: _Watch) -> None:
        """Nothing of it is watched any more: forget it."""
        if self._watches.get(watch.key) is watch:
            del self._watches[watch.key]
        watch.calls = []
        watch.due = math.nan
