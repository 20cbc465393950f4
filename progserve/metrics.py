"""Prometheus metrics of one progserve runtime, in its own `CollectorRegistry` (never the
process-global default, so two runtimes in one process never mix).

Two sources:
- scheduler events (`Metrics.on_event`, a scheduler listener): histograms of queue wait,
  TTFT, time per output token, program token latency and tool latency; counters of calls,
  tokens (prompt, cached, completion), preemptions, programs;
- a snapshot refreshed at scrape time (`Metrics.refresh`): queue depth per MLFQ level,
  in-flight requests and tokens per replica, programs by status, engine statistics
  (KV usage, radix cache hit rate, engine-side preemptions, busy seconds), and the state
  of the stores behind the program history and the traces (`progserve_store_*`: up or
  degraded, writes pending and dropped, outages, re-syncs after Redis lost data).

Event-driven series are tallied in plain dicts and lists as events come, and folded into
the Prometheus objects when scraped (`render`): a Prometheus update takes a lock and a
label lookup, and a call made some twenty of them.

Tenant isolation: only the `progserve_tenant_*` families carry a `tenant` label. A
tenant's scrape (`render(tenant=...)`) keeps its own series of those and drops every
other tenant's; the aggregate families carry no names.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine_backend.types import EngineStats
from scheduler.events import EventKind, SchedulerEvent
from scheduler.store import StoreHealth
from scheduler.views import SchedulerStats

if TYPE_CHECKING:
    from .observability import Observability

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TENANT_LABEL = "tenant"
MAX_TRACKED = 200_000  # open calls / programs whose start times are kept (a guard)
MAX_PENDING_OBSERVATIONS = 10_000  # folded in early past this (memory between scrapes)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
PROGRAM_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

StatsSource = Callable[[], "SchedulerStats | Awaitable[SchedulerStats]"]
EngineStatsSource = Callable[[], Awaitable[Sequence[EngineStats | None]]]
StoreHealthSource = Callable[[], Mapping[str, StoreHealth]]  # by store: history, traces


class _Bounded(OrderedDict[Any, Any]):
    """An insertion-ordered dict that forgets its oldest entries past `MAX_TRACKED`."""

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        if len(self) > MAX_TRACKED:
            self.popitem(last=False)


@dataclass(slots=True)
class _ProgramTally:
    started: float
    completion_tokens: int = 0


class _SnapshotCollector(Collector):
    """Gauges read from the scheduler's and the engines' statistics at scrape time."""

    def __init__(self, queue_levels: int) -> None:
        self.queue_levels = queue_levels
        self.scheduler: SchedulerStats | None = None
        self.engines: Sequence[EngineStats | None] = ()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.stores: Mapping[str, StoreHealth] = {}

    def collect(self) -> Iterator[Metric]:
        hit_rate = GaugeMetricFamily(
            "progserve_cache_hit_rate",
            "share of prompt tokens served from the prefix cache, over all calls so far",
        )
        hit_rate.add_metric(
            [], self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        )
        yield hit_rate
        if self.scheduler is not None:
            yield from _scheduler_families(self.scheduler, self.queue_levels)
        if self.engines:
            yield from _engine_families(self.engines)
        if self.stores:
            yield from _store_families(self.stores)


class _PauseHistogram(Collector):
    """`progserve_gc_pause_seconds{generation}`. Observed from inside the cycle collector,
    on whatever thread allocated, so neither a lock (Prometheus' own histogram takes one;
    the collector may have interrupted its holder) nor an allocation that grows between
    scrapes: fixed bucket counters, read at scrape time."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(GC_PAUSE_BUCKETS) + 1) for _ in range(3)]
        self.sums = [0.0, 0.0, 0.0]

    def observe(self, generation: int, seconds: float) -> None:
        self.counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS, seconds)] += 1
        self.sums[generation] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "progserve_gc_pause_seconds",
            "cycle-collector pauses of the server process, by generation (2: full passes)",
            labels=["generation"],
        )
        bounds = [*map(floatToGoString, GC_PAUSE_BUCKETS), "+Inf"]
        for generation, counts in enumerate(self.counts):
            if any(counts):
                cumulative = list(itertools.accumulate(counts))
                family.add_metric([str(generation)], list(zip(bounds, cumulative, strict=True)),
                                  self.sums[generation])
        yield family


