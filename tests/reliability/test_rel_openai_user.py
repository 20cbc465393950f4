"""Issue 18.12: OpenAI's `user` field is an end-user id (any string, for abuse
monitoring), not a program id. Before the fix it named the call's program:
`"user": "alice@example.com"` got 400 "invalid program id", and after
`DELETE /v1/programs/u1` every chat with `user=u1` got 409. Now any `user` is accepted
and names no program; programs are named by `X-Program-Id` / `metadata.program_id`."""

from __future__ import annotations

import httpx
import openai
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

USERS = ["alice@example.com", "u1", "名前 with spaces/and:slashes", "x" * 256]


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.01}))))


def ask(client: openai.OpenAI, user: str, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="m", max_tokens=2, user=user, messages=[{"role": "user", "content": "hi"}], **extra)


@pytest.mark.parametrize("user", USERS)
def test_any_user_string_is_accepted(server, user):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert ask(client, user).choices[0].finish_reason
    done = client.completions.create(model="m", prompt="hi", max_tokens=2, user=user)
    assert done.choices[0].text is not None


def test_a_cancelled_program_never_blocks_a_user(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    answer = ask(client, "u1").model_dump()
    # `user` named no program: the call ran as a one-call program of its own.
    assert httpx.get(server.url + "/v1/programs/u1").status_code == 404
    # A program explicitly named u1, cancelled, does not touch the user u1.
    first = client.chat.completions.with_raw_response.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Program-Id": "u1"})
    assert first.headers["x-program-id"] == "u1"
    assert httpx.delete(server.url + "/v1/programs/u1").status_code in (200, 204)
    for _ in range(3):
        assert ask(client, "u1").choices[0].finish_reason
    assert answer["choices"][0]["finish_reason"]
