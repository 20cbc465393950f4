"""DLPM (locality-fair, deficit longest prefix match): within a tenant, the call whose
prompt has the longest cached prefix runs first; across tenants, deficit round robin over
weighted tokens, so a tenant is admitted only while its deficit counter is positive.

A call's cached prefix comes from the router's per-replica prefix trees (`PrefixHints`),
estimated once, when it is queued. A call is charged its uncached prompt plus its decode
reserve when it is taken, and settled against the tokens it used when it finishes.
Longest prefix first starves short-prefix calls of a busy tenant; anti-starvation
(`scheduler.anti_starvation`, off by default) lets a starving one go first in its tenant.
Engines get no order from it (every call ranks 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ready_queue import ReadyHeap
from .anti_starvation import NOT_WATCHED, PROMOTED, anti_starvation_for

if TYPE_CHECKING:
    from ..config import SchedulerConfig
    from ..program import CallNode
    from .protocol import PrefixHints


class DLPMPolicy:
    name = "dlpm"
    levels = 1
    wants_prefix_hint = True

    def __init__(self, config: SchedulerConfig, hints: PrefixHints | None = None) -> None:
        self.config = config
        self._hint = hints.best_match if hints is not None else (lambda call: 0)
        self.quantum_tokens = config.dlpm_quantum_tokens
        self.tenant_heaps: dict[str, ReadyHeap] = {}
        self.deficit: dict[str, float] = {}
        self.rotation: list[str] = []
        self.cursor = 0
        self._starvation = anti_starvation_for(config, self._in_queue, default=False)

    def __len__(self) -> int:
        return sum(len(heap) for heap in self.tenant_heaps.values())

    @property
    def promotions(self) -> int:
        return self._starvation.promotions if self._starvation is not None else 0

    def key(self, call: CallNode) -> tuple[float, ...]:
        # `priority` is minus the cached prefix estimated at push: longest first.
        if self._starvation is None:
            return (call.priority, call.seq)
        return (0 if call.promote_at == PROMOTED else 1, call.priority, call.seq)

    def push(self, call: CallNode, now: float) -> None:
        hint = self._hint(call)
        call.priority = float(-hint)
        call.level = 0
        call.promote_at = NOT_WATCHED
        if self._starvation is not None:
            self._starvation.admit(call, now)
        self._heap(call.program.tenant).push(call, self.key(call))

    def requeue(self, call: CallNode, now: float) -> None:
        self._heap(call.program.tenant).push(call, call.key)
        self.deficit[call.program.tenant] += self._charge(call)
        if self._starvation is not None and call.promote_at == NOT_WATCHED:
            if self._starvation.admit(call, now):
                call.heap.push(call, self.key(call))  # type: ignore[union-attr]

    def pop(self, now: float) -> CallNode | None:
        self._promote_starving(now)
        return self._next_by_deficit(take=True)

    def peek(self, now: float) -> CallNode | None:
        """The call `pop` would take (the rotation moves on as `pop` would move it; only
        taking a call charges its tenant)."""
        self._promote_starving(now)
        return self._next_by_deficit(take=False)

    def remove(self, call: CallNode) -> None:
        if call.heap is not None:
            call.heap.remove(call)

    def rekey(self, call: CallNode, now: float) -> None:
        """Urgency does not change the order."""

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """Settle the estimate charged at dispatch against the tokens actually used."""
        tenant = call.program.tenant
        if tenant in self.deficit and call.key:
            actual = max(call.prompt_tokens - call.cached_tokens, 0) + call.completion_tokens
            self.deficit[tenant] += self._charge(call) - actual

    def engine_rank(self, call: CallNode) -> int:
        return 0

    def level_after_running(self, call: CallNode, ran: float) -> int:
        return 0

    def depth_by_level(self) -> dict[int, int]:
        return {0: len(self)}

    # --- internals ---------------------------------------------------------------------
    def _heap(self, tenant: str) -> ReadyHeap:
        heap = self.tenant_heaps.get(tenant)
        if heap is None:
            heap = self.tenant_heaps[tenant] = ReadyHeap(f"dlpm:{tenant}")
            self.deficit[tenant] = 0.0
            self.rotation.append(tenant)
        return heap

    def _charge(self, call: CallNode) -> float:
        hint = -call.priority if call.key else 0
        return max(call.prompt_len - hint, 0) + min(
            self.config.decode_reserve_tokens, call.budget_tokens
        )

    def _next_by_deficit(self, *, take: bool) -> CallNode | None:
        """Deficit round robin: the cursor's tenant is served while its deficit is
        positive; when no tenant with calls has any left, each gets a quantum more."""
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
                    if not take:
                        return heap.peek()
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

    def _promote_starving(self, now: float) -> None:
        if self._starvation is not None:
            for call in self._starvation.starving(now):
                call.heap.push(call, self.key(call))  # type: ignore[union-attr]

    def _in_queue(self, call: CallNode) -> bool:
        heap = call.heap
        return heap is not None and heap is self.tenant_heaps.get(call.program.tenant)
