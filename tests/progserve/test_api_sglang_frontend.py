"""SGLang's own frontend language runs unchanged against progserve: an `sgl.function` using
gen, select, fork and streaming, through `sgl.RuntimeEndpoint`.

Needs SGLang's frontend (`bash scripts/install_sglang_frontend.sh`; `scripts/test.sh`
runs it). Importing sglang takes a while, hence `slow`.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

sgl = pytest.importorskip("sglang", reason="run scripts/install_sglang_frontend.sh")

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[1] / "fixtures" / "sim_script.json"
CHOICES = ["yes", "no", "maybe"]


@sgl.function
def sky_agent(s, topic):
    s += "Q: Is the sky blue? A: " + sgl.gen("answer", max_tokens=16, stop="\n")
    s += "\nVerdict: " + sgl.select("verdict", choices=CHOICES)
    branches = s.fork(2)
    for i, branch in enumerate(branches):
        branch += f"\nIdea {i} about {topic}: " + sgl.gen("idea", max_tokens=8)
    branches.join()
    s += "\nSummary: " + sgl.gen("summary", max_tokens=12)


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(
        sim={"time_scale": 0.02, "script_file": SCRIPT}))))


@pytest.fixture(scope="module")
def slow_server(serve_in_thread):
    """Real-time decoding, so a client sees a generation arrive piece by piece."""
    return serve_in_thread(create_app(ServerRuntime(Settings(
        sim={"time_scale": 1.0, "script_file": SCRIPT}))))


def check_state(state) -> None:
    assert state["answer"] == "yes, on a clear day."  # the scripted reply, stop-trimmed
    assert state["verdict"] in CHOICES
    assert state["summary"]
    text = state.text()
    assert "Verdict: " + state["verdict"] in text and text.endswith(state["summary"])


def test_gen_select_fork(server):
    endpoint = sgl.RuntimeEndpoint(server.url)
    assert endpoint.get_model_name() == "progserve/sim-llama-3-8b"
    state = sky_agent.run(topic="clouds", backend=endpoint)
    check_state(state)
    # Every LLM call went through progserve's scheduler as a program call.
    programs = httpx.get(server.url + "/v1/programs").json()["data"]
    assert len(programs) >= 6  # gen, select (prefix + choices), 2 fork gens, summary


def test_streaming(slow_server):
    endpoint = sgl.RuntimeEndpoint(slow_server.url)
    state = sky_agent.run(topic="rain", backend=endpoint, stream=True)
    pieces = list(state.text_iter("summary"))
    assert len(pieces) > 1 and "".join(pieces) == state["summary"]
    check_state(state)


def test_run_batch_and_server_helpers(server):
    endpoint = sgl.RuntimeEndpoint(server.url)
    states = sky_agent.run_batch([{"topic": "sun"}, {"topic": "moon"}], backend=endpoint)
    for state in states:
        check_state(state)
    assert endpoint.get_server_info()["model_path"] == "progserve/sim-llama-3-8b"
    endpoint.flush_cache()
