"""`progserve bench engine` end to end (on the tiny model, so it takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["torch_support"]  # tiny-model fixtures


def test_bench_engine_reports_cold_and_cached_ttft(tiny_gqa: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "-m", "progserve.cli", "bench", "engine", "--model", str(tiny_gqa),
           "--prefix-tokens", "600", "--repeats", "2", "--decode-tokens", "3", "--batch", "2",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["prefix_tokens"] == 600
    assert len(result["ttft_cold_s"]) == len(result["ttft_cached_s"]) == 2
    # The cached request reuses the whole shared prefix, the cold one nothing.
    assert all(600 <= hit < result["prompt_tokens"] for hit in result["cached_tokens"])
    assert result["speedup"] == result["ttft_cold_median_s"] / result["ttft_cached_median_s"]
    assert result["speedup"] > 1.0
    assert set(result["decode_tok_s"]) == {"1", "2"}
    assert "speedup" in proc.stdout
