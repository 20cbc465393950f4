"""ATLAS (Autellix, for DAG or multi-threaded programs): a call's rank is 0 at a root, else
`max over parents (rank(parent) + service(parent))`: the attained service along its
critical path. Discretised into the MLFQ queues (`mlfq.py`). A proxy call may be queued
while a declared parent still runs; its rank grows when that parent finishes, so the head
is re-ranked before it is taken (`ranks_grow_while_queued`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mlfq import LeveledPolicy

if TYPE_CHECKING:
    from ..program import CallNode


class ATLASPolicy(LeveledPolicy):
    name = "atlas"
    ranks_grow_while_queued = True

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
