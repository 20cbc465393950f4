"""Two runtimes, same program: the remote runtime against a real progserve server
(uvicorn on a free loopback port) gives what the embedded runtime gives."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from frontend_lang import (
    CallFailedError,
    ProgramNotFoundError,
    ProgramResult,
    RuntimeUnavailableError,
    UnknownVariableError,
    fork,
    gen,
    join,
    program,
    select,
    tool,
)
from frontend_lang.context import current_context
from frontend_lang.runtime_remote import RemoteRuntime

SCRIPT = [
    {"pattern": r"Echo: (\w+)", "reply": r"echo \1"},
    {"pattern": r"Pick a colour", "reply": "blue"},
    {"pattern": r"Idea:\Z", "reply": "an idea"},
    {"pattern": "Write", "reply": "word " * 4000},
]


def double(text: str) -> str:
    return text * 2


@program
async def showcase(word: str) -> dict[str, object]:
    first = gen(f"Echo: {word}", max_tokens=8, temperature=0, name="first")
    total = tool("calculator", expression="6 * 7")
    twice = tool(double, text=first)
    echoed = gen(f"Echo: {total} {twice}", max_tokens=8, temperature=0)
    colour = select("Pick a colour:", ["red", "blue"])
    branches = fork(2, "Brainstorm about boxes.\n")
    for branch in branches:
        branch += "Idea:"
        branch.gen(max_tokens=8, temperature=0)
    streamed = [delta async for delta in first.stream()]
    return {
        "first": await first,
        "streamed": "".join(streamed),
        "echoed": await echoed,
        "colour": await colour,
        "ideas": await join(branches),
    }


async def test_the_same_program_gives_the_same_result_on_both_runtimes(make_local, progserve_url):
    local = await make_local(SCRIPT)
    async with RemoteRuntime(await progserve_url(SCRIPT)) as remote:
        remote_result: ProgramResult = await showcase.run(remote, "hello")
    local_result: ProgramResult = await showcase.run(local, "hello")
    expected = {
        "first": "echo hello",
        "streamed": "echo hello",
        "echoed": "echo 42",
        "colour": "blue",
        "ideas": ["an idea", "an idea"],
    }
    assert local_result.value == expected
    assert remote_result.value == expected
    for result in (local_result, remote_result):
        assert result.state is not None and result.state.status == "finished"
        assert result.calls == 8  # 6 on the server (incl. the fork's prefill) + 1 client tool
        assert result.latency_s > 0


async def test_remote_errors_name_the_variable_and_the_call(progserve_url):
    @program
    async def divide() -> str:
        ratio = tool("calculator", expression="1 / 0", name="ratio")
        return await gen(f"Echo: {ratio}", max_tokens=8, name="report")

    @program
    async def typo() -> str:
        return await gen("Echo: {{nothing}}", max_tokens=8)

    async with RemoteRuntime(await progserve_url(SCRIPT)) as remote:
        with pytest.raises(CallFailedError) as info:
            await divide.run(remote)
        with pytest.raises(UnknownVariableError, match="'nothing'"):
            await typo.run(remote)
    error = info.value
    assert (error.call_id, error.variable) == ("gen_1", "report")
    assert "'ratio'" in str(error) and "'tool_1'" in str(error)
    assert "division by zero" in str(error).lower()


async def test_remote_cancel_cancels_the_calls_on_the_server(progserve_url):
    url = await progserve_url(SCRIPT)
    started = asyncio.Event()
    ids: list[str] = []

    @program
    async def long_story() -> list[str]:
        ids.append(current_context().program_id)
        parts = [gen(f"Write part {i}", max_tokens=4000) for i in range(2)]
        started.set()
        return [await p for p in parts]

    async with RemoteRuntime(url) as remote:
        task = asyncio.create_task(long_story.run(remote))
        await started.wait()
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        state = await remote.program_state(ids[0])
    assert state.status == "cancelled"
    assert {c.status for c in state.calls} <= {"cancelled", "failed"}


async def test_an_unreachable_server_is_a_typed_error():
    @program
    async def hello() -> str:
        return await gen("Echo: hi", max_tokens=4)

    async with RemoteRuntime("http://127.0.0.1:9", connect_timeout_s=1.0) as remote:
        with pytest.raises(RuntimeUnavailableError):
            await hello.run(remote)


async def test_api_keys_map_to_tenants_that_see_only_their_programs(progserve_url):
    url = await progserve_url(SCRIPT, api_keys={"key-a": "acme", "key-b": "globex"})

    @program
    async def hello() -> str:
        return await gen("Echo: tenant", max_tokens=4, temperature=0)

    async with RemoteRuntime(url, api_key="key-a") as acme:
        result = await hello.run(acme)
        assert result.value == "echo tenant"
        assert (await acme.program_state(result.program_id)).tenant == "acme"
    async with RemoteRuntime(url, api_key="key-b") as globex:
        with pytest.raises(ProgramNotFoundError):
            await globex.program_state(result.program_id)
    async with RemoteRuntime(url, api_key="wrong") as stranger:
        with pytest.raises(RuntimeUnavailableError, match="401"):
            await hello.run(stranger)


class StatusRecorder(httpx.AsyncHTTPTransport):
    """The real transport, noting each response's status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


async def test_an_overloaded_server_is_retried_after_its_retry_after(progserve_url):
    # One request doing new work at a time: a stream that is still open fills the server.
    limits = {"max_inflight_requests": 1, "retry_after_min_s": 0.2, "retry_after_max_s": 0.5}
    url = await progserve_url(SCRIPT, limits=limits)

    @program
    async def hello() -> str:
        return await gen("Echo: patient", max_tokens=4, temperature=0)

    async with httpx.AsyncClient(base_url=url) as client:
        body = {"text": "Write a lot", "sampling_params": {"max_new_tokens": 600}, "stream": True}
        async with client.stream("POST", "/generate", json=body) as busy:
            assert busy.status_code == 200
            recorder = StatusRecorder()
            async with RemoteRuntime(url, transport=recorder) as remote:
                program_task = asyncio.create_task(hello.run(remote))
                await asyncio.sleep(0.1)
                async for _ in busy.aiter_bytes():  # let the stream finish: capacity frees
                    pass
                result = await program_task
    assert result.value == "echo patient"
    assert recorder.statuses[0] == 429 and 201 in recorder.statuses
