"""`progserve demo` (the README's main job) runs every example program through one server."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_all_programs_on_the_sim_engine() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "demo", "--engine", "sim"],
        capture_output=True,
        text=True,
        timeout=240,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for example in ("react_agent", "map_reduce_summary", "tree_search", "multi_agent_debate",
                    "llm_compiler"):
        assert example in out
    assert "exit " not in out  # no example failed
    assert "/ui" in out and "Tracing UI" in out
    assert "17 * 23 + 4 = 395" in out  # the ReAct agent used the calculator's answer
