"""The dispatcher: moves ready calls from the policy's queue onto engine replicas.

Each replica has an in-flight budget (requests and tokens). Keeping it small keeps the
engine's own queue short, so that progserve's order decides what runs (middleware-mode
preemption). A pass is scheduled with `call_soon` whenever something changes (a call is
queued, a call finishes) and coalesced, so a burst of events costs one pass.

A call placed on a replica gets its waiter future resolved with the replica index; the
coroutine that awaits it (the call's executor) then streams from the engine and calls
`release` when done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from .program import CallStatus

if TYPE_CHECKING:
    from .config import SchedulerConfig
    from .policies import Policy
    from .program import CallNode
    from .replica import Replica
    from .router import Router


class Dispatcher:
    def __init__(
        self,
        config: SchedulerConfig,
        replicas: list[Replica],
        policy: Policy,
        router: Router,
        on_dispatch: Callable[[CallNode, Replica, float], None],
        on_queued: Callable[[CallNode], None] | None = None,
    ) -> None:
        self.config = config
        self.replicas = replicas
        self.policy = policy
        self.router = router
        self.on_dispatch = on_dispatch
        self.on_queued = on_queued
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dispatched = 0
        self.preemptions = 0
        self._abort: Callable[[CallNode], None] | None = None
        self._preempt_timer: asyncio.TimerHandle | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # ------------------------------------------------------------------ entry points
    def enqueue(self, call: CallNode, now: float, *, announce: bool = True) -> None:
        """Queue a ready call. If the queue was empty the pass runs now, so an idle system
        places the call without a trip through the event loop. `announce=False`: the
        call was announced as queued before (held for KV admission since `now`)."""
        call.status = CallStatus.QUEUED
        call.queued_at = now
        program = call.program
        if not program.queued:
            program.waiting_since = now
        program.queued.add(call)
        policy = self.policy
        policy.push(call, now)
        if announce and self.on_queued is not None:
            self.on_queued(call)
        if len(policy) == 1 and not self._scheduled:
            self._run_pass()
        else:
            self.kick()

    def remove(self, call: CallNode) -> None:
        """Take a queued or parked call out of every queue (cancellation)."""
        self.policy.remove(call)
        self._left_queue(call)

    def release(self, call: CallNode) -> None:
        """The call left its replica (finished, failed, aborted, preempted)."""
        index = call.replica
        if index < 0:
            return
        replica = self.replicas[index]
        if call in replica.running:
            replica.running.discard(call)
            replica.inflight_requests -= 1
            replica.inflight_tokens -= call.budget_tokens
            if len(self.policy) or replica.parked:
                self.kick()

    def evacuate(self, replica: Replica) -> None:
        """The replica went down: calls parked for it go back to the queue."""
        now = (self._loop or asyncio.get_running_loop()).time()
        while replica.parked:
            call = replica.parked.pop()
            if call is not None:
                self.policy.requeue(call, now)
        self.kick()

    def kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._run_pass)

    # ------------------------------------------------------------------------- passes
    def _run_pass(self) -> None:
        self._scheduled = False
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        # Calls parked for their home replica go first when it has room: they were
        # popped (ranked first) earlier than anything still in the policy queue.
        for replica in self.replicas:
            parked = replica.parked
            while parked.live and replica.has_request_room():
                call = parked.peek()
                if call is None or not replica.has_room(call):
                    break
                parked.pop()
                self._place(call, replica, now)
        policy = self.policy
        router = self.router
        while len(policy) and self._any_request_room():
            call = policy.pop(now)
            if call is None:
                break
            decision = router.choose(call)
            replica = decision.replica
            if replica is None:
                # Head of line does not fit anywhere: it keeps its place and we wait.
                policy.requeue(call, now)
                break
            if decision.wait_for_home:
                replica.parked.push(call, call.key)
                continue
            self._place(call, replica, now)
        if self._abort is not None:
            self._schedule_preemption_check()

    def _any_request_room(self) -> bool:
        for replica in self.replicas:  # a loop, not any(genexpr): once per placed call
            if replica.has_request_room():
                return True
        return False

    def _left_queue(self, call: CallNode) -> None:
        program = call.program
        if call in program.queued:
            program.queued.discard(call)
            if not program.queued:
                loop = self._loop or asyncio.get_running_loop()
                program.history.wait_wall_s += loop.time() - program.waiting_since

    def _place(self, call: CallNode, replica: Replica, now: float) -> None:
        self._left_queue(call)
        call.status = CallStatus.RUNNING
        call.replica = replica.index
        call.dispatched_at = now
        replica.running.add(call)
        replica.inflight_requests += 1
        replica.inflight_tokens += call.budget_tokens
        replica.dispatched += 1
        self.dispatched += 1
        self.router.on_dispatch(call, replica)
        self.on_dispatch(call, replica, now)
        waiter = call.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(replica.index)

    # --------------------------------------------------------------------- preemption
    def enable_preemption(self, abort: Callable[[CallNode], None]) -> None:
        """Abort-and-resume for replicas whose engine ignores priorities: while calls wait,
        a running call that has run past its queue's quantum into a lower queue than the
        best waiting call is aborted (`abort`) and queued again; it resumes later with its
        prompt plus its output so far, which the prefix cache mostly serves."""
        self._abort = abort

    def _schedule_preemption_check(self) -> None:
        if self._abort is None or self._preempt_timer is not None or self.policy.levels <= 1:
            return
        if not len(self.policy) or all(r.capabilities.priority for r in self.replicas):
            return
        loop = self._loop or asyncio.get_running_loop()
        self._preempt_timer = loop.call_later(
            self.config.mlfq_quantum / 2, self._preemption_check
        )

    def _preemption_check(self) -> None:
        self._preempt_timer = None
        policy = self.policy
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        top = policy.peek(now)
        if top is not None and self._abort is not None:
            victim: CallNode | None = None
            worst = top.level
            for replica in self.replicas:
                if replica.capabilities.priority or replica.has_room(top):
                    continue  # the engine orders by itself, or the top call will fit anyway
                for call in replica.running:
                    if call.preempt_requested:
                        continue
                    level = policy.level_after_running(call, now - call.dispatched_at)
                    if level > worst:
                        victim, worst = call, level
            if victim is not None:
                victim.preempt_requested = True
                victim.level = worst
                self.preemptions += 1
                self._abort(victim)
        self._schedule_preemption_check()

    # ---------------------------------------------------------------------- inspection
    def queued(self) -> int:
        queued = len(self.policy)
        for replica in self.replicas:  # asked once per call: no generator
            queued += replica.parked.live
        return queued
