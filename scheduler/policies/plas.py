"""PLAS (Autellix): program-level attained service. A call's rank is the service of its
program's completed calls (plus its own, after a preemption): less service runs first.
Discretised into the MLFQ queues (`mlfq.py`). The rank grows while the program's other
calls finish, so the head is re-ranked before it is taken (`ranks_grow_while_queued`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mlfq import LeveledPolicy

if TYPE_CHECKING:
    from ..program import CallNode


class PLASPolicy(LeveledPolicy):
    name = "plas"
    ranks_grow_while_queued = True

    def rank(self, call: CallNode) -> float:
        return call.program.history.service + call.service
