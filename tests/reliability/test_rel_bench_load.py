"""`progserve bench load` end to end at a small size: a real `progserve serve` subprocess,
client processes, every program accounted for (completed + failed + lost = programs) and
none lost; the JSON report carries the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_load_runs_every_program_and_loses_none(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "bench", "load", "--programs", "60",
         "--clients", "2", "--warmup", "2", "--settle", "0.2", "--time-scale", "0.05",
         "--rounds", "2", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["programs"] == 120  # two rounds of 60
    assert report["completed"] == 120 and report["failed"] == 0 and report["lost"] == 0
    assert report["server_unfinished"] == 0
    assert report["lost_programs"] == []  # lost ones are named here, by id and error
    assert report["requests"] >= 120 * 3
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    for key in ("rss_before_mb", "rss_during_mb", "rss_after_mb"):
        assert report[key] > 0
    assert len(report["rss_after_rounds_mb"]) == 2
    first, last = report["rss_after_rounds_mb"]
    assert report["rss_growth_after_first_round_pct"] == round(100 * (last / first - 1), 1)
    assert "RSS growth after the first round" in proc.stdout
    assert "lost" in proc.stdout and "p50" in proc.stdout


def test_the_report_names_lost_programs():
    from progserve.bench.load import LOST, LoadConfig, ProgramResult, _report

    results = [ProgramResult("p-ok", "native", "completed", 0.1, 3),
               ProgramResult("p-lost", "openai", LOST, 0.2, 2,
                             error="ReadError: POST /v1/chat/... (call turn-1)")]
    report = _report(LoadConfig(), results, [0.01], 1.0, None, None, None, 0)
    assert report.lost == 1
    assert report.lost_programs == [{"program_id": "p-lost", "api": "openai",
                                     "error": "ReadError: POST /v1/chat/... (call turn-1)"}]
