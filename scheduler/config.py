"""Scheduler knobs. One section of progserve's settings model (`settings.scheduler`).

Every field has a documented default; the README's configuration table lists them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PolicyName = Literal["fcfs", "mlfq", "plas", "atlas", "dlpm"]
BalanceName = Literal["round_robin", "least_loaded", "affinity"]


class SchedulerConfig(BaseModel):
    policy: PolicyName = Field("atlas", description="call ordering policy")
    # MLFQ discretisation (Autellix): K queues, queue i holds priorities below
    # first_bound * growth**i (seconds of attained service).
    mlfq_queues: int = Field(8, ge=1, le=64)
    mlfq_first_bound: float = Field(0.25, gt=0)
    mlfq_growth: float = Field(2.0, gt=1)
    mlfq_quantum: float = Field(0.5, gt=0, description="service (s) before a running call is demoted")
    starvation_beta: float = Field(4.0, gt=0, description="promote when wait/service >= beta")
    # DLPM
    dlpm_quantum_tokens: int = Field(4096, gt=0, description="deficit added per tenant per round")
    # Dispatch budget per replica: keeps the engine's own queue short so our order decides.
    max_inflight_requests: int = Field(32, ge=1)
    max_inflight_tokens: int = Field(65536, ge=1)
    # Abort-and-resume preemption for engines without priority support.
    preempt_without_priority: bool = False
    # KV retention across tool gaps.
    retain_kv: bool = True
    retention_timeout_s: float = Field(30.0, gt=0)
    # Routing.
    balance: BalanceName = "affinity"
    long_context_tokens: int = Field(2048, ge=0, description="affinity above this prompt length")
    # Limits.
    max_calls_per_program: int = Field(10_000, ge=1)
    max_programs: int = Field(100_000, ge=1)
