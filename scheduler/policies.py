"""Call-ordering policies. Each is a small object that owns the ready queue(s).

- `fcfs`: call arrival order (what SGLang and vLLM do).
- `mlfq`: plain multi-level feedback queue. Every call starts in the top queue and is
  ranked only by its *own* attained service (non-zero only after a preemption); no
  program history.
- `plas` (Autellix): rank = the attained service of the program's completed calls.
- `atlas` (Autellix): rank = 0 at a root, else max over parents of
  (rank(parent) + service(parent)): the service along the critical path.
- `dlpm`: longest prefix match first, admitted by per-tenant deficit round robin.

The Autellix policies are discretised into K queues with geometric bounds: queue i holds
ranks below `first_bound * growth**i`. Within a queue, urgent calls (latency-critical for
the client, or upstream of one: `CallNode.urgent`) go first, then FCFS by program arrival
(so that a queue's programs finish in order instead of sharing). `fcfs` stays pure call
arrival order: it is the baseline of what engines do today. A call whose wait is
large against its service is promoted to the top queue:
`(W_prog + W_call) / (T_prog + T_call) >= beta`. A running call is demoted once it runs
past its queue's quantum (`quantum * growth**level`), which matters to abort-and-resume
preemption.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import SchedulerConfig
from .ready_queue import ReadyHeap

if TYPE_CHECKING:
    from .program import CallNode

# Engine priorities: lower runs first. A level dominates any order value within a level.
LEVEL_STRIDE = 1e9


class Policy:
    """Base: one ready heap, FCFS by call arrival. Subclasses set `rank`/`key`."""

    name = "base"
    uses_levels = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.heap = ReadyHeap(self.name)
        self.promotions = 0

    # --- queue operations (the dispatcher's view) ---------------------------------------
    def __len__(self) -> int:
        return len(self.heap)

    def push(self, call: CallNode, now: float) -> None:
        call.priority = self.rank(call)
        call.level = 0
        self.heap.push(call, (call.seq,))

    def pop(self, now: float) -> CallNode | None:
        return self.heap.pop()

    def remove(self, call: CallNode) -> None:
        if call.heap is not None:
            call.heap.remove(call)

    def requeue(self, call: CallNode, now: float) -> None:
        """Put back a call that was popped but could not be placed, keeping its key."""
        self.heap.push(call, call.key)

    # --- history hooks ------------------------------------------------------------------
    def rank(self, call: CallNode) -> float:
        return 0.0

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """The program's history changed: re-rank its queued calls where that matters."""

    def engine_priority(self, call: CallNode) -> float:
        """The priority passed to engines that honour one (lower first)."""
        return 0.0

    def level_after_running(self, call: CallNode, ran: float) -> int:
        return call.level

    def depth_by_level(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for call in self.heap.live_calls():
            depth[call.level] = depth.get(call.level, 0) + 1
        return depth


class FCFSPolicy(Policy):
    name = "fcfs"


class LeveledPolicy(Policy):
    """MLFQ discretisation shared by `mlfq`, `plas` and `atlas`."""

    uses_levels = True
    # Anti-starvation uses the program's history; plain MLFQ has none.
    program_history = True

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.queues = config.mlfq_queues
        self.first_bound = config.mlfq_first_bound
        self.log_growth = math.log(config.mlfq_growth)
        self.beta = config.starvation_beta
        self._promote: list[tuple[float, int, int, CallNode]] = []

    def level_of(self, rank: float) -> int:
        if rank < self.first_bound:
            return 0
        level = int(math.log(rank / self.first_bound) / self.log_growth) + 1
        return level if level < self.queues else self.queues - 1

    def quantum(self, level: int) -> float:
        return self.config.mlfq_quantum * self.config.mlfq_growth**level

    def order(self, call: CallNode) -> int:
        """FCFS within a queue, by program arrival."""
        return call.program.seq

    def key(self, call: CallNode, level: int) -> tuple[int, int, int, int]:
        return (level, 0 if call.urgent else 1, self.order(call), call.seq)

    def push(self, call: CallNode, now: float) -> None:
        rank = self.rank(call)
        call.priority = rank
        level = self.level_of(rank)
        call.promote_at = math.inf
        if level > 0:
            due = self._promotion_time(call, now)
            if due <= now:
                level = 0
                self.promotions += 1
            else:
                call.promote_at = due
                heapq.heappush(self._promote, (due, call.seq, call.version + 1, call))
        call.level = level
        self.heap.push(call, self.key(call, level))

    def _promotion_time(self, call: CallNode, now: float) -> float:
        """When `(W_prog + W_call) / (T_prog + T_call)` reaches beta; W_call grows as the
        call waits (`call.wait` holds its waits before an earlier preemption). W_prog is
        the program's wall-clock waiting time (not a sum over its parallel calls, which
        would promote a program five times as fast for waiting on five branches)."""
        call_wait = call.wait + (now - call.queued_at)
        if self.program_history:
            history = call.program.history
            wait, service = history.wait_wall_s + call_wait, history.service + call.service
        else:
            wait, service = call_wait, call.service
        if service <= 0:
            return now
        return now + self.beta * service - wait

    def pop(self, now: float) -> CallNode | None:
        promote = self._promote
        while promote and promote[0][0] <= now:
            due, _, version, call = heapq.heappop(promote)
            # Valid only if the call is still queued under the key pushed with this entry.
            if call.heap is self.heap and call.version == version and call.level > 0:
                call.level = 0
                call.promote_at = math.inf
                self.promotions += 1
                self.heap.push(call, self.key(call, 0))
        return self.heap.pop()

    def on_call_finished(self, call: CallNode, now: float) -> None:
        for queued in list(call.program.queued):
            if queued.heap is self.heap:
                self.push(queued, now)

    def engine_priority(self, call: CallNode) -> float:
        urgency = 0.0 if call.urgent else LEVEL_STRIDE / 2
        return call.level * LEVEL_STRIDE + urgency + self.order(call)

    def level_after_running(self, call: CallNode, ran: float) -> int:
        level = call.level
        budget = self.quantum(level)
        while ran > budget and level < self.queues - 1:
            ran -= budget
            level += 1
            budget = self.quantum(level)
        return level


class MLFQPolicy(LeveledPolicy):
    """Plain MLFQ: a call's own service only; FCFS by call arrival within a queue."""

    name = "mlfq"
    program_history = False

    def rank(self, call: CallNode) -> float:
        return call.service

    def order(self, call: CallNode) -> int:
        return call.seq

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """No program history: other calls' ranks never change."""


class PLASPolicy(LeveledPolicy):
    """Program-level attained service: the service of the program's completed calls."""

    name = "plas"

    def rank(self, call: CallNode) -> float:
        return call.program.history.service + call.service


class ATLASPolicy(LeveledPolicy):
    """Attained service along the critical path: max over parents of p(parent) +
    service(parent); roots start at 0."""

    name = "atlas"

    def rank(self, call: CallNode) -> float:
        best = 0.0
        calls = call.program.calls
        for parent_id in call.parents:
            parent = calls.get(parent_id)
            if parent is not None:
                value = parent.priority + parent.service
                if value > best:
                    best = value
        return best + call.service


class DLPMPolicy(Policy):
    """Deficit longest-prefix-match: within a tenant, the call whose prompt has the longest
    cached prefix first; across tenants, deficit round robin over weighted tokens, so a
    tenant is admitted only while its deficit counter is positive."""

    name = "dlpm"

    def __init__(
        self, config: SchedulerConfig, prefix_hint: Callable[[CallNode], int] | None = None
    ) -> None:
        super().__init__(config)
        self.prefix_hint = prefix_hint or (lambda call: 0)
        self.quantum_tokens = config.dlpm_quantum_tokens
        self.tenant_heaps: dict[str, ReadyHeap] = {}
        self.deficit: dict[str, float] = {}
        self.rotation: list[str] = []
        self.cursor = 0
        self._queued = 0

    def __len__(self) -> int:
        return sum(len(heap) for heap in self.tenant_heaps.values())

    def _heap(self, tenant: str) -> ReadyHeap:
        heap = self.tenant_heaps.get(tenant)
        if heap is None:
            heap = self.tenant_heaps[tenant] = ReadyHeap(f"dlpm:{tenant}")
            self.deficit[tenant] = 0.0
            self.rotation.append(tenant)
        return heap

    def push(self, call: CallNode, now: float) -> None:
        hint = self.prefix_hint(call)
        call.priority = float(-hint)
        call.level = 0
        self._heap(call.program.tenant).push(call, (-hint, call.seq))

    def requeue(self, call: CallNode, now: float) -> None:
        self._heap(call.program.tenant).push(call, call.key)
        self.deficit[call.program.tenant] += self._charge(call)

    def _charge(self, call: CallNode) -> float:
        hint = -call.key[0] if call.key else 0
        return max(call.prompt_len - hint, 0) + min(
            self.config.decode_reserve_tokens, call.budget_tokens
        )

    def pop(self, now: float) -> CallNode | None:
        rotation = self.rotation
        if not rotation:
            return None
        for _round in range(2 + len(rotation)):
            for _ in range(len(rotation)):
                tenant = rotation[self.cursor % len(rotation)]
                heap = self.tenant_heaps[tenant]
                if not heap:
                    self.deficit[tenant] = 0.0  # DRR: an idle tenant banks nothing
                elif self.deficit[tenant] > 0:
                    call = heap.pop()
                    assert call is not None
                    self.deficit[tenant] -= self._charge(call)
                    return call
                self.cursor += 1
            active = [t for t in rotation if self.tenant_heaps[t]]
            if not active:
                return None
            for tenant in active:
                self.deficit[tenant] += self.quantum_tokens
        return None

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """Settle the estimate charged at dispatch against the tokens actually used."""
        tenant = call.program.tenant
        if tenant in self.deficit and call.key:
            actual = max(call.prompt_tokens - call.cached_tokens, 0) + call.completion_tokens
            self.deficit[tenant] += self._charge(call) - actual

    def depth_by_level(self) -> dict[int, int]:
        return {0: len(self)}


POLICIES: dict[str, type[Policy]] = {
    "fcfs": FCFSPolicy,
    "mlfq": MLFQPolicy,
    "plas": PLASPolicy,
    "atlas": ATLASPolicy,
    "dlpm": DLPMPolicy,
}


def make_policy(
    config: SchedulerConfig, prefix_hint: Callable[[CallNode], int] | None = None
) -> Policy:
    cls = POLICIES[config.policy]
    if cls is DLPMPolicy:
        return DLPMPolicy(config, prefix_hint)
    return cls(config)
