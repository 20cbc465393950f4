"""Program-level latency statistics (Autellix's metric) over a run's steady state.

Token latency of a program = its response time (finish - arrival) divided by the tokens it
generated along its critical path; for a sequential program (chat, bfcl) that is all its
tokens, for a DAG (lats, mapreduce) the tokens of the chain of calls that decided when it
finished. Statistics skip the warm-up (the first `warmup` share of programs by arrival)
and the drain (the last `drain` share), where the load is not yet / no longer steady.
"""

from __future__ import annotations

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
    out["mean_queue_wait_s"] = (
        sum(p.queue_wait for p in measured) / len(measured) if measured else 0.0
    )
    out["cache_hit_rate"] = run.engine.get("cache_hit_rate", 0.0)
    out["engine"] = dict(run.engine)
    out["scheduler"] = dict(run.scheduler)
    out["completed_programs"] = len(run.programs)
    out["virtual_s"] = run.virtual_s
    out["wall_s"] = run.wall_s
    out["cpu_s"] = run.cpu_s
    out["calls"] = run.calls
    return out