def _scheduler_families(stats: SchedulerStats, queue_levels: int) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "progserve_queue_depth", "calls waiting in each policy queue level", labels=["level"]
    )
    by_level = {level: 0 for level in range(queue_levels)} | stats.queue_depth_by_level
    for level, count in sorted(by_level.items()):
        depth.add_metric([str(level)], count)
    yield depth
    yield GaugeMetricFamily(
        "progserve_queued_calls", "calls waiting to dispatch", value=stats.queued
    )
    yield GaugeMetricFamily(
        "progserve_running_calls", "calls running on engines", value=stats.running
    )
    inflight = GaugeMetricFamily(
        "progserve_inflight_requests", "requests in flight per engine replica", labels=["replica"]
    )
    inflight_tokens = GaugeMetricFamily(
        "progserve_inflight_tokens",
        "budget tokens in flight per engine replica",
        labels=["replica"],
    )
    for replica in stats.replicas:
        inflight.add_metric([str(replica.replica)], replica.inflight_requests)
        inflight_tokens.add_metric([str(replica.replica)], replica.inflight_tokens)
    yield inflight
    yield inflight_tokens
    programs = GaugeMetricFamily("progserve_programs", "programs by status", labels=["status"])
    for status, count in sorted(stats.programs_by_status.items()):
        programs.add_metric([status], count)
    yield programs
    yield GaugeMetricFamily(
        "progserve_programs_open", "programs not yet ended", value=stats.programs_open
    )
    yield GaugeMetricFamily(
        "progserve_retained_programs",
        "programs whose KV prefix is pinned while they wait",
        value=stats.retained_programs,
    )
    yield GaugeMetricFamily(
        "progserve_admission_held_programs",
        "new programs waiting for KV admission (the admitted ones' contexts fill the KV)",
        value=stats.admission_held_programs,
    )
    yield GaugeMetricFamily(
        "progserve_admission_kv_demand_tokens",
        "KV footprint of the admitted programs (their contexts less shared prefixes)",
        value=stats.admission_kv_demand_tokens,
    )
    yield CounterMetricFamily(
        "progserve_scheduler_preemptions",
        "calls preempted by the scheduler (abort-and-resume or demotion)",
        value=stats.preemptions,
    )
    yield CounterMetricFamily(
        "progserve_scheduler_promotions",
        "calls promoted to the top queue by anti-starvation",
        value=stats.promotions,
    )


def _engine_families(engines: Sequence[EngineStats | None]) -> Iterator[Metric]:
    specs = (
        ("progserve_engine_queue_length", "requests waiting inside the engine", "queue_len"),
        ("progserve_engine_running", "requests running inside the engine", "running"),
        ("progserve_engine_kv_usage", "share of the engine's KV capacity in use", "kv_usage"),
        ("progserve_engine_cache_hit_rate", "engine prefix-cache hit rate", "cache_hit_rate"),
    )
    for name, doc, attr in specs:
        family = GaugeMetricFamily(name, doc, labels=["replica"])
        for replica, stats in enumerate(engines):
            if stats is not None:
                family.add_metric([str(replica)], float(getattr(stats, attr)))
        yield family
    preempt = CounterMetricFamily(
        "progserve_engine_preemptions",
        "retractions / preemptions inside the engine (KV pressure)",
        labels=["replica"],
    )
    busy = CounterMetricFamily(
        "progserve_engine_busy_seconds",
        "seconds the engine spent running model steps (sim and torch engines); its rate is "
        "the engine's utilization",
        labels=["replica"],
    )
    for replica, stats in enumerate(engines):
        if stats is not None:
            preempt.add_metric([str(replica)], stats.preemptions)
            busy.add_metric([str(replica)], stats.busy_s)
    yield preempt
    yield busy


