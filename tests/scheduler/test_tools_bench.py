"""`progserve bench tools`: both modes run end to end on the sim engine and show the gains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progserve.cli import main


def test_bench_parallel_virtual_time(tmp_path: Path) -> None:
    out, png = tmp_path / "parallel.json", tmp_path / "parallel.png"
    args = ["bench", "tools", "--mode", "parallel", "--clock", "virtual", "--n", "5"]
    assert main([*args, "--no-progress", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert report["tools_correct"]  # the calculator summed the searches' results via $k
    assert report["speedup"] >= 2.0
    assert report["speedup"] >= 0.95 * report["ideal_speedup"]
    assert set(report["by_searches"]) == {"2", "3", "4", "5", "6"}
    assert 0 < report["latency_reduction"] < 1
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_bench_partial_real_time(tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    args = ["bench", "tools", "--mode", "partial", "--n", "1", "--time-scale", "0.5"]
    assert main([*args, "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == {"code", "search", "plan"}
    assert all(w["all_ok"] for w in report["workloads"].values())
    assert report["latency_reduction_workload"] == "code"
    assert report["latency_reduction"] > 0.25  # lenient: real time on a shared CI machine
    assert all(w["with_mean_s"] < w["without_mean_s"] for w in report["workloads"].values())
