"""`progserve bench radix` runs end to end and reports what it measured."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from progserve.bench.radix import CONTAINERS, AgentTrace, ProgserveSide, TraceConfig, run_sides


def _bench(tmp_path: Path, *args: str, timeout: float = 120) -> dict:
    out = tmp_path / "radix.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "bench", "radix", *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout, check=True,
    )
    assert "end to end" in proc.stdout
    return json.loads(out.read_text())


def test_bench_radix_reports_end_to_end_and_tree_only(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--ops", "300", "--capacity", "20000", "--repeats", "2")
    assert report["container"] == "array" and report["repeats"] == 2
    assert report["ops_per_s"] > 0 and report["tree_ops_per_s"] > 0
    [ours] = report["results"]
    assert ours["ops"] == 300
    assert len(ours["ops_per_s_runs"]) == len(ours["tree_ops_per_s_runs"]) == 2
    assert 0 < ours["hit_rate"] == ours["tree_hit_rate"] < 1  # packing keys early changes no hit
    assert ours["evicted_tokens"] > 0  # the capacity is small enough to evict
    assert ours["tree_tokens"] <= 20000


def test_trace_is_deterministic_per_seed() -> None:
    def prompts(seed: int) -> list[list[int]]:
        return [r.prompt.tolist() for r in AgentTrace(TraceConfig(ops=50, seed=seed))]

    assert prompts(1) == prompts(1)
    assert prompts(1) != prompts(2)


def test_containers_hold_the_same_ids() -> None:
    config = TraceConfig(ops=20, seed=4)
    by_container = {
        name: [(list(r.prompt), list(r.output)) for r in AgentTrace(config, name)]
        for name in CONTAINERS if name != "torch" or importlib.util.find_spec("torch")
    }
    first = by_container.pop("array")
    for requests in by_container.values():
        assert [(list(map(int, p)), list(map(int, o))) for p, o in requests] == first


@pytest.mark.parametrize("eviction", ["lru", "priority"])
def test_every_mode_and_container_sees_the_same_hits(eviction: str) -> None:
    config = TraceConfig(ops=200, seed=3)
    results = []
    for container in ("array", "list", "numpy"):
        sides = [ProgserveSide(capacity=30_000, eviction=eviction, prepacked=prepacked)
                 for prepacked in (False, True)]
        results += run_sides(AgentTrace(config, container), sides)
    first = results[0]
    assert first.ops == 200 and first.matched_tokens > 0 and first.evicted_tokens > 0
    for result in results:
        assert (result.matched_tokens, result.evicted_tokens, result.tree_tokens) == (
            first.matched_tokens, first.evicted_tokens, first.tree_tokens)
        assert result.tree_tokens <= 30_000


def test_locks_are_released_after_every_request() -> None:
    side = ProgserveSide(capacity=30_000, eviction="lru", prepacked=False)
    run_sides(AgentTrace(TraceConfig(ops=100, seed=5)), [side])
    assert side.cache.protected_size() == 0


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang not installed")
def test_sglang_caches_run_side_by_side(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--ops", "150", "--capacity", "20000", "--repeats", "1",
                    "--compare-sglang", timeout=280)
    assert report["sglang_note"] is None, report["sglang_note"]
    names = [r["name"] for r in report["results"]]
    assert names == ["progserve RadixCache (lru)", "SGLang RadixCache (Python)",
                     "SGLang UnifiedRadixCache (Rust core)"]
    ours = report["results"][0]
    for theirs in report["results"][1:]:
        # The same requests and LRU evictions of the shortfall: the same hits (eviction
        # ties between leaves touched at the same instant may break differently).
        assert theirs["matched_tokens"] == pytest.approx(ours["matched_tokens"], rel=0.01)
        assert theirs["evicted_tokens"] == pytest.approx(ours["evicted_tokens"], rel=0.05)
        assert ours["matched_tokens"] > 0 and ours["evicted_tokens"] > 0
        assert theirs["ops_per_s"] > 0 and theirs["tree_ops_per_s"] > 0
        assert set(report["ratios"][theirs["name"]]) == {"ops_per_s", "tree_ops_per_s"}
    # Only model and quantisation code was cut short, never SGLang's cache modules.
    assert not [m for m in report["sglang_modules_cut_short"] if ".mem_cache." in m]


def test_sglang_side_gets_its_own_key_container_from_every_trace_container() -> None:
    from progserve.bench.radix_sglang import int64_array

    config = TraceConfig(ops=5, seed=6)
    expected = [r.prompt for r in AgentTrace(config, "array")]
    for container in CONTAINERS:
        if container == "torch" and not importlib.util.find_spec("torch"):
            continue
        got = [int64_array(r.prompt) for r in AgentTrace(config, container)]
        assert all(type(a) is type(b) and a.typecode == "q" for a, b in zip(got, expected,
                                                                           strict=True))
        assert got == expected