def _store_families(stores: Mapping[str, StoreHealth]) -> Iterator[Metric]:
    specs = (
        ("progserve_store_up", GaugeMetricFamily,
         "1 while the store's backend takes its writes, 0 while serving on local state "
         "(degraded, not down)", lambda h: float(h.status == "ok")),
        ("progserve_store_pending_writes", GaugeMetricFamily,
         "programs whose latest history or trace waits to reach the backend",
         lambda h: h.pending_writes),
        ("progserve_store_dropped_writes", CounterMetricFamily,
         "writes the backend kept refusing (or that overflowed during an outage), given up",
         lambda h: h.dropped_writes),
        ("progserve_store_outages", CounterMetricFamily,
         "times the store's backend became unreachable", lambda h: h.outages),
        ("progserve_store_resyncs", CounterMetricFamily,
         "times the backend had lost this instance's writes and got everything held back",
         lambda h: h.resyncs),
    )
    for name, kind, doc, read in specs:
        family = kind(name, doc, labels=["store", "backend"])
        for store, health in sorted(stores.items()):
            family.add_metric([store, health.backend], read(health))
        yield family


class Metrics:
    """The metrics of one runtime. Subscribe `on_event` to the scheduler; call `refresh`
    then `render` to serve a scrape."""

    def __init__(
        self,
        scheduler_stats: StatsSource | None = None,
        engine_stats: EngineStatsSource | None = None,
        *,
        queue_levels: int = 1,
        store_health: StoreHealthSource | None = None,
    ):
        self._scheduler_stats = scheduler_stats
        self._engine_stats = engine_stats
        self._store_health = store_health
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.calls = Counter(
            "progserve_calls", "calls ended, by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.queue_wait = Histogram(
            "progserve_queue_wait_seconds",
            "time a call waited in progserve's queue before dispatch",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "progserve_ttft_seconds",
            "time to first token of LLM calls, from dispatch",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "progserve_time_per_output_token_seconds",
            "decode time per generated token after the first, per LLM call",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.program_token_latency = Histogram(
            "progserve_program_token_latency_seconds",
            "program response time divided by the tokens it generated (Autellix)",
            buckets=PROGRAM_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "progserve_tokens",
            "tokens of ended LLM calls by type (prompt, cached, completion) and replica",
            ["type", "replica"],
            registry=r,
        )
        self.tool_latency = Histogram(
            "progserve_tool_latency_seconds",
            "tool call latency by tool",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "progserve_tool_calls",
            "tool calls ended, by tool and outcome",
            ["tool", "outcome"],
            registry=r,
        )
        self.preemptions = Counter(
            "progserve_preemptions", "calls preempted, by replica", ["replica"], registry=r
        )
        self.promotions = Counter(
            "progserve_promotions", "calls promoted by anti-starvation", registry=r
        )
        self.programs_started = Counter(
            "progserve_programs_started", "programs started", registry=r
        )
        self.programs_ended = Counter(
            "progserve_programs_ended", "programs ended, by status", ["status"], registry=r
        )
        self.tenant_programs = Counter(
            "progserve_tenant_programs", "programs started per tenant", [TENANT_LABEL], registry=r
        )
        self.tenant_calls = Counter(
            "progserve_tenant_calls", "calls ended per tenant", [TENANT_LABEL], registry=r
        )
        self.tenant_tokens = Counter(
            "progserve_tenant_tokens",
            "tokens per tenant, by type (prompt, completion)",
            [TENANT_LABEL, "type"],
            registry=r,
        )
        self._gc_pauses = _PauseHistogram()
        r.register(self._gc_pauses)
        self._snapshot = _SnapshotCollector(queue_levels)
        r.register(self._snapshot)
        self._first_token_at: _Bounded = _Bounded()
        self._tool_started_at: _Bounded = _Bounded()
        self._programs: _Bounded = _Bounded()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Not yet folded into the Prometheus objects (see the module docstring).
        self._counts: dict[tuple[Any, tuple[str, ...]], float] = {}
        self._observations: list[tuple[Any, tuple[str, ...], float]] = []
        # Applies observability events not yet applied (`EventBatch.flush`) before a scrape.
        self.catch_up: Callable[[], None] = _nothing

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, cached (the metric itself when it has no labels)."""
        if not labels:
            return metric
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _inc(self, metric: Any, *labels: str, amount: float = 1.0) -> None:
        key = (metric, labels)
        self._counts[key] = self._counts.get(key, 0.0) + amount

    def _observe(self, metric: Any, value: float, *labels: str) -> None:
        self._observations.append((metric, labels, value))
        if len(self._observations) > MAX_PENDING_OBSERVATIONS:
            self._fold()

    def _fold(self) -> None:
        """Tallies into the Prometheus objects."""
        counts, self._counts = self._counts, {}
        for (metric, labels), amount in counts.items():
            self._child(metric, labels).inc(amount)
        observations, self._observations = self._observations, []
        for metric, labels, value in observations:
            self._child(metric, labels).observe(value)

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        """A `collector.ServerCollector` sink (see `_PauseHistogram`)."""
        self._gc_pauses.observe(generation, seconds)

    # -- events --------------------------------------------------------------------------

    def on_event(self, ev: SchedulerEvent) -> None:
        handler = self._HANDLERS.get(ev.kind)  # one lookup, not a chain of comparisons
        if handler is not None:
            handler(self, ev)

    def _call_queued(self, ev: SchedulerEvent) -> None:
        if ev.with_program_start:  # a one-call program starts with its call
            self._program_started(ev)

    def _call_dispatched(self, ev: SchedulerEvent) -> None:
        if ev.queue_wait_s is not None:
            self._observe(self.queue_wait, ev.queue_wait_s)

    def _call_first_token(self, ev: SchedulerEvent) -> None:
        if ev.ttft_s is not None:
            self._observe(self.ttft, ev.ttft_s)
        self._first_token_at.put((ev.program_id, ev.call_id), ev.time)

    def _tool_started(self, ev: SchedulerEvent) -> None:
        self._tool_started_at.put((ev.program_id, ev.call_id), ev.time)

    def _call_preempted(self, ev: SchedulerEvent) -> None:
        self._inc(self.preemptions, _replica(ev.replica))

    def _call_promoted(self, ev: SchedulerEvent) -> None:
        self._inc(self.promotions)

    def _program_started(self, ev: SchedulerEvent) -> None:
        self._inc(self.programs_started)
        self._inc(self.tenant_programs, ev.tenant)
        self._programs.put(ev.program_id, _ProgramTally(ev.time))

    def _llm_call_ended(self, ev: SchedulerEvent) -> None:
        failed = ev.kind is EventKind.CALL_FAILED
        self._inc(self.calls, "llm", "failed" if failed else "finished")
        self._inc(self.tenant_calls, ev.tenant)
        replica = _replica(ev.replica)
        self._inc(self.tokens, "prompt", replica, amount=ev.prompt_tokens)
        self._inc(self.tokens, "cached", replica, amount=ev.cached_tokens)
        self._inc(self.tokens, "completion", replica, amount=ev.completion_tokens)
        self._inc(self.tenant_tokens, ev.tenant, "prompt", amount=ev.prompt_tokens)
        self._inc(self.tenant_tokens, ev.tenant, "completion", amount=ev.completion_tokens)
        self._snapshot.prompt_tokens += ev.prompt_tokens
        self._snapshot.cached_tokens += ev.cached_tokens
        if ev.with_first_token:  # what CALL_FIRST_TOKEN would have recorded
            first: float | None = ev.first_token_time()
            if ev.ttft_s is not None:
                self._observe(self.ttft, ev.ttft_s)
        else:
            first = self._first_token_at.pop((ev.program_id, ev.call_id), None)
        if not failed and first is not None and ev.completion_tokens > 1:
            self._observe(self.tpot, max(0.0, ev.time - first) / (ev.completion_tokens - 1))
        tally = self._programs.get(ev.program_id)
        if tally is not None:
            tally.completion_tokens += ev.completion_tokens
        if ev.with_program_end:  # a one-call program ends with its call
            self._program_ended(ev)

    def _tool_ended(self, ev: SchedulerEvent) -> None:
        tool = ev.tool or "unknown"
        failed = ev.kind is EventKind.TOOL_FAILED
        self._inc(self.calls, "tool", "failed" if failed else "finished")
        self._inc(self.tool_calls, tool, "failed" if failed else "finished")
        self._inc(self.tenant_calls, ev.tenant)
        started = self._tool_started_at.pop((ev.program_id, ev.call_id), None)
        latency = (
            ev.duration_s
            if ev.duration_s is not None
            else (ev.time - started if started is not None else None)
        )
        if latency is not None:
            self._observe(self.tool_latency, max(0.0, latency), tool)

    def _program_ended(self, ev: SchedulerEvent) -> None:
        self._inc(self.programs_ended, ev.status or "finished")
        tally = self._programs.pop(ev.program_id, None)
        if tally is not None and tally.completion_tokens > 0 and ev.status in (None, "finished"):
            self._observe(self.program_token_latency,
                          max(0.0, ev.time - tally.started) / tally.completion_tokens)

    _HANDLERS: Mapping[EventKind, Callable[[Metrics, SchedulerEvent], None]] = {
        EventKind.CALL_QUEUED: _call_queued,
        EventKind.CALL_DISPATCHED: _call_dispatched,
        EventKind.CALL_FIRST_TOKEN: _call_first_token,
        EventKind.CALL_FINISHED: _llm_call_ended,
        EventKind.CALL_FAILED: _llm_call_ended,
        EventKind.TOOL_STARTED: _tool_started,
        EventKind.TOOL_FINISHED: _tool_ended,
        EventKind.TOOL_FAILED: _tool_ended,
        EventKind.CALL_PREEMPTED: _call_preempted,
        EventKind.CALL_PROMOTED: _call_promoted,
        EventKind.PROGRAM_STARTED: _program_started,
        EventKind.PROGRAM_ENDED: _program_ended,
    }

    # -- scrape --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Pull the scheduler's and engines' statistics into the snapshot gauges."""
        self.catch_up()
        if self._scheduler_stats is not None:
            stats = self._scheduler_stats()
            self._snapshot.scheduler = await stats if inspect.isawaitable(stats) else stats
        if self._engine_stats is not None:
            self._snapshot.engines = list(await self._engine_stats())
        if self._store_health is not None:
            self._snapshot.stores = dict(self._store_health())

    def render(self, tenant: str | None = None) -> bytes:
        """The Prometheus text exposition: everything, or as `tenant` may see it."""
        self.catch_up()
        self._fold()
        if tenant is None:
            return generate_latest(self.registry)
        return generate_latest(_TenantView(self.registry, tenant))  # type: ignore[arg-type]


class _TenantView:
    """A registry view for one tenant: its own tenant-labelled series only. The rest
    (queue depths, engine load, latencies of every tenant's calls) is the server's load,
    which only admins see."""

    def __init__(self, registry: CollectorRegistry, tenant: str):
        self._registry = registry
        self._tenant = tenant

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            samples = [s for s in family.samples if s.labels.get(TENANT_LABEL) == self._tenant]
            if not samples:
                continue
            view = Metric(family.name, family.documentation, family.type, family.unit)
            view.samples = samples
            yield view


def _nothing() -> None:
    pass


def _replica(replica: int | None) -> str:
    return "none" if replica is None else str(replica)


def install_metrics(app: FastAPI) -> None:
    """Mount `GET /metrics` (Prometheus text format) on an app that has
    `app.state.observability` (see progserve/observability.py)."""

    async def metrics_endpoint(request: Request) -> Response:
        obs: Observability = request.app.state.observability
        tenant = obs.visible_tenant(request.headers)
        await obs.metrics.refresh()
        return Response(obs.metrics.render(tenant), media_type=CONTENT_TYPE)

    app.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        summary="Prometheus metrics (an admin key sees every tenant; a tenant only itself)",
        response_class=Response,
    )
