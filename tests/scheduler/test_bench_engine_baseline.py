"""The engine-alone baseline (`bench --policies engine`), the SGLang-style cache-aware
router it uses, the swe workload, and the JSON keys of the comparison against it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from sched_fake_engine import FakeEngine

import progserve.bench.driver as driver
from engine_backend.sim import SimConfig, SimEngine
from engine_backend.types import GenerateRequest
from progserve.bench.driver import BenchSetup, run_trace
from progserve.bench.metrics import summarize_run
from progserve.bench.policies import ENGINE_ALONE, configuration
from progserve.bench.workloads import (
    SweShape,
    WorkloadParams,
    generate_trace,
    parse_mix,
    swe_contexts,
)
from scheduler.config import SchedulerConfig
from scheduler.program import CallNode, Program
from scheduler.replica import make_replicas
from scheduler.router import Router


class CountingEngine(SimEngine):
    """A sim engine that records the most requests it had in flight at once."""

    peak = 0
    active = 0

    def generate(self, request: GenerateRequest):
        inner = super().generate(request)

        async def stream():
            cls = CountingEngine
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            try:
                async for chunk in inner:
                    yield chunk
            finally:
                cls.active -= 1

        return stream()


def peak_in_flight(monkeypatch, name: str) -> tuple[int, dict]:
    """Run a burst of bfcl programs through the column `name` with a budget of 2 requests
    per replica: the most requests the engines had at once, and the run's summary."""
    CountingEngine.peak = CountingEngine.active = 0
    monkeypatch.setattr(driver, "SimEngine", CountingEngine)
    conf = configuration(name)
    setup = BenchSetup(2, SimConfig(stream_interval=0),
                       SchedulerConfig(keep_finished_programs=0, max_inflight_requests=2))
    trace = generate_trace("bfcl", 24, 5)
    run = run_trace(trace, conf.policy, 50.0, setup,
                    scheduler_overrides=dict(conf.scheduler), sim_overrides=dict(conf.sim))
    return CountingEngine.peak, summarize_run(run, 24, 0.0, 0.0)


def test_engine_alone_bypasses_the_queue_and_budget(monkeypatch):
    """The engine alone sends every call when its program issues it: more requests in
    flight than progserve's budget would allow, and no queue wait; fcfs with the budget
    holds calls back."""
    engine_peak, engine = peak_in_flight(monkeypatch, "engine")
    fcfs_peak, fcfs = peak_in_flight(monkeypatch, "fcfs")
    assert fcfs_peak <= 2 * 2
    assert engine_peak > 2 * 2
    assert engine["mean_queue_wait_s"] == 0
    assert fcfs["mean_queue_wait_s"] > 0


def test_engine_alone_has_every_progserve_mechanism_off():
    sched = dict(ENGINE_ALONE.scheduler)
    assert ENGINE_ALONE.policy == "fcfs"
    assert sched["retain_kv"] is False and sched["kv_admission"] is False
    assert sched["balance"] == "cache_aware"
    assert sched["max_inflight_requests"] >= 1 << 30
    assert dict(ENGINE_ALONE.sim)["eviction"] == "lru"


# ----------------------------------------------------------- the cache-aware router
def cache_aware_router(n: int = 3, **config):
    cfg = SchedulerConfig(balance="cache_aware", balance_abs_threshold=2, **config)
    replicas = make_replicas([FakeEngine() for _ in range(n)], cfg)
    return Router(cfg, replicas), replicas


def call_for(program: Program, tokens: list[int], seq: list[int] = [0]) -> CallNode:  # noqa: B006
    seq[0] += 1
    c = CallNode(id=f"c{seq[0]}", program=program, kind="llm", seq=seq[0], created_at=0)
    c.request = GenerateRequest(rid=c.id, input_ids=tokens)
    c.prompt_len = len(tokens)
    c.budget_tokens = len(tokens) + 16
    return c


def load(replica, n: int) -> None:
    for _ in range(n):
        replica.running.add(call_for(Program(id="x", tenant="t", arrival=0, seq=0), [1]))
        replica.inflight_requests += 1


def test_cache_aware_routes_to_the_best_match_above_the_threshold():
    router, replicas = cache_aware_router()
    p = Program(id="p", tenant="t", arrival=0, seq=0)
    system = list(range(1000, 1800))
    first = call_for(p, system)
    decision = router.choose(first)
    router.on_dispatch(first, decision.replica)  # inserted when routed, as SGLang does
    load(decision.replica, 1)
    again = router.choose(call_for(Program(id="q", tenant="t", arrival=0, seq=1),
                                   system + [5, 6]))
    assert again.replica is decision.replica


def test_cache_aware_below_the_threshold_picks_the_smallest_tree():
    router, replicas = cache_aware_router()
    p = Program(id="p", tenant="t", arrival=0, seq=0)
    for replica, size in ((replicas[0], 400), (replicas[2], 800)):
        call = call_for(p, list(range(size)))
        router.on_dispatch(call, replica)
    fresh = router.choose(call_for(p, list(range(50_000, 50_400))))
    assert fresh.replica is replicas[1]  # an empty tree


def test_cache_aware_balances_when_loads_are_imbalanced():
    router, replicas = cache_aware_router()
    p = Program(id="p", tenant="t", arrival=0, seq=0)
    system = list(range(1000, 1800))
    router.on_dispatch(call_for(p, system), replicas[0])
    load(replicas[0], 3)  # 3 - 0 > balance_abs_threshold 2: imbalanced
    decision = router.choose(call_for(p, system + [1, 2]))
    assert decision.replica is replicas[1]  # least loaded, not the cached one
    load(replicas[1], 2)
    load(replicas[2], 2)  # 3 - 2 <= 2: balanced again, the cache decides
    assert router.choose(call_for(p, system + [1, 2])).replica is replicas[0]


