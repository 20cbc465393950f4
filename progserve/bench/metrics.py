"""Program-level latency statistics (Autellix's metric) over a run's steady state.

Token latency of a program = its response time (finish - arrival; for a DAG that is its
critical-path time) divided by the tokens it generated. `critical_path` in a summary has
the stricter variant for DAGs (lats, mapreduce): per token of the chain of calls that
decided when the program finished (identical for chat and bfcl). Statistics skip the
warm-up (the first `warmup` share of programs by arrival) and the drain (the last `drain`
share), where the load is not yet / no longer steady.

Stability: a run whose backlog grows across its measured window is overloaded; with more
programs its latency would grow without bound. Two signs, either one marks the run
unstable (`stable` False):
- response growth: for some program type, the mean response time of the last third of
  the window (by arrival) exceeds `GROWTH_LIMIT` times that of the first third;
- backlog growth: the mean number of programs in the system over the last third of the
  window's time exceeds `GROWTH_LIMIT` times that over the first third. This one catches
  a policy that starves a program type until arrivals stop: the starved programs then
  all finish together in the drain, so their response times *shrink* by arrival order
  while they pile up in the system.
A sweep point meets the SLO only if it is stable.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .driver import ProgramResult, RunResult


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending sequence (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def steady_state(
    programs: Sequence[ProgramResult], total: int, warmup: float, drain: float
) -> list[ProgramResult]:
    lo, hi = int(total * warmup), total - int(total * drain)
    return [p for p in programs if lo <= p.index < hi]


def busy_fraction(run: RunResult, total: int, warmup: float, drain: float) -> float | None:
    """How busy the engines were (mean over replicas: seconds running steps per second)
    while the steady-state window's programs arrived. A utilization, not a capacity: a
    busy engine batching continuously can still take more requests, in bigger and slower
    steps."""
    samples = run.busy_at_arrivals
    lo, hi = int(total * warmup), min(total - int(total * drain), len(samples)) - 1
    if hi <= lo or samples[hi][0] <= samples[lo][0]:
        return None
    (t0, b0), (t1, b1) = samples[lo], samples[hi]
    return (b1 - b0) / (t1 - t0)


def latency_stats(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "mean_token_latency": sum(ordered) / len(ordered),
        "p50_token_latency": percentile(ordered, 50),
        "p95_token_latency": percentile(ordered, 95),
        "p99_token_latency": percentile(ordered, 99),
    }


GROWTH_LIMIT = 1.5


def response_growth(measured: Sequence[ProgramResult]) -> dict[str, float]:
    """Per program type: mean response time of the last third of the window (by arrival)
    over that of the first third."""
    out: dict[str, float] = {}
    for kind in sorted({p.kind for p in measured}):
        of_kind = sorted((p for p in measured if p.kind == kind), key=lambda p: p.index)
        third = len(of_kind) // 3
        if third < 10:
            continue
        first = sum(p.finish - p.arrival for p in of_kind[:third]) / third
        last = sum(p.finish - p.arrival for p in of_kind[-third:]) / third
        out[kind] = last / first if first > 0 else math.inf
    return out


def backlog_growth(programs: Sequence[ProgramResult], measured: Sequence[ProgramResult],
                   samples: int = 90) -> float:
    """Mean programs in the system (arrived, not finished) over the last third of the
    measured window's time, over that of the first third."""
    if len(measured) < 30:
        return 1.0
    arrivals = sorted(p.arrival for p in programs)
    finishes = sorted(p.finish for p in programs)
    start = min(p.arrival for p in measured)
    end = max(p.arrival for p in measured)
    step = (end - start) / (samples - 1)
    counts = [
        bisect.bisect_right(arrivals, t) - bisect.bisect_right(finishes, t)
        for t in (start + i * step for i in range(samples))
    ]
    third = samples // 3
    first = sum(counts[:third]) / third
    last = sum(counts[-third:]) / third
    return last / max(first, 1.0)


def summarize_run(run: RunResult, total: int, warmup: float, drain: float) -> dict[str, Any]:
    """Everything the bench reports about one run (seconds per token for latencies)."""
    measured = steady_state(run.programs, total, warmup, drain)
    out: dict[str, Any] = {"rate": run.rate, **latency_stats(p.token_latency for p in measured)}
    kinds = sorted({p.kind for p in measured})
    by_type: dict[str, dict[str, float]] = {}
    for kind in kinds:
        of_kind = [p for p in measured if p.kind == kind]
        stats = latency_stats(p.token_latency for p in of_kind)
        stats["mean_queue_wait_s"] = sum(p.queue_wait for p in of_kind) / len(of_kind)
        stats["mean_response_s"] = sum(p.finish - p.arrival for p in of_kind) / len(of_kind)
        by_type[kind] = stats
    out["p95_by_type"] = {k: v["p95_token_latency"] for k, v in by_type.items()}
    out["mean_by_type"] = {k: v["mean_token_latency"] for k, v in by_type.items()}
    out["by_type"] = by_type
    out["critical_path"] = {
        **latency_stats(p.cp_token_latency for p in measured),
        "p95_by_type": {
            kind: latency_stats(p.cp_token_latency for p in measured if p.kind == kind)[
                "p95_token_latency"]
            for kind in kinds
        },
    }
    growth = response_growth(measured)
    out["response_growth"] = growth
    out["backlog_growth"] = backlog = backlog_growth(run.programs, measured)
    out["stable"] = (
        all(g <= GROWTH_LIMIT for g in growth.values())
        and backlog <= GROWTH_LIMIT
        and len(run.programs) == total
    )
    out["mean_queue_wait_s"] = (
        sum(p.queue_wait for p in measured) / len(measured) if measured else 0.0
    )
    out["cache_hit_rate"] = run.engine.get("cache_hit_rate", 0.0)
    out["engine"] = {**run.engine, "busy_fraction": busy_fraction(run, total, warmup, drain)}
    out["scheduler"] = dict(run.scheduler)
    out["completed_programs"] = len(run.programs)
    out["virtual_s"] = run.virtual_s
    out["wall_s"] = run.wall_s
    out["cpu_s"] = run.cpu_s
    out["calls"] = run.calls
    return out
