"""Bench workloads follow their published statistics; metrics and the JSON contract."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest

from engine_backend.sim import SimConfig
from progserve.bench.driver import BenchSetup, ProgramResult, run_trace
from progserve.bench.metrics import backlog_growth, percentile, steady_state, summarize_run
from progserve.bench.workloads import (
    BfclShape,
    ChatShape,
    LatsShape,
    MapReduceShape,
    count_calls,
    generate_trace,
    mix_kinds,
    parse_mix,
)
from scheduler.config import SchedulerConfig


def test_traces_are_deterministic_per_seed():
    a, b = generate_trace("mixed", 50, 7), generate_trace("mixed", 50, 7)
    c = generate_trace("mixed", 50, 8)
    assert [p.shape for p in a.programs] == [p.shape for p in b.programs]
    assert [p.unit_arrival for p in a.programs] == [p.unit_arrival for p in b.programs]
    assert [p.shape for p in a.programs] != [p.shape for p in c.programs]


def test_workload_statistics_match_the_published_figures():
    chat = generate_trace("chat", 3000, 1)
    assert statistics.mean(len(p.shape.turns) for p in chat.programs) == pytest.approx(6.7, rel=0.08)
    bfcl = generate_trace("bfcl", 3000, 1)
    assert statistics.mean(len(p.shape.steps) for p in bfcl.programs) == pytest.approx(10.75, rel=0.05)
    assert statistics.mean(o for p in bfcl.programs for o, _, _ in p.shape.steps) == \
        pytest.approx(34, rel=0.08)
    lats = generate_trace("lats", 500, 1)
    assert statistics.mean(count_calls(p.shape) for p in lats.programs) == pytest.approx(161, rel=0.05)
    mixed = generate_trace("mixed", 999, 1)
    kinds = [p.kind for p in mixed.programs]
    assert kinds.count("chat") == kinds.count("bfcl") == kinds.count("lats") == 333
    gaps = [b.unit_arrival - a.unit_arrival for a, b in zip(mixed.programs, mixed.programs[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1.0, rel=0.1)  # unit-rate Poisson


def test_default_mix_keeps_the_equal_thirds_trace():
    # Pinned from before mixes existed: documented results stay reproducible.
    kinds = [p.kind for p in generate_trace("mixed", 12, 5).programs]
    assert kinds == ["chat", "chat", "lats", "chat", "lats", "bfcl", "bfcl", "lats", "lats",
                     "bfcl", "chat", "bfcl"]
    explicit = generate_trace("mixed", 12, 5, mix=parse_mix("chat,bfcl,lats"))
    assert [p.kind for p in explicit.programs] == kinds


def test_a_weighted_mix_gives_each_type_its_share_in_every_prefix():
    mix = parse_mix("chat=2, bfcl=1, lats=0.5, mapreduce=0.5")
    kinds = mix_kinds(mix, 400)
    assert [kinds.count(k) for k in ("chat", "bfcl", "lats", "mapreduce")] == [200, 100, 50, 50]
    first = kinds[:8]
    assert first.count("chat") == 4 and first.count("bfcl") == 2
    trace = generate_trace("mixed", 400, 2, mix=mix)
    assert sorted(p.kind for p in trace.programs) == sorted(kinds)  # shuffled, same counts
    assert any(isinstance(p.shape, MapReduceShape) for p in trace.programs)
    only_lats = generate_trace("mixed", 20, 2, mix=parse_mix("lats=1,chat=0"))
    assert {p.kind for p in only_lats.programs} == {"lats"}


@pytest.mark.parametrize("text, message", [
    ("chat=1,poker=1", "unknown program type 'poker'"),
    ("chat=1,chat=2", "appears twice"),
    ("chat=x", "not a number"),
    ("chat=-1", ">= 0"),
    ("chat=0", "at least one"),
    ("", "at least one"),
])
def test_bad_mixes_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(text)


def test_a_mix_only_applies_to_the_mixed_workload():
    with pytest.raises(ValueError, match="mixed workload"):
        generate_trace("chat", 10, 0, mix=parse_mix("chat=1"))


def test_percentile_and_steady_state_window():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 95) == pytest.approx(9.5)

    class R:
        def __init__(self, i):
            self.index = i

    kept = steady_state([R(i) for i in range(100)], 100, 0.1, 0.2)
    assert [r.index for r in kept] == list(range(10, 80))


def test_backlog_growth_catches_a_type_starved_until_arrivals_stop():
    def program(i, finish):
        return ProgramResult(i, "x", float(i), finish, tokens=10, cp_tokens=10, calls=1)

    steady = [program(i, i + 5.0) for i in range(300)]
    assert backlog_growth(steady, steady) == pytest.approx(1.0, abs=0.1)
    # Every third program is starved: it finishes only after the last arrival. Its
    # response times shrink by arrival order, but the system fills up.
    starved = [program(i, 400.0 if i % 3 == 0 else i + 5.0) for i in range(300)]
    assert backlog_growth(starved, starved) > 1.5


def small_setup(replicas=2):
    return BenchSetup(replicas, SimConfig(stream_interval=0),
                      SchedulerConfig(keep_finished_programs=0))


def test_bfcl_prompts_average_about_735_tokens_and_runs_complete():
    trace = generate_trace("bfcl", 30, 3)
    prompts = []
    run = run_trace(trace, "plas", 2.0, small_setup())
    assert len(run.programs) == 30
    assert run.calls == sum(count_calls(p.shape) for p in trace.programs)
    for p in trace.programs:
        shape = p.shape
        assert isinstance(shape, BfclShape)
    # the engine saw the prompts: prompt tokens per call ~735
    prompts = run.engine["cache_query_tokens"] / run.calls
    assert 550 < prompts < 950
    assert run.engine["cache_hit_rate"] > 0.3  # shared headers/docs and growing contexts


def test_dag_programs_measure_their_critical_path():
    trace = generate_trace("mapreduce", 6, 2)
    run = run_trace(trace, "atlas", 0.01, small_setup(1))
    for result, program in zip(run.programs, trace.programs, strict=True):
        shape = program.shape
        assert isinstance(shape, MapReduceShape)
        assert result.tokens == sum(o for _, o in shape.chunks) + shape.reduce_tokens
        # a map's output plus the reduce's: fewer than all tokens
        assert result.cp_tokens < result.tokens
        assert result.cp_tokens >= shape.reduce_tokens + min(o for _, o in shape.chunks)


def test_summary_reports_per_type_figures():
    trace = generate_trace("mixed", 9, 4)
    trace.programs = [p for p in trace.programs if not isinstance(p.shape, LatsShape)]
    run = run_trace(trace, "fcfs", 0.5, small_setup())
    summary = summarize_run(run, 9, 0.0, 0.0)
    assert set(summary["p95_by_type"]) <= {"chat", "bfcl"}
    assert summary["count"] == len(trace.programs)
    assert summary["p50_token_latency"] <= summary["p95_token_latency"]
    assert any(isinstance(p.shape, ChatShape) for p in trace.programs)
    assert 0 < summary["engine"]["busy_fraction"] <= 1


def test_engine_busy_fraction_rises_with_load():
    """Programs far apart leave the engines idle between them (tools run, nothing else
    arrives); arriving together they keep them busy."""
    trace = generate_trace("bfcl", 12, 1)
    busy = [summarize_run(run_trace(trace, "fcfs", rate, small_setup()), 12, 0.0, 0.0)
            ["engine"]["busy_fraction"] for rate in (0.02, 20.0)]
    assert 0 < busy[0] < 0.5 < busy[1] <= 1


@pytest.mark.slow
def test_bench_cli_writes_the_contracted_json(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "progserve.cli", "bench", "--workload", "bfcl", "--programs",
           "40", "--replicas", "2", "--policies", "fcfs,plas", "--seed", "3", "--rate", "1.5",
           "--unloaded-programs", "10", "--workers", "1", "--retention-kv-capacity", "20000",
           "--json", str(out), "--plot", str(png)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    for key in ("workload", "programs", "replicas", "seed", "load_point"):
        assert key in report
    assert report["load_point"]["rate"] == 1.5
    for name in ("fcfs", "plas"):
        entry = report["policies"][name]
        for key in ("max_rate_at_slo", "p50_token_latency", "p95_token_latency",
                    "p99_token_latency", "mean_token_latency", "cache_hit_rate"):
            assert key in entry
        for key in ("mean_token_latency", "p50_token_latency", "p95_token_latency",
                    "p95_by_type"):
            assert key in entry["at_load"]
        assert set(entry["at_load"]["p95_by_type"]) == {"bfcl"}
    assert "differences" in report["setup"]
    speed = report["speed"]  # the bench's own cost: CPU time per LLM call at the load point
    calls = [report["policies"][name]["at_load"]["calls"] for name in ("fcfs", "plas")]
    assert speed["llm_calls"] == sum(calls) > 0
    assert speed["by_policy"]["plas"]["llm_calls"] == calls[1]
    assert 0 < speed["us_per_llm_call"] < 1e5
    floor = report["comparison"]["floor"]
    assert 0 < floor["mean_ratio"] <= 1.5 and 0 < floor["p95_ratio"] <= 1.5
    retention = report["retention"]
    assert 0 <= retention["lru"]["cache_hit_rate"] <= 1
    assert "cache_hit_gain_points" in retention
    [point] = retention["curve"]  # a fixed capacity: one point of the curve
    assert point["kv_capacity_tokens"] == 20_000
    assert point["lru_cache_hit_rate"] == retention["lru"]["cache_hit_rate"]
    assert point["retention_cache_hit_rate"] == retention["retention"]["cache_hit_rate"]
    assert point["retention_mean_token_latency"] == retention["retention"]["mean_token_latency"]
    assert point["lru_mean_token_latency"] == retention["lru"]["mean_token_latency"]
    assert set(retention["variants"]) == {"lru", "retention", "ended_first"}
    assert 0 <= retention["ended_first"]["cache_hit_rate"] <= 1
    assert point["ended_first_cache_hit_rate"] == retention["ended_first"]["cache_hit_rate"]
    assert png.stat().st_size > 10_000


def test_bench_cli_runs_a_custom_mix_and_reports_it(tmp_path):
    out = tmp_path / "mix.json"
    cmd = [sys.executable, "-m", "progserve.cli", "bench", "--workload", "mixed", "--mix",
           "chat=2,mapreduce=1", "--programs", "12", "--replicas", "2", "--policies", "fcfs",
           "--rate", "0.5", "--unloaded-programs", "3", "--workers", "1", "--warmup", "0",
           "--drain", "0", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["mix"] == {"weights": {"chat": 2.0, "mapreduce": 1.0},
                             "programs_by_type": {"chat": 8, "mapreduce": 4}, "default": False}
    assert set(report["policies"]["fcfs"]["at_load"]["p95_by_type"]) == {"chat", "mapreduce"}
    bad = subprocess.run([*cmd[:6], "--mix", "chat=1,quiz=2", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown program type 'quiz'" in bad.stderr
    not_mixed = subprocess.run([*cmd[:5], "chat", "--mix", "chat=1"], capture_output=True,
                               text=True, timeout=120)
    assert not_mixed.returncode != 0 and "--mix applies to --workload mixed" in not_mixed.stderr


@pytest.mark.parametrize("start", [20_000, 40_000, 200_000])
def test_retention_runs_at_the_mildest_pressure_where_lru_is_under_80(start):
    from progserve.bench.policies import mildest_pressure

    def hit_at(capacity: int) -> float:  # LRU's hit rate rises with capacity
        return min(0.99, capacity / 80_000)

    tried = []

    def try_lru(capacity: int) -> dict:
        tried.append(capacity)
        return {"cache_hit_rate": hit_at(capacity)}

    capacity, lru = mildest_pressure(start, try_lru(start), try_lru)
    assert lru["cache_hit_rate"] == hit_at(capacity) < 0.8
    # 2% more capacity would reach 80%: the mildest qualifying pressure, found by the
    # x0.85 bracket and three bisections of it
    assert hit_at(int(capacity * 1.02)) >= 0.8
    assert len(tried) <= 1 + 12 + 3


def test_tenants_by_type_give_each_program_type_its_own_tenant():
    trace = generate_trace("mixed", 9, 4)
    trace.programs = [p for p in trace.programs if not isinstance(p.shape, LatsShape)]
    kinds = {p.kind for p in trace.programs}
    one = run_trace(trace, "dlpm", 0.5, small_setup())
    by_type = run_trace(trace, "dlpm", 0.5, replace(small_setup(), tenants="by-type"))
    assert set(one.scheduler["calls_by_tenant"]) == {"default"}
    assert set(by_type.scheduler["calls_by_tenant"]) == kinds and len(kinds) > 1
    assert sum(by_type.scheduler["calls_by_tenant"].values()) == one.calls == by_type.calls
    assert [p.tokens for p in by_type.programs] == [p.tokens for p in one.programs]
