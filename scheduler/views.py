"""Read-only wire models of the scheduler's state: what `program_state`, `list_programs`
and `stats` return (the native API serves them as JSON). Built on request, never on the
hot path."""

from __future__ import annotations

from pydantic import BaseModel, Field

# A program's state is part of the native API's wire schema (what a remote client reads).
from .spec import (
    CallState,
    CallStatusName,
    ProgramHistoryState,
    ProgramState,
    ProgramStatusName,
)

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
