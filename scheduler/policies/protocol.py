"""The contract between the scheduling mechanism and a call-ordering policy.

The dispatcher, the scheduler and the metrics use a policy only through `Policy`; they
never read its queues. A policy owns its ready queue(s) and decides the order; the
mechanism decides when to ask (a call is ready, a replica has room, a call finished).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..program import CallNode


@runtime_checkable
class Policy(Protocol):
    """A call-ordering policy (`scheduler/policies/registry.py` lists them)."""

    name: str
    # Queues the policy ranks calls into: the MLFQ discretisation's K, 1 for the others.
    # Metrics label queue depths by level; abort-and-resume preemption needs levels > 1.
    levels: int
    # True: it ranks by the cached prefix a call would find (`PrefixHints.best_match`), so
    # the router must keep its per-replica prefix trees even with one replica.
    wants_prefix_hint: bool

    def __len__(self) -> int:
        """Calls in the policy's queue(s)."""
        ...

    @property
    def promotions(self) -> int:
        """Calls promoted by anti-starvation so far."""
        ...

    def push(self, call: CallNode, now: float) -> None:
        """Queue a ready call (`call.queued_at` is set): rank it and key it."""
        ...

    def pop(self, now: float) -> CallNode | None:
        """Take the call that runs next, or None."""
        ...

    def peek(self, now: float) -> CallNode | None:
        """The call `pop` would return, left in the queue."""
        ...

    def requeue(self, call: CallNode, now: float) -> None:
        """Put back a popped call that could not be placed, keeping its place."""
        ...

    def remove(self, call: CallNode) -> None:
        """Take a queued call out (cancellation)."""
        ...

    def rekey(self, call: CallNode, now: float) -> None:
        """A queued call's ordering inputs changed (it became urgent): re-key it in place.
        A call not in this policy's queue (running, parked for a replica) is left alone."""
        ...

    def on_call_finished(self, call: CallNode, now: float) -> None:
        """A call of the program finished and its history is updated."""
        ...

    def engine_rank(self, call: CallNode) -> int:
        """The call's engine rank (`engine_backend/engine_rank.py`: an int in
        [0, RANK_MAX], lower first), for engines that honour priorities. Calls the policy
        orders get different ranks, in that order."""
        ...

    def level_after_running(self, call: CallNode, ran: float) -> int:
        """The queue a running call is in after `ran` seconds of service (demotion)."""
        ...

    def depth_by_level(self) -> dict[int, int]:
        """Queued calls per level (introspection, not the hot path)."""
        ...


class PrefixHints(Protocol):
    """What a policy that ranks by cached prefix asks of the router."""

    def track_prefixes(self) -> None:
        """Keep the per-replica prefix trees even where routing alone would not."""
        ...

    def best_match(self, call: CallNode) -> int:
        """Tokens of the call's prompt cached on its best replica (an estimate)."""
        ...
