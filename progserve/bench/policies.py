"""Policy benchmark (default `progserve bench`): every policy on the same agent trace, sim engine, virtual time.

For each policy it finds the highest Poisson arrival rate whose p95 program token latency
meets the SLO (bisection over the rate), then runs every policy at one fixed load (fcfs's
own `max_rate_at_slo`, the knee) and reports what users feel there, per program type.
Every run drives the real `Scheduler` (dispatcher, policy, router, retention) against
`SimEngine` replicas; all policies share the engine, cache, in-flight budget and router.
See docs/architecture.md ("Scheduler") for how to read the JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import multiprocessing
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_backend.sim import SimConfig
from engine_backend.sim.cost_model import load_hardware_profile
from scheduler.config import SchedulerConfig
from scheduler.policies import (
    BASELINE_POLICY,
    DEFAULT_POLICY,
    POLICY_NAMES,
    PROGRAM_AWARE_POLICIES,
)

from .driver import TENANCIES, BenchSetup, ProgramResult, run_trace
from .metrics import summarize_run
from .workloads import (
    DEFAULT_MIX,
    PROGRAM_TYPES,
    SWE_KV_CAPACITY,
    WORKLOADS,
    Mix,
    generate_trace,
    parse_mix,
)


# ---------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("policy benchmark (default when no bench kind is given)")
    g.add_argument("--workload", choices=WORKLOADS, default="mixed")
    g.add_argument("--mix", type=mix_argument, default=None, metavar="TYPE=WEIGHT,...",
                   help="program types of the mixed workload and their weights, e.g. "
                        "chat=2,bfcl=1,lats=1,mapreduce=1 (default: chat, bfcl, lats "
                        "equally)")
    g.add_argument("--programs", type=int, default=2000, help="programs per run (>= 2000 "
                   "for steady state; fewer for a smoke run)")
    g.add_argument("--replicas", type=int, default=4)
    g.add_argument("--policies", default=",".join(POLICY_NAMES),
                   help="comma-separated: " + ",".join((*POLICY_NAMES, ENGINE)) + f" ({ENGINE}: "
                        "the engine alone, no progserve queue, budget, retention or "
                        "admission, SGLang-router-style cache-aware routing)")
    g.add_argument("--ablation", choices=("auto", "on", "off"), default="auto",
                   help="the mechanism ablation against the engine alone (engine; + queue and "
                        "budget; + program-aware policy; + KV retention; + KV admission; + "
                        "program-affine routing); auto: on when --policies has engine")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", type=Path, default=None, help="write the results here")
    g.add_argument("--plot", type=Path, default=None, help="latency vs rate plot (PNG)")
    g.add_argument("--slo-factor", type=float, default=5.0,
                   help="SLO = this times the unloaded p95 program token latency")
    g.add_argument("--slo", type=float, default=None, help="explicit SLO (s/token)")
    g.add_argument("--warmup", type=float, default=0.1, help="share of programs skipped first")
    g.add_argument("--drain", type=float, default=0.1, help="share of programs skipped last")
    g.add_argument("--workers", type=int, default=2, help="processes running simulations")
    g.add_argument("--bisect-steps", type=int, default=4, help="bisection steps per policy")
    g.add_argument("--unloaded-programs", type=int, default=300,
                   help="programs run one at a time to measure unloaded latency")
    g.add_argument("--rate", type=float, default=None,
                   help="skip the sweep: run every policy at this rate (programs/s)")
    g.add_argument("--max-inflight-requests", type=int, default=None,
                   help="per-replica in-flight budget (requests); same for every policy")
    g.add_argument("--max-inflight-tokens", type=int, default=None)
    g.add_argument("--kv-capacity", type=int, default=None, help="KV tokens per replica")
    g.add_argument("--hardware", type=Path, default=None,
                   help="the sim's hardware profile (`progserve bench calibrate`'s JSON)")
    g.add_argument("--balance", choices=("affinity", "least_loaded", "round_robin"),
                   default=None)
    g.add_argument("--retention", choices=("auto", "on", "off"), default="auto",
                   help="KV-retention ablation (retention vs plain LRU under memory "
                   "pressure); auto: on for bfcl")
    g.add_argument("--retention-kv-capacity", type=int, default=None,
                   help="KV tokens per replica for the retention ablation (memory pressure)")
    g.add_argument("--retention-budget", type=float, default=None,
                   help="share of a replica's KV that retention pins may cover "
                        "(scheduler.retention_budget_fraction)")
    g.add_argument("--kv-admission", choices=("on", "off"), default=None,
                   help="KV-aware program admission in the sweep and at the fixed load "
                        "(scheduler.kv_admission; default: the scheduler's, off); the "
                        "retention ablation's `retention` variant always has it")
    g.add_argument("--tenants", choices=TENANCIES, default="one",
                   help="who the programs belong to: one tenant (default), or a tenant per "
                        "program type (what dlpm's per-tenant fairness divides between); "
                        "the same for every policy")


# Defaults every policy shares. The budget keeps the engines' own queues short (progserve's
# order decides) while leaving them large batches. Priorities are not passed down: the sim
# engine (like SGLang's priority radix eviction) also evicts its cache by request
# priority, and a priority that sticks to cache entries keeps prefixes of *finished*
# high-priority programs over the hot context of running low-priority ones. Measured at
# fcfs's knee (mixed, 2,000 programs, 4 replicas, 3.6 programs/s): plas with priorities
# passed down fell to a 74% cache hit rate (fcfs: 84%) and collapsed; without, 85%.
# With the budget smaller than the engine's batch, the engine's own queue stays short, so
# the order is progserve's either way.
BENCH_SCHEDULER = dict(max_inflight_requests=48, max_inflight_tokens=160_000,
                       keep_finished_programs=0, pass_priority=False)
RETENTION_KV_CAPACITY = 40_000  # first try; the search moves from there
# Per-workload KV capacity per replica when --kv-capacity is not given (else the sim's).
WORKLOAD_KV_CAPACITY = {"swe": SWE_KV_CAPACITY}
# Per-workload in-flight token budget when --max-inflight-tokens is not given. The
# default (160k) was sized for prompts of hundreds to a few thousand tokens; swe calls
# carry 3-28k tokens of context each, and 160k would cap a replica at ~11 calls, well
# below what its KV holds. For swe the budget is the replica's KV: the engine's own
# limit, so the queue orders calls without capping the batch below the engine's.
WORKLOAD_INFLIGHT_TOKENS = {"swe": SWE_KV_CAPACITY}

ENGINE = "engine"
# No in-flight budget: every call goes to its engine the moment its program issues it
# (the engine's own limits, max_running and its KV, decide what runs; its waiting queue
# is FCFS).
UNBOUNDED = 1 << 40
# The SGLang router's cache-aware defaults (sglang_router RouterArgs): cache_threshold
# 0.5, balance_abs_threshold 32 (balance_rel_threshold 1.0001 is in scheduler/router.py).
SGLANG_ROUTER = (("balance", "cache_aware"), ("cache_match_fraction", 0.5),
                 ("balance_abs_threshold", 32))
NO_RETENTION = (("retain_kv", False), ("kv_admission", False))
LRU_ENGINE = (("eviction", "lru"),)


@dataclass(frozen=True)
class Configuration:
    """A bench column that is not a plain policy: a policy plus scheduler and sim
    overrides on top of the shared set-up."""

    policy: str
    scheduler: tuple[tuple[str, Any], ...] = ()
    sim: tuple[tuple[str, Any], ...] = ()
    description: str = ""


# The engine alone, as deployed without progserve: SGLang's FCFS scheduler with its LRU
# radix cache behind the SGLang router's cache-aware routing. Through the `Scheduler`
# with every progserve mechanism off: fcfs over an unbounded budget never holds a call
# (the queue is empty whenever a call arrives), no priorities, no hints, no admission.
ENGINE_ALONE = Configuration(
    BASELINE_POLICY,
    scheduler=(("max_inflight_requests", UNBOUNDED), ("max_inflight_tokens", UNBOUNDED),
               ("anti_starvation", False), *NO_RETENTION, *SGLANG_ROUTER),
    sim=LRU_ENGINE,
    description="engine alone: no progserve queue or in-flight budget, no priorities, no "
                "KV retention or admission; the engine's FCFS and LRU radix cache; the "
                "SGLang router's cache-aware rule (threshold 0.5, balance abs 32, rel "
                "1.0001)",
)

# The ablation: from the engine alone, one progserve mechanism at a time, cumulatively,
# up to the full product (the shipped default policy, with KV admission on).
ABLATION_ROWS: tuple[tuple[str, Configuration], ...] = (
    (ENGINE, ENGINE_ALONE),
    ("queue_budget", Configuration(
        BASELINE_POLICY, scheduler=(*NO_RETENTION, *SGLANG_ROUTER), sim=LRU_ENGINE,
        description="+ progserve's queue and in-flight budget (fcfs)")),
    ("program_aware", Configuration(
        DEFAULT_POLICY, scheduler=(*NO_RETENTION, *SGLANG_ROUTER), sim=LRU_ENGINE,
        description=f"+ the program-aware policy ({DEFAULT_POLICY}, the default, with its "
                    "fork prefill: parallel calls on one prompt share one prefill)")),
    ("kv_retention", Configuration(
        DEFAULT_POLICY, scheduler=(("retain_kv", True), ("kv_admission", False),
                                   *SGLANG_ROUTER),
        sim=(("eviction", "priority"),),
        description="+ KV retention (ended programs' KV first; priority eviction order)")),
    ("kv_admission", Configuration(
        DEFAULT_POLICY, scheduler=(("retain_kv", True), ("kv_admission", True),
                                   *SGLANG_ROUTER),
        sim=(("eviction", "priority"),),
        description="+ KV-aware program admission")),
    ("affine_routing", Configuration(
        DEFAULT_POLICY, scheduler=(("retain_kv", True), ("kv_admission", True),
                                   ("balance", "affinity")),
        sim=(("eviction", "priority"),),
        description="+ program-affine routing (the affinity router): the full product")),
)
ABLATION_PREFIX = "ablation:"


def configuration(name: str) -> Configuration:
    """A bench column by name: a policy, `engine`, or an ablation row."""
    if name == ENGINE:
        return ENGINE_ALONE
    if name.startswith(ABLATION_PREFIX):
        return dict(ABLATION_ROWS)[name.removeprefix(ABLATION_PREFIX)]
    return Configuration(name)
RETENTION_LRU_CEILING = 0.8  # the ablation runs where plain LRU hits just below this
RETENTION_REFINE_STEPS = 3  # bisections of the last x0.85 step: within ~2% of capacity


@dataclass(frozen=True)
class RetentionVariant:
    """One side of the retention ablation: what it turns on, and its plot label."""

    retain_kv: bool  # the ended-program hint (and pins, if budgeted)
    kv_admission: bool
    label: str

    @property
    def eviction(self) -> str:
        return "priority" if self.retain_kv else "lru"


RETENTION_VARIANTS = {
    "lru": RetentionVariant(False, False, "plain LRU"),
    "retention": RetentionVariant(True, True, "retention (hint + KV admission)"),
    "ended_first": RetentionVariant(True, False, "ended-program hint alone"),
}
CURVE_KEYS = ("cache_hit_rate", "mean_token_latency")  # per variant, per capacity


def curve_fields(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A variant's figures at one capacity, as the curve's `<variant>_<key>` fields."""
    return {f"{name}_{key}": result[key] for key in CURVE_KEYS}


