"""Read-only wire models of the scheduler's state: what `program_state`, `list_programs`
and `stats` return (the native API serves them as JSON), and the functions that build
them from the live program model. Built on request, never on the hot path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from .program import CALL_STATUS_NAMES, PROGRAM_STATUS_NAMES

# A program's state is part of the native API's wire schema (what a remote client reads).
from .spec import (
    CallState,
    CallStatusName,
    ProgramHistoryState,
    ProgramState,
    ProgramStatusName,
)

if TYPE_CHECKING:
    from .packed_program import PackedProgram
    from .program import CallNode, Program
    from .replica import Replica

__all__ = [  # the state models live in the wire schema; views re-exports them
    "CallState",
    "CallStatusName",
    "ProgramHistoryState",
    "ProgramState",
    "ProgramStatusName",
    "ProgramSummary",
    "ReplicaStats",
    "SchedulerStats",
]


class ProgramSummary(BaseModel):
    id: str
    tenant: str
    status: ProgramStatusName
    arrival: float
    ended_at: float | None = None
    calls: int = 0
    calls_finished: int = 0
    service: float = 0.0


class ReplicaStats(BaseModel):
    replica: int
    engine: str
    inflight_requests: int
    inflight_tokens: int
    dispatched: int
    pending_affinity: int = Field(0, description="calls waiting for this replica (affinity)")


class SchedulerStats(BaseModel):
    policy: str
    balance: str
    queued: int
    queue_depth_by_level: dict[int, int] = Field(default_factory=dict)
    running: int
    replicas: list[ReplicaStats] = Field(default_factory=list)
    programs_open: int
    programs_total: int
    programs_by_status: dict[str, int] = Field(default_factory=dict)
    calls_dispatched: int = 0
    calls_finished: int = 0
    calls_failed: int = 0
    preemptions: int = 0
    promotions: int = 0
    retained_programs: int = 0
    admission_held_programs: int = Field(
        0, description="programs waiting for KV admission (scheduler/kv_admission.py)"
    )
    admission_kv_demand_tokens: int = Field(
        0, description="KV footprint of the admitted programs, in tokens"
    )


# ------------------------------------------------------------------------------ builders


def program_state(program: Program) -> ProgramState:
    history = program.history
    return ProgramState(
        id=program.id,
        tenant=program.tenant,
        status=PROGRAM_STATUS_NAMES[program.status],  # type: ignore[arg-type]
        arrival=program.arrival,
        ended_at=program.ended_at,
        metadata=program.metadata,
        calls=[call_state(call) for call in program.calls.values()],
        variables={name: slot.value for name, slot in program.variables.items()},
        history=ProgramHistoryState(
            service=history.service,
            engine_time_s=history.engine_time_s,
            weighted_tokens=history.weighted_tokens,
            wait_s=history.wait_s,
            calls_finished=history.calls_finished,
            engines_used=sorted(history.engines_used),
            active_threads=sorted(history.active_threads),
        ),
        error=program.error,
    )


def call_state(call: CallNode) -> CallState:
    spec = call.spec
    return CallState(
        id=call.id,
        kind=call.kind,  # type: ignore[arg-type]
        status=CALL_STATUS_NAMES[call.status],  # type: ignore[arg-type]
        thread_id=call.thread_id,
        parents=list(call.parents),
        output=call.output,
        tool=spec.tool if spec is not None else None,
        replica=call.replica if call.replica >= 0 else None,
        priority=call.priority,
        queue_level=call.level,
        created_at=call.created_at,
        queued_at=_known(call.queued_at),
        dispatched_at=_known(call.dispatched_at),
        first_token_at=_known(call.first_token_at),
        finished_at=_known(call.finished_at),
        queue_wait_s=call.wait,
        prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens,
        cached_tokens=call.cached_tokens,
        service=call.service,
        preemptions=call.preemptions,
        error=call.error,
    )


def program_summary(program: Program | PackedProgram) -> ProgramSummary:
    history = program.history  # a packed program builds it on each read
    return ProgramSummary(
        id=program.id,
        tenant=program.tenant,
        status=PROGRAM_STATUS_NAMES[program.status],  # type: ignore[arg-type]
        arrival=program.arrival,
        ended_at=program.ended_at,
        calls=program.call_count,
        calls_finished=history.calls_finished,
        service=history.service,
    )


def replica_stats(replica: Replica) -> ReplicaStats:
    return ReplicaStats(
        replica=replica.index,
        engine=getattr(replica.engine, "name", type(replica.engine).__name__),
        inflight_requests=replica.inflight_requests,
        inflight_tokens=replica.inflight_tokens,
        dispatched=replica.dispatched,
        pending_affinity=len(replica.parked),
    )


def _known(t: float) -> float | None:
    return t if t >= 0 else None
