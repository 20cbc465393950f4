"""Scheduler knobs. One section of progserve's settings model (`settings.scheduler`).

Every field has a documented default; the README's configuration table lists them.

Service unit. Policies rank calls by *attained service*. With `service_metric =
"weighted_tokens"` (the default) a call's service is its estimated single-request engine
time, `uncached_prompt_tokens * prefill_token_cost_s + completion_tokens *
decode_token_cost_s`, in seconds: it is deterministic and does not grow when the engine is
busy, so a program is not demoted for the load other programs cause. With
`"engine_time"` it is the wall time from dispatch to the last token (Autellix's choice).
Either way the MLFQ bounds below are in seconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from .policies.registry import DEFAULT_POLICY, POLICY_NAMES

PolicyName = Literal[POLICY_NAMES]  # type: ignore[valid-type]
BalanceName = Literal["round_robin", "least_loaded", "affinity", "cache_aware"]
ServiceMetric = Literal["weighted_tokens", "engine_time"]


class SchedulerConfig(BaseModel):
    policy: PolicyName = Field(DEFAULT_POLICY, description="call ordering policy")
    # Attained service (see the module docstring).
    service_metric: ServiceMetric = Field(
        "weighted_tokens",
        description="attained service: weighted_tokens (deterministic) or engine_time",
    )
    prefill_token_cost_s: float = Field(
        1e-4, ge=0, description="service per uncached prompt token (~10k tok/s prefill)"
    )
    decode_token_cost_s: float = Field(
        0.012, ge=0, description="service per generated token (~one decode step, 8B on H100)"
    )
    # MLFQ discretisation (Autellix): K queues, queue i holds priorities below
    # first_bound * growth**i (seconds of attained service). The defaults put the last
    # queue (FCFS by program arrival) at 32 s: a chat conversation (~24 s of service) stays
    # above it, a tree search (~130 s) runs its first quarter above it, then in order.
    mlfq_queues: int = Field(8, ge=1, le=64, description="K, the number of MLFQ queues")
    mlfq_first_bound: float = Field(0.5, gt=0, description="rank (service s) bound of queue 0")
    mlfq_growth: float = Field(2.0, gt=1, description="queue i holds ranks below first_bound * growth**i")
    mlfq_quantum: float = Field(
        0.5,
        gt=0,
        description="service (s) a call may run in queue 0 before it is demoted; queue i "
        "gets mlfq_quantum * mlfq_growth**i",
    )
    starvation_beta: float = Field(
        16.0, gt=0, description="promote to the top queue when wait/service >= beta"
    )
    anti_starvation: bool | None = Field(
        None, description="promote starving calls (starvation_beta); default: on for "
        "mlfq, plas and atlas, off for fcfs and dlpm"
    )
    fork_prefill: bool | None = Field(
        None, description="parallel calls of one program on one prompt, placed together, "
        "share its prefill (a prefill-only request first; fork_prefill.py); default: on "
        "for the program-aware policies (plas, atlas), off for the others"
    )
    # DLPM
    dlpm_quantum_tokens: int = Field(4096, gt=0, description="deficit added per tenant per round")
    # Dispatch budget per replica: keeps the engine's own queue short so our order decides.
    max_inflight_requests: int = Field(32, ge=1, description="per replica: requests sent and not finished")
    max_inflight_tokens: int = Field(
        65536, ge=1, description="per replica: prompt + reserved decode tokens in flight"
    )
    decode_reserve_tokens: int = Field(
        256, ge=0, description="budget tokens counted per call for its output (capped by max)"
    )
    pass_priority: bool = Field(
        True,
        description="pass priorities to engines that honour them (admission order; note that "
        "an engine may also evict its cache by them)",
    )
    # Abort-and-resume preemption for engines without priority support.
    preempt_without_priority: bool = Field(
        False, description="abort-and-resume demoted calls on engines without priority"
    )
    # KV retention across tool gaps and between a program's calls.
    retain_kv: bool = Field(
        True, description="program-aware KV retention: an ended program's KV goes first; "
        "idle programs hold pins within retention_budget_fraction"
    )
    retention_timeout_s: float = Field(
        30.0, gt=0, description="unpin an idle program after this; it stops counting toward "
        "KV admission then too"
    )
    retention_budget_fraction: float = Field(
        0.0, ge=0, le=1,
        description="share of a replica's KV capacity that pins of idle programs may "
        "cover (0: no pins)",
    )
    kv_admission: bool = Field(
        False, description="KV-aware program admission: hold new programs while the admitted "
        "programs' KV footprint fills kv_admission_fill of the replicas' KV capacity (for "
        "tool-calling loops under memory pressure; it costs latency on tree searches)"
    )
    kv_admission_fill: float = Field(
        0.9, gt=0, description="share of the replicas' KV capacity the admitted programs' "
        "footprint may reach before new programs wait"
    )
    kv_admission_max_wait_s: float = Field(
        60.0, gt=0, description="a program waits for KV admission at most this long"
    )
    program_idle_timeout_s: float = Field(
        600.0, gt=0, description="end a program with nothing in flight for this long"
    )
    # Routing.
    balance: BalanceName = Field(
        "affinity", description="routing: affinity, cache_aware (SGLang router's rule), "
        "least_loaded or round_robin"
    )
    long_context_tokens: int = Field(2048, ge=0, description="affinity above this prompt length")
    cache_match_fraction: float = Field(
        0.5, ge=0, le=1, description="short calls go where this share of the prompt is cached"
    )
    balance_abs_threshold: int | None = Field(
        None, ge=0,
        description="backlog imbalance (requests in flight or waiting) above which load "
                    "beats cache; default: one in-flight budget (max_inflight_requests)",
    )
    router_tree_tokens: int = Field(
        400_000, ge=1, description="tokens each replica's approximate prefix tree remembers"
    )
    router_token_stride: int = Field(
        16, ge=1, description="the router's prefix trees key token prompts by every n-th token"
    )
    chars_per_token: int = Field(4, ge=1, description="text prompts: chars per pseudo-token")
    # Replica failures (scheduler/replica_health.py).
    engine_retries: int = Field(
        2, ge=0, description="times a call is resumed on another replica after its replica "
        "fails (unreachable, or the stream broke)"
    )
    health_probe_interval_s: float = Field(
        1.0, gt=0, description="how often a down replica is probed to rejoin"
    )
    replica_down_grace_s: float = Field(
        10.0, gt=0, description="every replica down this long: queued calls fail"
    )
    # Limits.
    max_calls_per_program: int = Field(10_000, ge=1, description="larger graphs are rejected")
    max_programs: int = Field(100_000, ge=1, description="open programs before 429")
    max_queued_calls: int = Field(1_000_000, ge=1, description="queued calls before 429")
    keep_finished_programs: int = Field(
        10_000, ge=0, description="ended programs kept in memory for state queries"
    )
    keep_finished_calls: int = Field(
        5_000, ge=0,
        description="and at most this many calls in them (a kept call costs about 2 KB "
                    "as it ran, 0.5 KB packed: the bound on their memory, whatever the "
                    "programs' sizes)",
    )
    keep_finished_unpacked: int = Field(
        256, ge=0,
        description="the newest ended programs kept as they are; older kept ones are "
                    "packed (about 300 bytes a call) and unpacked when read or reopened",
    )


class CacheConfig(BaseModel):
    """Who shares cached prefixes (`settings.cache`; `scheduler/cache_salt.py`)."""

    share_across_tenants: bool = Field(
        False,
        description="let every tenant's requests hit every other tenant's cached prefixes "
        "(single-owner deployments only: a cache hit tells one tenant what another sent); "
        "false: each tenant has its own cache namespace, so a prompt shared by several "
        "tenants (a common system prompt) is prefilled once per tenant",
    )
    salt_secret: SecretStr = Field(
        SecretStr(""),
        description="mixed into each tenant's cache salt; set it (the same on every progserve "
        "in front of the same engines) when others can reach those engines directly and "
        "could otherwise compute a tenant's salt",
    )