def mix_argument(text: str) -> Mix:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bench_mix(args: argparse.Namespace) -> Mix | None:
    if args.mix is not None and args.workload != "mixed":
        raise SystemExit(f"--mix applies to --workload mixed, not {args.workload}")
    return args.mix


def build_setup(args: argparse.Namespace) -> BenchSetup:
    sched: dict[str, Any] = dict(BENCH_SCHEDULER)
    if args.max_inflight_requests:
        sched["max_inflight_requests"] = args.max_inflight_requests
    tokens = args.max_inflight_tokens or WORKLOAD_INFLIGHT_TOKENS.get(args.workload)
    if tokens:
        sched["max_inflight_tokens"] = tokens
    if args.balance:
        sched["balance"] = args.balance
    if args.retention_budget is not None:
        sched["retention_budget_fraction"] = args.retention_budget
    if args.kv_admission is not None:
        sched["kv_admission"] = args.kv_admission == "on"
    sim: dict[str, Any] = {"stream_interval": 0, "seed": args.seed}
    kv_capacity = args.kv_capacity or WORKLOAD_KV_CAPACITY.get(args.workload)
    if kv_capacity:
        sim["kv_capacity_tokens"] = kv_capacity
    if getattr(args, "hardware", None):
        sim["hardware"] = load_hardware_profile(args.hardware)
    return BenchSetup(args.replicas, SimConfig(**sim), SchedulerConfig(**sched),
                      tenants=getattr(args, "tenants", "one"))


