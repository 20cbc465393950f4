"""A nested field of the wrong shape is a 400 naming the field, never a 500 (issue 18.11:
`response_format.json_schema` as a string, a list or a number raised AttributeError)."""

from __future__ import annotations

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.001}))))


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": "garbage"},
    {"type": "json_schema", "json_schema": ["a", "b"]},
    {"type": "json_schema", "json_schema": 7},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "garbage"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema"},
    {"type": "yaml"},
    {"type": 3},
    "json_object",
    ["json_object"],
    5,
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_response_format_is_a_400(server, response_format, stream):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": response_format, "stream": stream}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "response_format" in (error["param"] or "") + error["message"]
    assert "Traceback" not in resp.text and "AttributeError" not in resp.text


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_a_plain_text_response_format_still_answers(server, response_format):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": response_format}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
