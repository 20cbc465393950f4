"""The SGLang-compatible native API (`/generate` and friends) against a real uvicorn
server serving the sim engine, checked field by field against SGLang's wire format."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

SCRIPT = Path(__file__).parents[1] / "fixtures" / "sim_script.json"


def _app(time_scale: float) -> object:
    return create_app(ServerRuntime(Settings(sim={"time_scale": time_scale, "script_file": SCRIPT})))


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(_app(0.02))


@pytest.fixture(scope="module")
def slow_server(serve_in_thread):
    """Real-time decoding (a few ms per token): long generations to abort."""
    return serve_in_thread(_app(1.0))


def sse_events(resp: httpx.Response) -> list[object]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_model_and_server_info(server):
    for path in ("/get_model_info", "/model_info"):
        info = httpx.get(server.url + path).json()
        assert info["model_path"] == "progserve/sim-llama-3-8b"
        assert info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(server.url + path).json()
        assert info["model_path"] == "progserve/sim-llama-3-8b"
        assert info["context_length"] > 0 and info["engine"] == "sim"


def test_generate_single(server):
    resp = httpx.post(server.url + "/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 32, "temperature": 0},
        "rid": "my-rid-1"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["text"] == " Paris, a city on the Seine."
    meta = body["meta_info"]
    assert meta["id"] == "my-rid-1"
    assert meta["finish_reason"]["type"] == "stop"
    assert meta["prompt_tokens"] > 0
    assert meta["completion_tokens"] == len(body["output_ids"]) > 0
    assert meta["cached_tokens"] >= 0
    assert "input_token_logprobs" not in meta


def test_generate_length_finish_and_input_ids(server):
    body = httpx.post(server.url + "/generate", json={
        "input_ids": [11, 22, 33, 44],  # a synthetic reply of random length: ignore_eos
        "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}).json()
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert body["meta_info"]["prompt_tokens"] == 4
    assert len(body["output_ids"]) == 5


def test_generate_batch(server):
    resp = httpx.post(server.url + "/generate", json={
        "text": ["The capital of France is", "Q: Is the sky blue? A: "],
        "sampling_params": [{"max_new_tokens": 32}, {"max_new_tokens": 2}],
        "rid": ["b-1", "b-2"]})
    batch = resp.json()
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["text"] == " Paris, a city on the Seine."
    assert batch[0]["meta_info"]["id"] == "b-1"
    assert batch[1]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


def test_generate_stream_is_cumulative(server):
    with httpx.stream("POST", server.url + "/generate", json={
            "text": "Tell me a story.", "stream": True,
            "sampling_params": {"max_new_tokens": 24, "ignore_eos": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 3
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["text"].startswith(before["text"])  # cumulative, as SGLang sends it
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert last["meta_info"]["completion_tokens"] == 24 == len(last["output_ids"])


def test_generate_batch_stream_tags_events_with_index(server):
    with httpx.stream("POST", server.url + "/generate", json={
            "text": ["one two", "three four"], "stream": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    finals = {e["index"]: e for e in events[:-1] if e["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1]
    assert all(len(e["output_ids"]) == 6 for e in finals.values())


def test_logprobs_in_sglang_shape(server):
    prompt = "Q: Is the sky blue? A: yes"
    head = httpx.post(server.url + "/generate", json={
        "text": prompt, "sampling_params": {"max_new_tokens": 0}}).json()
    prompt_tokens = head["meta_info"]["prompt_tokens"]
    assert head["text"] == "" and head["meta_info"]["completion_tokens"] == 0

    body = httpx.post(server.url + "/generate", json={
        "text": prompt, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True},
        "return_logprob": True, "logprob_start_len": 2, "return_text_in_logprobs": True,
    }).json()
    meta = body["meta_info"]
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inputs) == prompt_tokens - 2
    assert len(outputs) == 3 == len(body["output_ids"])
    for logprob, token_id, text in inputs + outputs:
        assert logprob is None or logprob <= 0
        assert isinstance(token_id, int) and isinstance(text, str)
    assert [e[1] for e in outputs] == body["output_ids"]
    assert "".join(e[2] for e in outputs) == body["text"]

    # Without return_text_in_logprobs the text slot is null, as in SGLang.
    bare = httpx.post(server.url + "/generate", json={
        "text": prompt, "sampling_params": {"max_new_tokens": 1},
        "return_logprob": True, "logprob_start_len": 0}).json()["meta_info"]
    assert bare["input_token_logprobs"][0][0] is None  # the first prompt token
    assert all(entry[2] is None for entry in bare["input_token_logprobs"])


def test_sglang_frontend_sampling_params_are_accepted(server):
    # What sgl.RuntimeEndpoint sends for a gen() call (SglSamplingParams.to_srt_kwargs).
    params = {"skip_special_tokens": True, "spaces_between_special_tokens": True,
              "max_new_tokens": 8, "min_new_tokens": 0, "n": 1, "stop": [],
              "stop_token_ids": None, "stop_regex": None, "temperature": 1.0, "top_p": 1.0,
              "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
              "ignore_eos": False, "regex": None, "json_schema": None}
    resp = httpx.post(server.url + "/generate", json={"text": "Hi", "sampling_params": params})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("body", [
    {"text": "x", "input_ids": [1]},
    {},
    {"text": []},
    {"text": ["a", "b"], "rid": ["only-one"]},
    {"text": "x", "sampling_params": {"max_new_tokens": -1}},
    {"text": "x", "sampling_params": {"temperature": "hot"}},
    {"text": "x", "sampling_params": {"n": 4}},
    {"text": "x", "sampling_params": {"max_new_tokens": 10**9}},
    {"text": "x", "return_logprob": True, "logprob_start_len": -5},
    {"text": "x", "return_logprob": True, "top_logprobs_num": 1000},
    {"input_ids": [[]]},
])
def test_bad_generate_requests_are_400(server, body):
    resp = httpx.post(server.url + "/generate", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]


def test_duplicate_rid_in_flight_is_400(slow_server):
    body = {"text": "long", "rid": "dup-rid", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with httpx.stream("POST", slow_server.url + "/generate", json=body) as first:
        lines = first.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)
        again = httpx.post(slow_server.url + "/generate", json=body)
        assert again.status_code == 400
        assert httpx.post(slow_server.url + "/abort_request",
                          json={"rid": "dup-rid"}).status_code == 200


def test_abort_request_ends_a_stream_with_abort(slow_server):
    rid = "to-abort"
    with httpx.stream("POST", slow_server.url + "/generate", json={
            "text": "Write forever", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["meta_info"]["finish_reason"] is None
        aborted = httpx.post(slow_server.url + "/abort_request", json={"rid": rid})
        assert aborted.status_code == 200 and aborted.json()["aborted"] == 1
        events = [line for line in lines if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][5:])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 4000


def test_abort_request_ends_a_non_streamed_call(slow_server):
    rid = "to-abort-2"
    result: dict[str, object] = {}

    def call() -> None:
        result["body"] = httpx.post(slow_server.url + "/generate", timeout=60, json={
            "text": "Write forever", "rid": rid,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}).json()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.post(slow_server.url + "/abort_request", json={"rid": rid}).json()["aborted"]:
            break
        time.sleep(0.05)
    thread.join(30)
    meta = result["body"]["meta_info"]  # type: ignore[index]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["id"] == rid


def test_abort_unknown_rid_is_a_no_op(server):
    resp = httpx.post(server.url + "/abort_request", json={"rid": "never-seen"})
    assert resp.status_code == 200 and resp.json()["aborted"] == 0
    resp = httpx.post(server.url + "/abort_request", json={"abort_all": True})
    assert resp.status_code == 200


def test_flush_cache(server):
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    refused = httpx.get(server.url + "/flush_cache")  # an operator action is never a GET
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    prompt = "A long shared prefix for the cache. " * 20
    httpx.post(server.url + "/generate", json={"text": prompt,
                                               "sampling_params": {"max_new_tokens": 1}})
    warm = httpx.post(server.url + "/generate", json={
        "text": prompt, "sampling_params": {"max_new_tokens": 1}}).json()["meta_info"]
    assert warm["cached_tokens"] > 0
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    cold = httpx.post(server.url + "/generate", json={
        "text": prompt, "sampling_params": {"max_new_tokens": 1}}).json()["meta_info"]
    assert cold["cached_tokens"] == 0


def test_program_headers_group_generate_calls(server):
    headers = {"X-Program-Id": "sgl-prog"}
    first = httpx.post(server.url + "/generate", headers=headers, json={
        "text": "step one", "sampling_params": {"max_new_tokens": 2}})
    httpx.post(server.url + "/generate", headers={
        **headers, "X-Parent-Call-Ids": first.headers["x-call-id"], "X-Program-End": "1"},
        json={"text": "step two", "sampling_params": {"max_new_tokens": 2}})
    state = httpx.get(server.url + "/v1/programs/sgl-prog").json()
    assert state["status"] == "finished" and len(state["calls"]) == 2
