"""Issue 18.10: a replica killed mid-stream behind `--engine openai` (real processes,
SIGKILL). The calls it was serving resume on the other replica for the rest of their
`max_tokens` only: the client never receives more tokens than it asked for, and usage
counts exactly what it received. Where the tokens delivered cannot be counted (no usage
per chunk, no local tokenizer), the call fails clearly instead of resuming.

The upstreams are `FakeOpenAI` processes (tests/engine_backend/fake_openai.py): vLLM-like
(usage on every chunk, `continue_final_message`) or llama.cpp-like (no usage in streams).
Their model writes one word per token, 20 ms apart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import orjson
import pytest
from rel_support import wait_until

from progserve.app import create_app
from progserve.bench.server_process import free_port
from progserve.config import Settings
from progserve.runtime import ServerRuntime

pytestmark = pytest.mark.slow

FAKE = Path(__file__).parents[1] / "engine_backend" / "fake_openai.py"
sys.path.insert(0, str(FAKE.parent))
from fake_openai import word_tokenizer  # noqa: E402

MAX_TOKENS = 40


class FakeUpstream:
    def __init__(self, owned_by: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--port", str(self.port), "--owned-by", owned_by,
             "--token-delay", "0.02"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_up(self) -> FakeUpstream:
        def up() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(up, 30, poll_s=0.05)
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def upstreams(request):
    made: list[FakeUpstream] = []

    def start(owned_by: str) -> tuple[FakeUpstream, FakeUpstream]:
        pair = (FakeUpstream(owned_by), FakeUpstream(owned_by))
        made.extend(pair)
        return pair[0].wait_up(), pair[1].wait_up()

    yield start
    for upstream in made:
        upstream.kill()


def front_app(urls: list[str], **http_engine):
    return create_app(ServerRuntime(Settings(
        engine="openai", engine_url=urls, http_engine=http_engine,
        scheduler={"health_probe_interval_s": 0.2, "balance": "round_robin"})))


async def stream(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, dict, list]:
    """(text received, the usage event's usage, error events) of a streamed call."""
    text, usage, errors = "", {}, []
    async with client.stream("POST", path, json={**body, "stream": True, "stream_options": {
            "include_usage": True}}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            usage = event.get("usage") or usage
            for choice in event.get("choices", ()):
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text, usage, errors


def chat(i: int) -> dict:
    return {"model": "fake/model", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"Tell story number {i}"}]}


def completion(i: int) -> dict:
    return {"model": "fake/model", "max_tokens": MAX_TOKENS, "prompt": f"Story number {i}:"}


async def kill_mid_stream(front, victim: FakeUpstream) -> None:
    """Wait until the first replica streams two calls, let ~15 tokens go out, kill it."""
    engine = front.app.state.runtime.engines[0]
    await asyncio.to_thread(wait_until, lambda: len(engine.running) >= 2, 20)
    await asyncio.sleep(0.3)
    victim.kill()


async def test_resumed_calls_never_exceed_max_tokens_and_usage_counts_what_was_sent(
        upstreams, serve_in_thread):
    a, b = upstreams("vllm")  # exact counts on every chunk; chat answers continue
    front = serve_in_thread(front_app([a.url, b.url]))
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
        chats = [asyncio.create_task(stream(client, "/v1/chat/completions", chat(i)))
                 for i in range(4)]
        plain = [asyncio.create_task(client.post("/v1/chat/completions", json=chat(i)))
                 for i in range(4, 6)]
        await kill_mid_stream(front, a)
        streamed = await asyncio.gather(*chats)
        answers = [(await t).json() for t in plain]
    scheduler = front.app.state.runtime.scheduler
    assert scheduler.health.counters.failovers >= 2  # some calls really were resumed
    for text, usage, errors in streamed:
        assert not errors
        words = text.split()
        assert words == [f"w{i}" for i in range(MAX_TOKENS)]  # continued, not restarted
        assert usage["completion_tokens"] == len(words) == MAX_TOKENS
    for answer in answers:
        words = answer["choices"][0]["message"]["content"].split()
        assert len(words) == answer["usage"]["completion_tokens"] == MAX_TOKENS


async def test_a_local_tokenizer_counts_what_an_upstream_without_usage_delivered(
        upstreams, serve_in_thread, tmp_path):
    a, b = upstreams("llamacpp")  # no usage in streams
    front = serve_in_thread(front_app([a.url, b.url],
                                      tokenizer=str(word_tokenizer(tmp_path / "tok"))))
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
        calls = [asyncio.create_task(stream(client, "/v1/completions", completion(i)))
                 for i in range(4)]
        await kill_mid_stream(front, a)
        results = await asyncio.gather(*calls)
    assert front.app.state.runtime.scheduler.health.counters.failovers >= 2
    for text, usage, errors in results:
        assert not errors
        assert len(text.split()) == usage["completion_tokens"] == MAX_TOKENS


async def test_uncountable_output_fails_clearly_instead_of_resuming(upstreams, serve_in_thread):
    a, b = upstreams("llamacpp")  # no usage in streams, and no tokenizer configured
    front = serve_in_thread(front_app([a.url, b.url]))
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
        calls = [asyncio.create_task(stream(client, "/v1/completions", completion(i)))
                 for i in range(4)]
        await kill_mid_stream(front, a)
        results = await asyncio.gather(*calls)
    failed = [r for r in results if r[2]]
    assert failed  # the calls A was serving
    for text, _usage, errors in failed:
        assert "cannot resume on another replica" in errors[0]["message"]
        assert len(text.split()) < MAX_TOKENS
    for text, _usage, _errors in results:
        assert len(text.split()) <= MAX_TOKENS  # never more than asked for
