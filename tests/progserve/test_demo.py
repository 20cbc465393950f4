"""`progserve demo` (the README's main job) runs every example program through one server,
and says whether each example's answer is right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_all_programs_on_the_sim_engine(tmp_path: Path) -> None:
    out_file = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "demo", "--engine", "sim", "--json",
         str(out_file)],
        capture_output=True,
        text=True,
        timeout=240,
        # A plain terminal; PYTHONPATH kept, so a checkout runs its own examples.
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
             **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    examples = ("react_agent", "map_reduce_summary", "tree_search", "multi_agent_debate",
                "llm_compiler")
    for example in examples:
        assert example in out
    assert "exit " not in out  # no example failed
    assert "/ui" in out and "Tracing UI" in out
    assert "check" in out and "FAILED" not in out  # the table's check column
    report = json.loads(out_file.read_text())
    assert report["engine"] == "sim" and report["passed"] is True
    by_name = {e["name"]: e for e in report["examples"]}
    assert set(by_name) == set(examples)
    for entry in report["examples"]:
        assert entry["check"]["passed"] is True and entry["check"]["expected"]
    assert by_name["react_agent"]["answer"] == "395"  # the calculator's answer
    assert by_name["tree_search"]["answer"].endswith("= 24")
    assert by_name["llm_compiler"]["answer"] == "172"
