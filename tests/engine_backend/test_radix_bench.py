"""`progserve bench radix` runs end to end and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from progserve.bench.radix import AgentTrace, ProgserveSide, TraceConfig, run_sides


def test_bench_radix_prints_ops_per_second(tmp_path: Path) -> None:
    out = tmp_path / "radix.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "bench", "radix", "--ops", "300",
         "--capacity", "20000", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "ops/s" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["ops"] for r in report["results"]] == [300, 300]
    for result in report["results"]:
        assert result["ops_per_s"] > 0
        assert 0 < result["hit_rate"] < 1
        assert result["evicted_tokens"] > 0  # the capacity is small enough to evict
        assert result["tree_tokens"] <= 20000


def test_trace_is_deterministic_per_seed() -> None:
    def prompts(seed: int) -> list[list[int]]:
        return [r.prompt for r in AgentTrace(TraceConfig(ops=50, seed=seed))]

    assert prompts(1) == prompts(1)
    assert prompts(1) != prompts(2)


def test_all_sides_see_the_same_hits() -> None:
    config = TraceConfig(ops=200, seed=3)
    for eviction in ("lru", "priority"):
        sides = [ProgserveSide(capacity=30_000, eviction=eviction, encode_once=encode_once)
                 for encode_once in (True, False)]
        tokenkey, lists = run_sides(AgentTrace(config), sides)
        assert tokenkey.ops == lists.ops == 200
        assert tokenkey.matched_tokens == lists.matched_tokens > 0
        assert tokenkey.evicted_tokens == lists.evicted_tokens > 0
        assert tokenkey.tree_tokens == lists.tree_tokens <= 30_000
