"""Where a ready LLM call waits for a replica: held with its program for KV admission
(`kv_admission.py`) if the admitted programs' contexts fill the KV, then in the policy's
queue until the dispatcher places it (`dispatcher.py`). The call's executor awaits
`call.waiter`, which the dispatcher resolves with the replica."""

from __future__ import annotations

from collections.abc import Iterable

from .config import SchedulerConfig
from .dispatcher import Dispatcher
from .events import EventBus, EventKind
from .kv_admission import KvAdmission
from .loop_context import LoopContext
from .policies import Policy
from .program import CallNode, CallStatus, Program
from .replica import Replica
from .router import Router


class CallQueue:
    def __init__(
        self,
        config: SchedulerConfig,
        loop: LoopContext,
        bus: EventBus,
        replicas: list[Replica],
        policy: Policy,
        router: Router,
    ) -> None:
        self.config = config
        self.loop = loop
        self.bus = bus
        self.dispatcher = Dispatcher(
            config, replicas, policy, router, self._on_dispatch, self._on_queued
        )
        self.admission = KvAdmission(
            config, replicas,
            lambda call, since: self.dispatcher.enqueue(call, since, announce=False),
        )
        self.last_dispatch_at = -1.0  # loop time of the latest dispatch (stall watch)

    def size(self, call: CallNode) -> None:
        """The call's share of a replica's in-flight token budget: its prompt plus the
        output it may still write (capped at `decode_reserve_tokens`)."""
        request = call.request
        assert request is not None
        if request.input_ids is not None:
            prompt_len = len(request.input_ids)
        else:
            prompt_len = len(request.text or "") // self.config.chars_per_token + 1
        call.prompt_len = prompt_len
        call.budget_tokens = prompt_len + min(
            request.sampling.max_new_tokens, self.config.decode_reserve_tokens
        )

    def enqueue(self, call: CallNode) -> None:
        loop = self.loop.loop
        call.waiter = None
        call.replica = -1
        now = loop.time()
        if self.admission.admit(call, now):
            self.dispatcher.enqueue(call, now)
        else:
            self._on_queued(call)  # it waits from now, for admission first
        if call.status == CallStatus.QUEUED:  # not placed at once: its executor waits
            call.waiter = loop.create_future()

    def remove(self, call: CallNode) -> None:
        """Take a queued call out of wherever it waits (a queue, parked, or held)."""
        self.dispatcher.remove(call)
        self.admission.discard(call)

    def waiting_since(self, programs: Iterable[Program]) -> float | None:
        """Since when the longest-waiting of `programs` has had calls in the policy's
        queue (None: no call waits there). A scan: for health checks, not the hot path."""
        starts = [p.waiting_since for p in programs if p.queued]
        return min(starts) if starts else None

    def _on_queued(self, call: CallNode) -> None:
        if EventKind.CALL_QUEUED in self.bus.wanted:
            self.bus.call_event(EventKind.CALL_QUEUED, call)

    def _on_dispatch(self, call: CallNode, replica: Replica, now: float) -> None:
        self.last_dispatch_at = now
        wait = now - call.queued_at
        call.wait += wait
        call.program.history.wait_s += wait
        call.program.running.add(call)
        if EventKind.CALL_DISPATCHED in self.bus.wanted:
            self.bus.call_event(EventKind.CALL_DISPATCHED, call, queue_wait_s=wait)