# ------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class RunSpec:
    workload: str
    programs: int
    seed: int
    policy: str
    rate: float
    setup: BenchSetup
    warmup: float
    drain: float
    subset: int | None = None  # run only the first `subset` programs (unloaded runs)
    slo: float | None = None  # stop early once the p95 cannot meet it
    scheduler_overrides: tuple[tuple[str, Any], ...] = ()
    sim_overrides: tuple[tuple[str, Any], ...] = ()
    label: str = ""
    mix: Mix | None = None  # the mixed workload's type weights (None: the default)


def execute(spec: RunSpec) -> dict[str, Any]:
    """One simulation (in a worker process): its summary."""
    trace = generate_trace(spec.workload, spec.programs, spec.seed, mix=spec.mix)
    total = spec.programs
    if spec.subset is not None:
        trace.programs = trace.programs[: spec.subset]
        total = len(trace.programs)
    stop_when = None
    if spec.slo is not None:
        lo, hi = int(total * spec.warmup), total - int(total * spec.drain)
        allowed = math.floor(0.05 * (hi - lo))
        slo = spec.slo
        violations = [0]

        def stop_when(result: ProgramResult) -> bool:
            if lo <= result.index < hi and result.token_latency > slo:
                violations[0] += 1
            return violations[0] > allowed + 1

    run = run_trace(
        trace, spec.policy, spec.rate, spec.setup,
        scheduler_overrides=dict(spec.scheduler_overrides),
        sim_overrides=dict(spec.sim_overrides),
        stop_when=stop_when,
    )
    warmup, drain = (spec.warmup, spec.drain) if spec.subset is None else (0.0, 0.0)
    summary = summarize_run(run, total, warmup, drain)
    summary["stopped_early"] = run.stopped_early
    summary["policy"] = spec.policy
    if spec.label:
        summary["label"] = spec.label
    return summary


def mildest_pressure(capacity: int, lru: dict[str, Any],
                     try_lru: Callable[[int], dict[str, Any]],
                     refine: int = RETENTION_REFINE_STEPS) -> tuple[int, dict[str, Any]]:
    """The largest KV capacity at which plain LRU hits below 80%: bracket it in x0.85
    steps (shrink while LRU still hits 80%, or grow while it hits below; at most 12 tries
    each way), then bisect the bracket `refine` times, keeping the largest capacity below
    80%. LRU's hit rate climbs steeply near the ceiling (bfcl: 71% at 55k, 81% at 65k),
    so the coarse steps alone could land well under it."""
    below, above = _bracket(capacity, lru, try_lru)
    if below is None or above is None:  # no capacity crosses 80% within the search
        return below or above  # type: ignore[return-value]
    for _ in range(refine):
        middle = (below[0] + above[0]) // 2
        if middle in (below[0], above[0]):
            break
        result = try_lru(middle)
        if result["cache_hit_rate"] < RETENTION_LRU_CEILING:
            below = (middle, result)
        else:
            above = (middle, result)
    return below


Probe = tuple[int, dict[str, Any]]


def _bracket(capacity: int, lru: dict[str, Any], try_lru: Callable[[int], dict[str, Any]]
             ) -> tuple[Probe | None, Probe | None]:
    """(largest capacity tried with LRU under 80%, smallest tried at or over it): from
    `capacity`, x0.85 steps up while LRU hits below 80%, down while it hits 80% or more,
    until both sides are found (at most 12 more tries)."""
    below: Probe | None = None
    above: Probe | None = None
    probe: Probe = (capacity, lru)
    for tries in range(13):
        if probe[1]["cache_hit_rate"] < RETENTION_LRU_CEILING:
            below, step = probe, int(probe[0] / 0.85)
        else:
            above, step = probe, max(1000, int(probe[0] * 0.85))
        if (below and above) or step == probe[0] or tries == 12:
            break
        probe = (step, try_lru(step))
    return below, above


# ------------------------------------------------------------------ the sweep
@dataclass
class Sweep:
    """Bisection of one policy's rate against the SLO: bracket by x1.5 steps, then
    `steps` bisections (geometric midpoints)."""

    policy: str
    slo: float
    start: float
    steps: int
    ok: float | None = None
    fail: float | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    bisections: int = 0
    max_bracket_runs: int = 8

    def next_rate(self) -> float | None:
        if self.ok is None and self.fail is None:
            return self.start
        if self.fail is None:
            return None if len(self.points) >= self.max_bracket_runs else self.ok * 1.5
        if self.ok is None:
            return None if len(self.points) >= self.max_bracket_runs else self.fail / 1.5
        if self.bisections >= self.steps:
            return None
        return math.sqrt(self.ok * self.fail)

    def record(self, rate: float, summary: dict[str, Any]) -> None:
        meets = (
            not summary["stopped_early"]
            and summary.get("stable", True)
            and summary.get("p95_token_latency", math.inf) <= self.slo
        )
        summary["meets_slo"] = meets
        self.points.append(summary)
        if self.ok is not None and self.fail is not None:
            self.bisections += 1
        if meets:
            if self.ok is None or rate > self.ok:
                self.ok, self.best = rate, summary
        elif self.fail is None or rate < self.fail:
            self.fail = rate