# ----------------------------------------------------------------- swe workload
def test_swe_workload_statistics():
    """Tens of turns, contexts growing to tens of thousands of tokens under the context
    limit, tool gaps of seconds with test runs of tens of seconds (workloads.py)."""
    trace = generate_trace("swe", 600, 1)
    params = WorkloadParams()
    shapes = [p.shape for p in trace.programs]
    assert all(isinstance(s, SweShape) for s in shapes)
    turns = [len(s.steps) for s in shapes]
    assert 12 <= statistics.mean(turns) <= 30 and max(turns) >= 30 and min(turns) >= 5
    finals = [swe_contexts(s, params)[-1] for s in shapes]
    assert 12_000 <= statistics.mean(finals) <= 24_000
    assert max(finals) <= params.swe_context_limit
    assert sum(f >= 20_000 for f in finals) / len(finals) > 0.2
    inputs = statistics.mean(sum(swe_contexts(s, params)) for s in shapes)
    assert 120_000 <= inputs <= 400_000  # ~250k input tokens per published attempt
    outputs = [o for s in shapes for o, _, _ in s.steps]
    assert 200 <= statistics.mean(outputs) <= 300
    gaps = sorted(lat for s in shapes for _, lat, _ in s.steps)
    assert 1.0 <= gaps[len(gaps) // 2] <= 3.0  # most commands take seconds
    assert gaps[int(0.95 * len(gaps))] >= 10.0  # test runs take tens of seconds
    assert generate_trace("swe", 600, 1).programs[7].shape == shapes[7]


def test_swe_joins_mixed_through_the_mix():
    trace = generate_trace("mixed", 30, 2, mix=parse_mix("swe=1,chat=2"))
    kinds = [p.kind for p in trace.programs]
    assert kinds.count("swe") == 10 and kinds.count("chat") == 20


def test_swe_programs_run_with_growing_contexts():
    trace = generate_trace("swe", 4, 3)
    setup = BenchSetup(1, SimConfig(stream_interval=0), SchedulerConfig(keep_finished_programs=0))
    run = run_trace(trace, "plas", 0.01, setup)
    assert len(run.programs) == 4
    calls = sum(len(p.shape.steps) for p in trace.programs)
    assert run.calls == calls
    prompts = run.engine["cache_query_tokens"] / calls
    assert prompts > 8_000  # long contexts
    assert run.engine["cache_hit_rate"] > 0.8  # each turn extends the last one's context


# ------------------------------------------------------------------ the JSON keys
@pytest.mark.slow
def test_bench_cli_reports_the_engine_baseline_and_the_ablation(tmp_path):
    out = tmp_path / "swe.json"
    cmd = [sys.executable, "-m", "progserve.cli", "bench", "--workload", "swe", "--programs",
           "10", "--replicas", "2", "--policies", "engine,fcfs,plas", "--rate", "0.05",
           "--unloaded-programs", "3", "--workers", "1", "--warmup", "0", "--drain", "0",
           "--kv-capacity", "60000", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    report = json.loads(out.read_text())
    pol = report["policies"]
    assert set(pol) == {"engine", "fcfs", "plas"}
    assert set(pol["engine"]) == set(pol["fcfs"])  # the same fields as every policy
    assert report["setup"]["sim"]["kv_capacity_tokens"] == 60_000
    vs = report["comparison"]["vs_engine"]
    for key in ("throughput_ratio", "mean_ratio", "p95_ratio", "worst_type_p95_ratio"):
        assert key in vs
    assert vs["best"] in {"fcfs", "plas"} or vs["best"].startswith("ablation:")
    rows = report["ablation"]
    assert [r["name"] for r in rows] == ["engine", "queue_budget", "program_aware",
                                        "kv_retention", "kv_admission", "affine_routing"]
    for row in rows:
        for key in ("name", "max_rate_at_slo", "mean_token_latency", "p95_token_latency",
                    "cache_hit_rate", "recomputed_tokens"):
            assert key in row
        assert row["mean_token_latency"] > 0 and 0 <= row["cache_hit_rate"] <= 1
    assert rows[0]["mean_token_latency"] == pol["engine"]["at_engine_knee"]["mean_token_latency"]
    gap = report["comparison"]["floor_gap_closed"]
    assert {"mean", "p95"} <= set(gap) and gap["policy"] == "plas"
    assert report["engine_knee"]["progserve_defaults"]["policy"] == "atlas"


def test_affinity_places_a_new_long_context_program_by_load_not_by_shared_prefix():
    """Every swe program starts with the same 3,000-token system prompt: the replica that
    cached it first must not collect every new program (its later calls stay there)."""
    cfg = SchedulerConfig(balance="affinity")
    replicas = make_replicas([FakeEngine() for _ in range(3)], cfg)
    router = Router(cfg, replicas)
    system = list(range(1000, 4000))
    old = Program(id="old", tenant="t", arrival=0, seq=0)
    first = call_for(old, system + [1])
    router.on_dispatch(first, replicas[0])
    router.on_finish(first, replicas[0], [])
    load(replicas[0], 2)
    new = Program(id="new", tenant="t", arrival=0, seq=1)
    decision = router.choose(call_for(new, system + list(range(9000, 9200))))
    assert decision.replica is not replicas[0] and not decision.wait_for_home
    # a short first call still goes where its prefix is cached
    short = router.choose(call_for(new, system[:1000] + [7]))
    assert short.replica is replicas[0]
