"""ATLAS (Autellix, for DAG or multi-threaded programs): a call's rank is 0 at a root, else
`max over parents (rank(parent) + service(parent))`: the attained service along its
critical path. Discretised into the MLFQ queues (`mlfq.py`). A proxy call may be queued
while a declared parent still runs; its rank grows when that parent finishes, so such a
head is re-ranked before it is taken (`ranks_grow_while_queued`); a call whose parents had
all ended when it was ranked is `rank_settled` and skips that."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..program import CallStatus
from .mlfq import LeveledPolicy

if TYPE_CHECKING:
    from ..program import CallNode


class ATLASPolicy(LeveledPolicy):
    name = "atlas"
    ranks_grow_while_queued = True

    def rank(self, call: CallNode) -> float:
        best = 0.0
        settled = True
        calls = call.program.calls
        for parent_id in call.parents:
            parent = calls.get(parent_id)
            if parent is not None:
                if parent.status < CallStatus.FINISHED:
                    settled = False
                value = parent.priority + parent.service
                if value > best:
                    best = value
        call.rank_settled = settled
        return best + call.service
