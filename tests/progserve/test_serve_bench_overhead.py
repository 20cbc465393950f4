"""`progserve bench overhead` runs end to end (short: this checks the harness, not the
numbers) and reports what it measured for every target."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from progserve.bench.overhead import ensure_wrk

pytestmark = pytest.mark.slow


def test_overhead_bench_reports_every_target(tmp_path):
    try:
        ensure_wrk()
    except SystemExit:
        pytest.skip("wrk is not installed and cannot be (needs root and apt)")
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "bench", "overhead", "--duration", "2",
         "--rounds", "2", "--warmup", "1", "--litellm", "off", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    generate = report["scenarios"]["generate"]
    assert generate["direct"]["requests"] > 0 and generate["direct"]["errors"] == 0
    proxied = generate["proxies"]["progserve(sglang)"]
    assert proxied["requests"] > 0 and proxied["errors"] == 0
    # Added latency pairs each proxy round with the direct round just before it.
    rounds = generate["rounds"]
    assert len(rounds["direct"]) == len(rounds["progserve(sglang)"]) == 2
    paired = [(p["p50_us"] - d["p50_us"]) / 1000
              for p, d in zip(rounds["progserve(sglang)"], rounds["direct"], strict=True)]
    assert proxied["p50_added_ms"] == pytest.approx(statistics.median(paired))
    assert proxied["requests"] == sum(r["requests"] for r in rounds["progserve(sglang)"])
    assert proxied["cpu_ms_per_request"]["progserve-sglang"] > 0
    chat = report["scenarios"]["chat"]
    assert set(chat["proxies"]) == {"progserve(sglang)", "progserve(openai)"}
    assert any("litellm" in note for note in report["notes"])  # why it is missing
    assert "+p50 ms" in proc.stdout
    # The verdict is the worst progserve path against --target-ms (1 ms by default).
    target = report["target"]
    added = [r["p50_added_ms"] for s in report["scenarios"].values()
             for r in s["proxies"].values()]
    assert target["worst_p50_added_ms"] == max(added)
    assert target["met"] is (max(added) <= target["p50_added_ms_max"] == 1.0)
    assert "target: progserve adds at most 1 ms at p50" in proc.stdout
    # requests/s of every target side by side, API keys on, one connection by default
    assert report["config"]["connections"] == 1 and report["config"]["api_keys"] is True
    for entry in report["scenarios"].values():
        assert entry["requests_per_s"]["direct"] == entry["direct"]["requests_per_s"] > 0
        for proxy, r in entry["proxies"].items():
            assert entry["requests_per_s"][proxy] == r["requests_per_s"] > 0
            assert r["added_p50_ms"] == r["p50_added_ms"]


def test_overhead_bench_with_connections_and_two_processes(tmp_path):
    """`--connections N` runs wrk with N connections; `--processes 2` spreads them over two
    `--engine openai` processes sharing a redis-server (both take requests)."""
    try:
        ensure_wrk()
    except SystemExit:
        pytest.skip("wrk is not installed and cannot be (needs root and apt)")
    if not (shutil.which("redis-server") or (Path(sys.executable).parent / "redis-server").exists()):
        pytest.skip("no redis-server binary (run scripts/ensure_redis.sh)")
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "bench", "overhead", "--duration", "1",
         "--rounds", "1", "--warmup", "1", "--litellm", "off", "--scenarios", "chat",
         "--connections", "4", "--processes", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["connections"] == 4 and report["config"]["openai_processes"] == 2
    assert report["config"]["redis"] is True
    chat = report["scenarios"]["chat"]
    openai_proxy = chat["proxies"]["progserve(openai)"]
    assert openai_proxy["errors"] == 0 and openai_proxy["requests_per_s"] > 0
    assert chat["requests_per_s"]["direct"] > 0
    cpu = openai_proxy["cpu_ms_per_request"]
    assert cpu["progserve-openai-0"] > 0 and cpu["progserve-openai-1"] > 0  # both served
    assert "4 connections" in proc.stdout