def headline(summary: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("mean_token_latency", "p50_token_latency", "p95_token_latency",
            "p99_token_latency", "cache_hit_rate")
    return {k: (summary or {}).get(k) for k in keys}


SWEEP_POINT_KEYS = ("rate", "meets_slo", "stopped_early", "stable", "response_growth",
                    "backlog_growth", "mean_token_latency", "p95_token_latency",
                    "cache_hit_rate", "completed_programs")


def sweep_point(summary: dict[str, Any]) -> dict[str, Any]:
    """One sweep rate in the report: its headline figures and the engines' busy share."""
    busy = (summary.get("engine") or {}).get("busy_fraction")
    return {k: summary.get(k) for k in SWEEP_POINT_KEYS} | {"engine_busy_fraction": busy}


def at_load_view(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("rate", "mean_token_latency", "p50_token_latency", "p95_token_latency",
            "p99_token_latency", "p95_by_type", "mean_by_type", "cache_hit_rate",
            "mean_queue_wait_s", "by_type", "critical_path", "stable", "response_growth",
            "backlog_growth", "engine", "scheduler", "completed_programs",
            "virtual_s", "wall_s", "cpu_s", "calls")
    return {k: summary.get(k) for k in keys}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = set(self.policies) - {*POLICY_NAMES, ENGINE}
        if unknown:
            raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
        ablation = getattr(args, "ablation", "off")
        if ablation == "on" and ENGINE not in self.policies:
            self.policies.insert(0, ENGINE)
        self.ablation = ENGINE in self.policies and ablation != "off"
        # Ablation rows other than the engine alone (which is `policies.engine`).
        self.ablation_names = ([ABLATION_PREFIX + row for row, _ in ABLATION_ROWS[1:]]
                               if self.ablation else [])
        self.setup = build_setup(args)
        self.mix = bench_mix(args)
        self.trace = generate_trace(args.workload, args.programs, args.seed, mix=self.mix)
        self.engine_knee: float | None = None
        self.at_engine_knee: dict[str, dict[str, Any]] = {}

    def spec(self, name: str, rate: float, *,
             scheduler_overrides: tuple[tuple[str, Any], ...] = (),
             sim_overrides: tuple[tuple[str, Any], ...] = (), **kw: Any) -> RunSpec:
        """A run of the column `name` (a policy, `engine` or an ablation row)."""
        a = self.args
        conf = configuration(name)
        return RunSpec(a.workload, a.programs, a.seed, conf.policy, rate, self.setup,
                       a.warmup, a.drain, mix=self.mix,
                       scheduler_overrides=conf.scheduler + scheduler_overrides,
                       sim_overrides=conf.sim + sim_overrides,
                       label=name if name != conf.policy else "", **kw)

    def mix_report(self) -> dict[str, Any] | None:
        """The mixed workload's weights and how many programs of each type the trace has."""
        if self.args.workload != "mixed":
            return None
        weights = dict(self.mix or DEFAULT_MIX)
        counts = {kind: 0 for kind in weights}
        for program in self.trace.programs:
            counts[program.kind] += 1
        return {"weights": weights, "programs_by_type": counts,
                "default": self.mix is None}

    def start_rate(self) -> float:
        """A first guess of the knee from the trace's work: ~2,500 output tokens/s per
        replica (8B on an H100 at moderate batch)."""
        from .workloads import BfclShape, ChatShape, LatsShape, MapReduceShape, SweShape

        tokens = 0.0
        for program in self.trace.programs:
            shape = program.shape
            if isinstance(shape, ChatShape):
                tokens += sum(r for _, r in shape.turns)
            elif isinstance(shape, BfclShape):
                tokens += sum(o for o, _, _ in shape.steps)
            elif isinstance(shape, LatsShape):
                tokens += sum(sum(it.gen_tokens) + sum(it.value_tokens)
                              for it in shape.iterations)
            elif isinstance(shape, MapReduceShape):
                tokens += sum(o for _, o in shape.chunks) + shape.reduce_tokens
            elif isinstance(shape, SweShape):
                tokens += sum(o for o, _, _ in shape.steps)
        per_program = tokens / max(len(self.trace.programs), 1)
        return self.args.replicas * 2500.0 / max(per_program, 1.0)

    def run(self) -> dict[str, Any]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        a = self.args
        console = Console(stderr=True)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=max(1, a.workers), mp_context=ctx) as pool, \
                Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                         TextColumn("{task.completed}/{task.total} runs"), TimeElapsedColumn(),
                         console=console, transient=False) as progress:
            bar = progress.add_task("unloaded", total=1)
            # 1. Unloaded latency: programs one at a time (rate so low nothing overlaps).
            unloaded_n = min(a.unloaded_programs, a.programs)
            unloaded = pool.submit(execute, self.spec(BASELINE_POLICY, 1e-4, subset=unloaded_n)).result()
            progress.advance(bar)
            unloaded_p95 = unloaded["p95_token_latency"]
            slo = a.slo if a.slo is not None else a.slo_factor * unloaded_p95
            # 2. Sweeps (or a fixed rate), then 3. the fixed-load point.
            if a.rate is not None:
                results = self._fixed_rate(pool, progress, bar, a.rate)
                sweeps: dict[str, Sweep] = {}
                load_rate = a.rate
            else:
                sweeps, results, load_rate = self._sweeps(pool, progress, bar, slo)
            retention = None
            if a.retention == "on" or (a.retention == "auto" and a.workload == "bfcl"):
                retention = self._retention(pool, progress, bar, load_rate, results)
            progress.update(bar, description="done")
        return self._report(unloaded, slo, sweeps, results, load_rate, retention)

    def _fixed_rate(self, pool: futures.Executor, progress: Any, bar: Any,
                    rate: float) -> dict[str, dict[str, Any]]:
        names = [*self.policies, *self.ablation_names]
        progress.update(bar, total=1 + len(names), description=f"rate {rate:.3g}/s")
        jobs = {pool.submit(execute, self.spec(p, rate)): p for p in names}
        results = {}
        for job in futures.as_completed(jobs):
            results[jobs[job]] = job.result()
            progress.advance(bar)
        if ENGINE in results:  # the fixed rate is the engine's load point too
            self.engine_knee, self.at_engine_knee = rate, dict(results)
        return results

    def _sweeps(self, pool: futures.Executor, progress: Any, bar: Any,
                slo: float) -> tuple[dict[str, Sweep], dict[str, dict[str, Any]], float]:
        """Every column's sweep; once fcfs's (the reference's) ends, every column at its
        knee (`at_load`); once the engine alone's ends, every column at the engine's
        knee (`self.at_engine_knee`)."""
        a = self.args
        start = self.start_rate()
        names = [*self.policies, *self.ablation_names]
        sweeps = {p: Sweep(p, slo, start, a.bisect_steps) for p in names}
        reference = BASELINE_POLICY if BASELINE_POLICY in sweeps else self.policies[0]
        knees = {reference: [p for p in self.policies if p != reference]}
        if ENGINE in sweeps:
            knees[ENGINE] = [p for p in names if p != ENGINE]
        expected = (1 + len(names) * (3 + a.bisect_steps)
                    + sum(len(others) for others in knees.values()))
        progress.update(bar, total=expected, description="rate sweeps")
        running: dict[futures.Future[dict[str, Any]], tuple[str, str, float]] = {}

        def submit_next(policy: str) -> None:
            rate = sweeps[policy].next_rate()
            if rate is not None:
                job = pool.submit(execute, self.spec(policy, rate, slo=slo))
                running[job] = ("sweep", policy, rate)

        for policy in names:
            submit_next(policy)
        loads: dict[str, dict[str, dict[str, Any]]] = {ref: {} for ref in knees}
        rates: dict[str, float] = {}
        while running:
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for job in done:
                kind, policy, rate = running.pop(job)
                summary = job.result()
                progress.advance(bar)
                if kind != "sweep":
                    loads[kind][policy] = summary
                    continue
                sweeps[policy].record(rate, summary)
                progress.update(bar, description=f"{policy} @ {rate:.3g}/s")
                submit_next(policy)
                if policy in knees and not any(
                    k[1] == policy and k[0] == "sweep" for k in running.values()
                ):
                    # The reference's sweep is over: its knee is a fixed-load point.
                    knee = rates[policy] = sweeps[policy].ok or sweeps[policy].fail or start
                    if sweeps[policy].best is not None:
                        loads[policy][policy] = sweeps[policy].best
                    for other in knees[policy]:
                        if other not in loads[policy]:
                            job2 = pool.submit(execute, self.spec(other, knee))
                            running[job2] = (policy, other, knee)
        progress.update(bar, total=progress.tasks[0].completed)
        self.engine_knee = rates.get(ENGINE)
        self.at_engine_knee = loads.get(ENGINE, {})
        return sweeps, loads[reference], rates[reference]

    def _retention(self, pool: futures.Executor, progress: Any, bar: Any, rate: float,
                   results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The same policy and load under memory pressure, in the `RETENTION_VARIANTS`:
        plain LRU without hints vs program-aware retention (the ended-program hint and KV
        admission), and the hint alone. Unless
        `--retention-kv-capacity` is given, at the mildest memory pressure that qualifies:
        the largest capacity where plain LRU hits below 80% (`mildest_pressure`)."""
        a = self.args
        preferred = (DEFAULT_POLICY, *PROGRAM_AWARE_POLICIES)
        policy = next((p for p in preferred if p in self.policies), self.policies[0])

        def submit(name: str, capacity: int) -> futures.Future[dict[str, Any]]:
            variant = RETENTION_VARIANTS[name]
            spec = self.spec(
                policy, rate,
                scheduler_overrides=(("retain_kv", variant.retain_kv),
                                     ("kv_admission", variant.kv_admission)),
                sim_overrides=(("eviction", variant.eviction),
                               ("kv_capacity_tokens", capacity)),
            )
            return pool.submit(execute, spec)

        def collect(job: futures.Future[dict[str, Any]]) -> dict[str, Any]:
            summary = job.result()
            progress.advance(bar)
            return {
                "cache_hit_rate": summary["cache_hit_rate"],
                "mean_token_latency": summary["mean_token_latency"],
                "p95_token_latency": summary["p95_token_latency"],
                "preemptions": summary["engine"]["preemptions"],
                "recomputed_tokens": summary["engine"]["recomputed_tokens"],
            }

        capacity = a.retention_kv_capacity or RETENTION_KV_CAPACITY
        progress.update(bar, total=(progress.tasks[0].total or 0) + 2, description="retention")
        tried: list[dict[str, Any]] = []

        def try_lru(capacity: int) -> dict[str, Any]:
            if tried:
                progress.update(bar, total=(progress.tasks[0].total or 0) + 1)
            result = collect(submit("lru", capacity))
            tried.append({"kv_capacity_tokens": capacity, **curve_fields("lru", result)})
            return result

        lru = try_lru(capacity)
        if a.retention_kv_capacity is None:
            capacity, lru = mildest_pressure(capacity, lru, try_lru)
        # Both retention variants at every capacity the search tried, so the gain shows
        # across pressures (the `curve`), not at one point only.
        lru_at = {t["kv_capacity_tokens"]: t for t in tried}
        progress.update(bar, total=(progress.tasks[0].total or 0) + 2 * len(lru_at) - 1)
        jobs = {(name, c): submit(name, c)
                for c in sorted(lru_at) for name in ("retention", "ended_first")}
        runs = {key: collect(job) for key, job in jobs.items()}
        retained, ended_first = runs["retention", capacity], runs["ended_first", capacity]
        curve = [{**lru_at[c],
                  **curve_fields("retention", runs["retention", c]),
                  **curve_fields("ended_first", runs["ended_first", c]),
                  "gain_points": 100 * (runs["retention", c]["cache_hit_rate"]
                                        - lru_at[c]["lru_cache_hit_rate"])}
                 for c in sorted(lru_at)]
        return {
            "policy": policy,
            "rate": rate,
            "kv_capacity_tokens": capacity,
            "capacity_search": tried,
            "curve": curve,
            "lru": lru,
            "retention": retained,
            "ended_first": ended_first,
            "cache_hit_gain_points": 100 * (retained["cache_hit_rate"] - lru["cache_hit_rate"]),
            "variants": {
                "lru": "eviction order lru, no retention hints, no KV admission",
                "retention": "eviction order priority; an ended program's private KV goes "
                             "first (Engine.program_ended); KV admission on (off by default "
                             "in the scheduler): new programs wait while the admitted ones' "
                             "KV footprint exceeds "
                             f"{self.setup.scheduler.kv_admission_fill:g} of the replicas' "
                             "KV (scheduler/kv_admission.py); pins of idle programs cover at "
                             f"most {self.setup.scheduler.retention_budget_fraction:g} of "
                             "a replica's KV (0: no pins)",
                "ended_first": "as retention, without KV admission (scheduler default): "
                               "what the ended-program hint alone gives",
            },
        }

    # ------------------------------------------------------------------ the report
    def _report(self, unloaded: dict[str, Any], slo: float, sweeps: dict[str, Sweep],
                at_load: dict[str, dict[str, Any]], load_rate: float,
                retention: dict[str, Any] | None) -> dict[str, Any]:
        a = self.args
        setup = self.setup
        policies: dict[str, Any] = {}
        for policy in self.policies:
            sweep = sweeps.get(policy)
            best = sweep.best if sweep else at_load.get(policy)
            entry: dict[str, Any] = {
                "max_rate_at_slo": sweep.ok if sweep else None,
                **headline(best),
                "at_load": at_load_view(at_load[policy]) if policy in at_load else None,
            }
            if sweep:
                entry["first_failing_rate"] = sweep.fail
                entry["sweep"] = [sweep_point(p)
                                  for p in sorted(sweep.points, key=lambda p: p["rate"])]
            if policy in self.at_engine_knee:
                entry["at_engine_knee"] = at_load_view(self.at_engine_knee[policy])
            policies[policy] = entry
        report: dict[str, Any] = {
            "workload": a.workload,
            "mix": self.mix_report(),
            "programs": a.programs,
            "replicas": a.replicas,
            "seed": a.seed,
            "load_point": {"rate": load_rate,
                           "source": "fcfs.max_rate_at_slo" if a.rate is None else "--rate"},
            "slo": {"p95_token_latency": slo, "factor": a.slo_factor if a.slo is None else None,
                    "unloaded": headline(unloaded),
                    "unloaded_by_type": {"mean": unloaded.get("mean_by_type"),
                                         "p95": unloaded.get("p95_by_type")},
                    "unloaded_programs": unloaded.get("count")},
            "units": "token latencies in seconds per generated token; rates in programs/s",
            "metric": "program token latency = response time (for DAGs: critical-path time) "
                      "/ tokens generated; `critical_path` blocks: per critical-path token. "
                      "A sweep rate meets the SLO only if its p95 does and the run is stable "
                      "(neither response times nor the number of programs in the system "
                      "grow >1.5x across the measured window).",
            "steady_state": {"warmup": a.warmup, "drain": a.drain},
            "setup": {
                "same_for_every_policy": ["engine (SimEngine, same config)", "radix KV cache",
                                          "in-flight budget", "router",
                                          "KV retention and admission settings",
                                          "trace and arrivals", "tenants"],
                "tenants": setup.tenants,
                "differences": ["the call-ordering policy (and the priority it passes to "
                                "the engine: fcfs and dlpm pass 0, so the engine orders "
                                "their calls FCFS)",
                                "fork prefill (scheduler.fork_prefill): on for plas and "
                                "atlas, off for the others unless set"],
                "sim": setup.sim.model_dump(mode="json"),
                "scheduler": setup.scheduler.model_dump(mode="json", exclude={"policy"}),
            },
            "policies": policies,
        }
        if ENGINE in self.policies:
            report["engine_knee"] = {
                "rate": self.engine_knee,
                "source": "engine.max_rate_at_slo" if a.rate is None else "--rate",
                "engine_alone": ENGINE_ALONE.description,
                "progserve_defaults": progserve_defaults(setup.scheduler),
            }
        if self.ablation:
            report["ablation"] = self._ablation_rows(sweeps)
        report["comparison"] = compare(report)
        report["speed"] = speed_block(at_load)
        if retention is not None:
            report["retention"] = retention
        return report


    def _ablation_rows(self, sweeps: dict[str, Sweep]) -> list[dict[str, Any]]:
        """One row per mechanism, cumulative from the engine alone: throughput at SLO,
        and at the engine alone's knee the latencies, cache hit rate and recomputed
        tokens."""
        rows = []
        for row, conf in ABLATION_ROWS:
            name = ENGINE if row == ENGINE else ABLATION_PREFIX + row
            sweep = sweeps.get(name)
            load = self.at_engine_knee.get(name) or {}
            rows.append({
                "name": row,
                "description": conf.description,
                "policy": conf.policy,
                "max_rate_at_slo": sweep.ok if sweep else None,
                "mean_token_latency": load.get("mean_token_latency"),
                "p95_token_latency": load.get("p95_token_latency"),
                "p95_by_type": load.get("p95_by_type"),
                "cache_hit_rate": load.get("cache_hit_rate"),
                "recomputed_tokens": (load.get("engine") or {}).get("recomputed_tokens"),
                "preemptions": (load.get("engine") or {}).get("preemptions"),
                "rate": load.get("rate"),
            })
        return rows


def progserve_defaults(config: SchedulerConfig) -> dict[str, Any]:
    """What the shipped product turns on (the scheduler's defaults), beside what the
    bench's progserve columns use."""
    shipped = SchedulerConfig()
    return {
        "policy": shipped.policy,
        "retain_kv": shipped.retain_kv,
        "kv_admission": shipped.kv_admission,
        "balance": shipped.balance,
        "bench_budget": {"max_inflight_requests": config.max_inflight_requests,
                         "max_inflight_tokens": config.max_inflight_tokens},
        "bench_columns": "policies other than engine: the bench set-up (its budget, "
                         "retain_kv and kv_admission as set, affinity routing); ablation "
                         "rows: as described in each row",
    }


def vs_engine(report: dict[str, Any]) -> dict[str, Any]:
    """The best progserve configuration (any policy column or ablation row other than
    the engine alone; best throughput at SLO, then lowest mean at the engine's knee)
    against the engine alone: throughput ratio, and mean / p95 / worst type's p95 ratios
    at the engine alone's knee."""
    pol = report["policies"]
    engine = pol.get(ENGINE)
    if not engine:
        return {}
    base = engine.get("at_engine_knee") or {}
    candidates: dict[str, tuple[float | None, dict[str, Any]]] = {
        name: (entry.get("max_rate_at_slo"), entry.get("at_engine_knee") or {})
        for name, entry in pol.items() if name != ENGINE
    }
    for row in report.get("ablation") or []:
        if row["name"] != ENGINE:
            candidates[ABLATION_PREFIX + row["name"]] = (row["max_rate_at_slo"], row)
    if not candidates or not base:
        return {}

    def rank(item: tuple[str, tuple[float | None, dict[str, Any]]]) -> tuple[float, float]:
        rate, load = item[1]
        return (-(rate or 0.0), load.get("mean_token_latency") or math.inf)

    best, (rate, load) = min(candidates.items(), key=rank)
    base_types = base.get("p95_by_type") or {}
    worst = max((v / base_types[k] for k, v in (load.get("p95_by_type") or {}).items()
                 if v is not None and base_types.get(k)), default=math.nan)
    engine_rate = engine.get("max_rate_at_slo")

    def ratio(key: str) -> float | None:
        value, reference = load.get(key), base.get(key)
        return value / reference if value is not None and reference else None

    return {
        "best": best,
        "throughput_ratio": rate / engine_rate if rate and engine_rate else None,
        "mean_ratio": ratio("mean_token_latency"),
        "p95_ratio": ratio("p95_token_latency"),
        "worst_type_p95_ratio": worst,
        "engine_knee": report.get("engine_knee", {}).get("rate"),
    }


def floor_gap_closed(report: dict[str, Any], best: str | None) -> dict[str, Any]:
    """At fcfs's knee, the share of the gap between fcfs and the unloaded floor that each
    program-aware policy closes: (fcfs - policy) / (fcfs - unloaded), mean and p95; the
    headline is the best program-aware policy's (lowest mean)."""
    pol = report["policies"]
    base = pol[BASELINE_POLICY]["at_load"]
    unloaded = report["slo"]["unloaded"]
    by_policy = {}
    for name in PROGRAM_AWARE_POLICIES:
        load = (pol.get(name) or {}).get("at_load")
        if not load:
            continue
        shares = {}
        for key, label in (("mean_token_latency", "mean"), ("p95_token_latency", "p95")):
            gap = base[key] - unloaded[key] if base.get(key) and unloaded.get(key) else None
            shares[label] = (base[key] - load[key]) / gap if gap else None
        by_policy[name] = shares
    head = by_policy.get(best or "", {})
    return {"policy": best, "mean": head.get("mean"), "p95": head.get("p95"),
            "by_policy": by_policy}


def run_speed(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's simulation cost: CPU seconds of its process per LLM call it completed."""
    calls, cpu = summary.get("calls") or 0, summary.get("cpu_s") or 0.0
    return {"us_per_llm_call": 1e6 * cpu / calls if calls else None, "llm_calls": calls,
            "cpu_s": cpu}


def speed_block(at_load: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The bench's own speed (`speed` in the JSON): CPU time per LLM call over the
    fixed-load run of every policy, and per policy. Timing only, never compared."""
    calls = sum(s.get("calls") or 0 for s in at_load.values())
    cpu = sum(s.get("cpu_s") or 0.0 for s in at_load.values())
    return {"us_per_llm_call": 1e6 * cpu / calls if calls else None, "llm_calls": calls,
            "cpu_s": cpu, "runs": "the fixed-load run of each policy (process CPU time)",
            "by_policy": {name: run_speed(s) for name, s in sorted(at_load.items())}}


def compare(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios at the fixed-load point and of throughput, program-aware vs fcfs."""
    pol = report["policies"]
    fcfs = pol.get(BASELINE_POLICY)
    if not fcfs or not fcfs.get("at_load"):
        return {"vs_engine": vs_engine(report)} if ENGINE in pol else {}
    base = fcfs["at_load"]
    out: dict[str, Any] = {}
    best_name, best_mean = None, math.inf
    for name in PROGRAM_AWARE_POLICIES:
        entry = pol.get(name)
        if not entry or not entry.get("at_load"):
            continue
        load = entry["at_load"]
        worst = max(
            (load["p95_by_type"][k] / base["p95_by_type"][k]
             for k in load["p95_by_type"] if base["p95_by_type"].get(k)),
            default=math.nan,
        )
        out[name] = {
            "mean_ratio": load["mean_token_latency"] / base["mean_token_latency"],
            "p95_ratio": load["p95_token_latency"] / base["p95_token_latency"],
            "worst_type_p95_ratio": worst,
            "throughput_ratio": (entry["max_rate_at_slo"] / fcfs["max_rate_at_slo"]
                                 if entry.get("max_rate_at_slo") and fcfs.get("max_rate_at_slo")
                                 else None),
        }
        if load["mean_token_latency"] < best_mean:
            best_name, best_mean = name, load["mean_token_latency"]
    out["best_program_aware"] = best_name
    out["floor"] = ratio_floor(report["slo"]["unloaded"], base)
    others = [n for n in POLICY_NAMES if n != BASELINE_POLICY and n not in PROGRAM_AWARE_POLICIES]
    for name in others:
        entry = pol.get(name)
        if entry and entry.get("max_rate_at_slo") and fcfs.get("max_rate_at_slo"):
            out.setdefault(name, {})["throughput_ratio"] = (
                entry["max_rate_at_slo"] / fcfs["max_rate_at_slo"])
    if best_name is not None:
        out["floor_gap_closed"] = floor_gap_closed(report, best_name)
    if ENGINE in pol:
        out["vs_engine"] = vs_engine(report)
    return out


def ratio_floor(unloaded: dict[str, Any], fcfs_at_load: dict[str, Any]) -> dict[str, Any]:
    """The smallest mean and p95 ratios against fcfs that any policy could reach at the
    load point. A program cannot finish sooner than when it runs alone (no queueing, the
    smallest batches, its tools' latencies unchanged), so the unloaded latencies bound
    every policy's from below; a must-show ratio below this floor is out of reach."""
    out: dict[str, Any] = {
        "note": "unloaded latency / fcfs latency at the load point: no policy can go below"
    }
    for key, name in (("mean_token_latency", "mean_ratio"), ("p95_token_latency", "p95_ratio")):
        low, base = unloaded.get(key), fcfs_at_load.get(key)
        out[name] = low / base if low and base else None
    return out


def workload_label(report: dict[str, Any]) -> str:
    """`mixed`, or `mixed (chat=2, lats=1)` for a mix other than the default."""
    mix = report.get("mix")
    if not mix or mix.get("default"):
        return report["workload"]
    weights = ", ".join(f"{kind}={weight:g}" for kind, weight in mix["weights"].items())
    return f"{report['workload']} ({weights})"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = (report.get("retention") or {}).get("curve")
    # Retention panels: hit rate, and (when recorded) latency, against KV capacity.
    panels = 2 + (0 if not curve else 2 if "retention_mean_token_latency" in curve[0] else 1)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax_p95, ax_mean = axes[0], axes[1]
    if curve:
        plot_retention(axes[2:], report["retention"])
    for name, entry in report["policies"].items():
        points = [p for p in entry.get("sweep") or [] if p.get("p95_token_latency")]
        load = entry.get("at_load")
        if load:
            points.append({"rate": load["rate"], "p95_token_latency": load["p95_token_latency"],
                           "mean_token_latency": load["mean_token_latency"],
                           "stopped_early": False})
        points.sort(key=lambda p: p["rate"])
        if not points:
            continue
        rates = [p["rate"] for p in points]
        for ax, key in ((ax_p95, "p95_token_latency"), (ax_mean, "mean_token_latency")):
            values = [p[key] * 1000 for p in points]
            (line,) = ax.plot(rates, values, marker="o", label=name)
            partial = [(r, v) for r, v, p in zip(rates, values, points, strict=True)
                       if p.get("stopped_early")]
            if partial:
                ax.scatter(*zip(*partial, strict=True), marker="x", color=line.get_color())
    slo = report["slo"]["p95_token_latency"] * 1000
    ax_p95.axhline(slo, color="grey", linestyle="--", label="SLO")
    ax_p95.axvline(report["load_point"]["rate"], color="grey", linestyle=":")
    ax_mean.axvline(report["load_point"]["rate"], color="grey", linestyle=":",
                    label="fixed load")
    for ax, title in ((ax_p95, "p95 program token latency"), (ax_mean, "mean")):
        ax.set_xlabel("program arrival rate (programs/s)")
        ax.set_ylabel("ms per token")
        ax.set_yscale("log")
        ax.set_title(f"{title} — {workload_label(report)}, {report['replicas']} replicas")
        ax.legend()
    fig.text(0.01, 0.01, "x: run stopped once its p95 could no longer meet the SLO "
             "(partial statistics)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_retention(axes: Any, retention: dict[str, Any]) -> None:
    """Cache hit rate (and mean token latency, when there is a second axes) against KV
    capacity per replica: plain LRU vs retention. Latency beside the hit rate shows that
    the hits are not bought with waiting (KV admission holds programs)."""
    curve = retention["curve"]
    tokens = [p["kv_capacity_tokens"] / 1000 for p in curve]
    point = retention["kv_capacity_tokens"] / 1000
    variants = [(name, variant.label) for name, variant in RETENTION_VARIANTS.items()
                if f"{name}_cache_hit_rate" in curve[0]]
    ax = axes[0]
    for name, label in variants:
        ax.plot(tokens, [100 * p[f"{name}_cache_hit_rate"] for p in curve], marker="o",
                label=label)
    ax.axhline(100 * RETENTION_LRU_CEILING, color="grey", linestyle="--", label="80%")
    ax.axvline(point, color="grey", linestyle=":",
               label=f"ablation point ({retention['cache_hit_gain_points']:+.1f} points)")
    ax.set_ylabel("prefix cache hit rate (%)")
    ax.set_title(f"KV retention — {retention['policy']} at {retention['rate']:.3g} programs/s")
    if len(axes) > 1:
        latency = axes[1]
        for name, label in variants:
            if f"{name}_mean_token_latency" in curve[0]:
                latency.plot(tokens, [1000 * p[f"{name}_mean_token_latency"] for p in curve],
                             marker="o", label=label)
        latency.axvline(point, color="grey", linestyle=":", label="ablation point")
        latency.set_ylabel("mean program token latency (ms)")
        latency.set_title("KV retention — latency at the same capacities")
    for panel in axes:
        panel.set_xlabel("KV capacity per replica (thousand tokens)")
        panel.legend()


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{workload_label(report)}: {report['programs']} programs, "
                        f"{report['replicas']} replicas, load {report['load_point']['rate']:.3g}/s")
    table.add_column("policy")
    table.add_column("max rate @SLO")
    for col in ("mean", "p50", "p95"):
        table.add_column(f"{col} @load (ms/tok)")
    table.add_column("cache hit")
    table.add_column("engines busy")
    types = [t for t in PROGRAM_TYPES if any(
        (e.get("at_load") or {}).get("p95_by_type", {}).get(t) is not None
        for e in report["policies"].values())]
    for t in types:
        table.add_column(f"p95 {t}")

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    def share(v: Any) -> str:
        return "-" if v is None else f"{v:.1%}"

    for name, entry in report["policies"].items():
        load = entry.get("at_load") or {}
        rate = entry.get("max_rate_at_slo")
        table.add_row(name, "-" if rate is None else f"{rate:.3g}",
                      ms(load.get("mean_token_latency")), ms(load.get("p50_token_latency")),
                      ms(load.get("p95_token_latency")),
                      share(load.get("cache_hit_rate")),
                      share((load.get("engine") or {}).get("busy_fraction")),
                      *[ms((load.get("p95_by_type") or {}).get(t)) for t in types])
    console = Console()
    console.print(table)
    retention = report.get("retention")
    if retention:
        console.print(
            f"KV retention ({retention['policy']}, {retention['kv_capacity_tokens']:,} KV "
            f"tokens per replica): plain LRU {retention['lru']['cache_hit_rate']:.1%} -> "
            f"retention {retention['retention']['cache_hit_rate']:.1%} cache hits "
            f"({retention['cache_hit_gain_points']:+.1f} points; the ended-program hint "
            f"alone {retention['ended_first']['cache_hit_rate']:.1%}); mean token latency "
            f"{ms(retention['lru']['mean_token_latency'])} -> "
            f"{ms(retention['retention']['mean_token_latency'])} ms")


def main(args: argparse.Namespace) -> int:
    bench = Bench(args)
    report = bench.run()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
    print_table(report)
    if not args.json:
        json.dump(report["comparison"], sys.stdout, indent=2)
        print()
    return 0

