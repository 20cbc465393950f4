"""A small OpenAI-compatible server whose features are switched on one by one, so that each
of the probe's findings can be seen both ways (`make_fake_openai(features, model_dir)`).

Features (the probe's names, plus two variants of partial support):
- completions, chat, stream, usage_in_stream, logprobs, top_logprobs, tool_calls;
- cached_tokens: a prompt seen before reports all but its last word as cached;
- cache_salt: the salt is part of the cache key (without it the salt is ignored);
- priority: the field is validated (non-int -> 400) and calls run one at a time, lowest
  value first (without it every field is ignored and calls run in arrival order);
  `priority_fcfs`: validated and accepted, but served in arrival order;
  `tool_args_off_schema`: tool calls whose arguments are a JSON string, not an object;
- chat_template: the model id is `model_dir` (with a template), and `/tokenize` renders
  chat with it; `/metrics` shows `vllm:num_requests_running`.
A "token" is a whitespace-separated word; a call takes 0.1 ms per prompt word (a prompt of
2,000 words or more, the probe's order-check blocker, 1.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ALL_FEATURES = frozenset({
    "completions", "chat", "stream", "usage_in_stream", "logprobs", "top_logprobs",
    "cached_tokens", "cache_salt", "priority", "tool_calls", "chat_template",
})
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                   "code": status}}, status_code=status)


class FakeEngine:
    """One call at a time, ordered by (priority, arrival) or by arrival alone."""

    def __init__(self, by_priority: bool):
        self.by_priority = by_priority
        self.running = 0
        self._queue: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def run(self, words: int, priority: int) -> None:
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The probe's order-check blocker (3,000 words) runs long enough to be seen
        # running on a busy machine; everything else is quick.
        seconds = 1.5 if words >= 2000 else words * 1e-4
        heapq.heappush(self._queue, (priority if self.by_priority else 0, next(self._seq),
                                     seconds, done))
        self._wake.set()  # type: ignore[union-attr]
        await done

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                _, _, seconds, done = heapq.heappop(self._queue)
                self.running = 1
                await asyncio.sleep(seconds)
                self.running = 0
                done.set_result(None)


def make_fake_openai(features: frozenset[str] | set[str], model_dir: Path) -> Starlette:
    features = frozenset(features)
    model = str(model_dir) if "chat_template" in features else "fake-model"
    validates_priority = bool({"priority", "priority_fcfs"} & features)
    engine = FakeEngine(by_priority="priority" in features)
    seen: set[tuple[str, str]] = set()

    def template() -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True
                                             ).from_string((model_dir / "chat_template.jinja")
                                                           .read_text())

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "max_model_len": 8192}]})

    def usage(prompt: str, salt: Any, completion: int) -> dict[str, Any]:
        words = prompt.split()
        key = (str(salt) if "cache_salt" in features and salt else "", prompt)
        cached = max(0, len(words) - 1) if key in seen else 0
        seen.add(key)
        out: dict[str, Any] = {"prompt_tokens": len(words), "completion_tokens": completion,
                               "total_tokens": len(words) + completion}
        if "cached_tokens" in features:
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out

    def logprobs(n: int, top: int | None) -> dict[str, Any] | None:
        if "logprobs" not in features or not top:
            return None
        alternatives = [{" a": -0.5, " b": -1.5}] * n if "top_logprobs" in features else None
        return {"tokens": [" a"] * n, "token_logprobs": [-0.5] * n,
                "top_logprobs": alternatives, "text_offset": list(range(n))}

    async def admit(body: dict[str, Any]) -> Response | None:
        """Validate what this fake claims to support, then wait for the engine."""
        priority = body.get("priority", 0)
        if validates_priority and not isinstance(priority, int):
            return _error(400, "priority: Input should be a valid integer")
        if not validates_priority:
            priority = 0
        if body.get("stream") and "stream" not in features:
            return _error(400, "streaming is not supported")
        await engine.run(len(str(body.get("prompt", "")).split()), priority)
        return None

    async def completions(request: Request) -> Response:
        if "completions" not in features:
            return _error(404, "Not Found")
        body = await request.json()
        refused = await admit(body)
        if refused is not None:
            return refused
        n = max(1, int(body.get("max_tokens") or 1))
        lp = logprobs(n, body.get("logprobs"))
        use = usage(str(body["prompt"]), body.get("cache_salt"), n)
        if body.get("stream"):
            return StreamingResponse(_events(n, lp, use, body), media_type="text/event-stream")
        return JSONResponse({"object": "text_completion", "choices": [
            {"index": 0, "text": " a" * n, "logprobs": lp, "finish_reason": "length"}],
            "usage": use})

    async def _events(n: int, lp: dict[str, Any] | None, use: dict[str, Any],
                      body: dict[str, Any]) -> Any:
        for i in range(n):
            choice = {"index": 0, "text": " a", "logprobs": lp and {
                k: v[i:i + 1] if isinstance(v, list) else v for k, v in lp.items()},
                "finish_reason": "length" if i == n - 1 else None}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        wants = (body.get("stream_options") or {}).get("include_usage")
        if wants and "usage_in_stream" in features:
            yield f"data: {json.dumps({'choices': [], 'usage': use})}\n\n"
        yield "data: [DONE]\n\n"

    async def chat(request: Request) -> Response:
        if "chat" not in features:
            return _error(404, "Not Found")
        body = await request.json()
        message: dict[str, Any] = {"role": "assistant", "content": "hello"}
        if body.get("tools") and body.get("tool_choice") != "none":
            if "tool_calls" not in features:
                return _error(400, "tools are not supported")
            name = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(
                     "Paris" if "tool_args_off_schema" in features else {"city": "Paris"})}}]}
        return JSONResponse({"object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage(json.dumps(body["messages"]), None, 1)})

    async def tokenize(request: Request) -> Response:
        if "chat_template" not in features:
            return _error(404, "Not Found")
        body = await request.json()
        if "messages" in body:
            text = template().render(messages=body["messages"],
                                     add_generation_prompt=body.get("add_generation_prompt"))
        else:
            text = body["prompt"]
        return JSONResponse({"tokens": [hash(w) % 50_000 for w in text.split()]})

    async def metrics(_: Request) -> Response:
        return PlainTextResponse(f'vllm:num_requests_running{{engine="0"}} '
                                 f"{float(engine.running)}\n")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        yield
        await engine.close()

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]), Route("/metrics", metrics),
    ])


def write_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path
