"""KV-aware program admission: under memory pressure, finish programs before starting
new ones.

Why. An agent program re-reads its whole context on every call, and between calls it
waits on tools. When the contexts of the programs in flight outgrow the replicas' KV
cache, every program loses part of its context while its tool runs and re-prefills it
when it returns; that extra prefill slows the engines, programs take longer, more of
them are in flight at once, and the cache thrashes harder. Engines cannot stop this:
they see requests, not programs, and a new program's first request looks like any
other. Holding new programs back until the admitted ones' contexts fit is the classic
cure for thrashing (load control by working set), and a program-aware scheduler can do
it. Under pressure it raises the hit rate over the ended-program hint alone, towards the
unbounded-KV ceiling, and lowers the mean token latency, because the prefill saved
outweighs the wait at admission (the figures and the runs that give them:
docs/architecture.md, Scheduler, KV-aware program admission).

The model. A program's *footprint* is the KV of its own that its next call will re-read:
its longest context so far (prompt and output tokens of a finished call) minus what its
first call found cached, the prefix it shares with other programs (a system prompt,
tool schemas), which counts for none of them. For a chain of calls that is exact; for a
tree it is the deepest branch, an undercount that errs towards admitting (the KV of
finished branches is dead, and counting it held back tree searches that did not
thrash). The *demand* is the footprints of the admitted programs; a program that has
not finished a call yet counts as the running mean of first-call footprints. A new program
(its first call) is admitted while the demand stays below `kv_admission_fill` of the
replicas' KV capacity; otherwise it waits, in arrival order, and its other calls with
it, but never longer than `kv_admission_max_wait_s`. An admitted program stops counting
when it ends, or when it has been idle (nothing queued or running) for
`retention_timeout_s`: its client may never come back.

Untagged single requests pass: they hold no KV across tool gaps. With a replica whose
KV capacity is unknown (an engine that reports none), admission is off.

Off by default (`kv_admission`): on a mix with tree searches under memory pressure it
did not raise the hit rate and cost latency, because a tree's KV is in its live branches,
which the deepest-branch footprint does not see, so the programs it holds back (chats,
tool loops) free little and wait behind long ones (docs/architecture.md has the numbers).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .config import SchedulerConfig
from .program import CallNode, CallStatus, Program
from .replica import Replica

# Weight of each new first-call footprint in the running mean (about the last 20).
FIRST_FOOTPRINT_WEIGHT = 0.05
FIRST_FOOTPRINT_PRIOR = 256  # tokens: the estimate before any program finished a call


class KvAdmission:
    def __init__(
        self,
        config: SchedulerConfig,
        replicas: Sequence[Replica],
        release: Callable[[CallNode, float], None],
    ) -> None:
        self.enabled = config.kv_admission
        self.fill = config.kv_admission_fill
        self.idle_s = config.retention_timeout_s
        self.max_wait_s = config.kv_admission_max_wait_s
        self.replicas = replicas
        self._release = release  # queue a call for dispatch (Dispatcher.enqueue)
        # Admitted program -> its footprint; least recently active first.
        self.admitted: OrderedDict[Program, float] = OrderedDict()
        # Admitted program -> the prompt tokens its first call found cached: the prefix
        # it shares with other programs, not part of its footprint.
        self.shared: dict[Program, int] = {}
        self.demand = 0.0
        self.first_footprint = float(FIRST_FOOTPRINT_PRIOR)
        self.held: OrderedDict[Program, list[CallNode]] = OrderedDict()
        self.held_calls = 0
        self.delayed = 0  # programs that waited for admission
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ entry points
    def admit(self, call: CallNode, now: float) -> bool:
        """True: queue `call` now. False: it is held and will be queued (through
        `release`) once its program is admitted."""
        program = call.program
        if not self.enabled or program.single_call:
            return True
        if program in self.admitted:
            self.admitted.move_to_end(program)
            return True
        if self.capacity() <= 0:
            return True
        if not self.held and self._has_room(now):
            self._admit(program)
            return True
        self._hold(call, now)
        return False

    def on_call_finished(self, call: CallNode, now: float) -> None:
        program = call.program
        counted = self.admitted.get(program)
        if counted is None:
            return
        context = call.prompt_tokens + call.completion_tokens
        shared = self.shared.get(program)
        if shared is None:  # its first call: what it found cached is what it shares
            shared = self.shared[program] = call.cached_tokens
            footprint = float(max(0, context - shared))
            self.first_footprint += FIRST_FOOTPRINT_WEIGHT * (footprint - self.first_footprint)
        else:
            footprint = max(counted, context - shared)
        self.admitted[program] = footprint
        self.admitted.move_to_end(program)
        self.demand += footprint - counted
        self._admit_held(now)

    def on_program_end(self, program: Program, now: float) -> None:
        """The program ended: it stops counting. Calls of it still held run now, as the
        calls in flight of an ended program do (a cancelled one's were discarded)."""
        self._forget(program)
        calls = self.held.pop(program, None)
        if calls:
            self._queue(calls)
        self._admit_held(now)

    def discard(self, call: CallNode) -> None:
        """A held call was cancelled."""
        calls = self.held.get(call.program)
        if calls is not None and call in calls:
            calls.remove(call)
            self.held_calls -= 1
            if not calls:
                del self.held[call.program]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ the model
    def capacity(self) -> int:
        """KV tokens of all replicas; 0 when any replica's is unknown."""
        total = 0
        for replica in self.replicas:
            if replica.kv_capacity <= 0:
                return 0
            total += replica.kv_capacity
        return total

    def _has_room(self, now: float) -> bool:
        self._expire_idle(now)
        return not self.admitted or self.demand < self.fill * self.capacity()

    def _expire_idle(self, now: float) -> None:
        """Stop counting programs idle past the timeout (least recently active first)."""
        admitted = self.admitted
        while admitted:
            program = next(iter(admitted))
            if program.open_calls or now < program.idle_since + self.idle_s:
                return
            self._forget(program)

    def _admit(self, program: Program) -> None:
        self.admitted[program] = self.first_footprint
        self.demand += self.first_footprint

    def _forget(self, program: Program) -> None:
        counted = self.admitted.pop(program, None)
        if counted is not None:
            self.demand -= counted
            self.shared.pop(program, None)
        if not self.admitted:
            self.demand = 0.0  # no drift from float sums

    # ------------------------------------------------------------------ held programs
    def _hold(self, call: CallNode, now: float) -> None:
        call.status = CallStatus.QUEUED
        call.queued_at = now
        calls = self.held.get(call.program)
        if calls is None:
            calls = self.held[call.program] = []
            self.delayed += 1
        calls.append(call)
        self.held_calls += 1
        self._arm_timer(now)

    def _admit_held(self, now: float) -> None:
        """Admit held programs, oldest first, while there is room; queue their calls
        with the time they were held, so their wait counts from then."""
        held = self.held
        while held and (self._has_room(now) or self._overdue(now)):
            program, calls = held.popitem(last=False)
            self._admit(program)
            self._queue(calls)

    def _overdue(self, now: float) -> bool:
        """The oldest held program has waited `kv_admission_max_wait_s`: admit it anyway.
        No program waits forever behind one whose context alone fills the KV."""
        return now >= self._held_since() + self.max_wait_s

    def _held_since(self) -> float:
        return next(iter(self.held.values()))[0].queued_at

    def _queue(self, calls: list[CallNode]) -> None:
        self.held_calls -= len(calls)
        for call in calls:
            self._release(call, call.queued_at)

    def _arm_timer(self, now: float) -> None:
        """While programs are held, look again when the least recently active admitted
        program could idle out, or the oldest held one is overdue: nothing else may
        happen before then."""
        if self._timer is not None or not self.held:
            return
        due = min(now + self.idle_s, self._held_since() + self.max_wait_s)
        if self.admitted:
            oldest = next(iter(self.admitted))
            if not oldest.open_calls:
                due = min(due, oldest.idle_since + self.idle_s)
        due = max(now, due)
        self._timer = asyncio.get_running_loop().call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        self._admit_held(now)
        self._arm_timer(now)
