"""A fake OpenAI-compatible upstream with the behaviours of the real ones that matter to
`OpenAIHTTPEngine` (vLLM's and llama-cpp-python's, as issue 19 recorded them), for tests:
in-process behind `MockTransport` (`FakeOpenAI.transport()`), or as a real HTTP server
process that a test can kill (`python fake_openai.py --port N [--owned-by vllm]`).

Its model writes words: the answer to any prompt is ` w<k>` for k = 0, 1, ...; one word is
one token, and a prompt has as many tokens as whitespace-separated words (the tokenizer
`word_tokenizer` builds counts the same way). vLLM-like (`owned_by="vllm"`): rejects
`max_tokens: 0`, honours `continuous_usage_stats`, `continue_final_message`,
`cache_salt` and `/tokenize`. llama.cpp-like (`owned_by="llamacpp"`, llama-cpp-python):
treats `max_tokens: 0` as unlimited, sends no usage in streams, tokenizes at
`/extras/tokenize` (unless `tokenize` is False), and cuts a stream short (`[DONE]`
without a finish reason) after `cut_after` tokens, `cuts` times.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine_backend.http.transport import MockResponse, MockTransport, Request

UNLIMITED = 10_000  # what "no limit" means here


def words(text: str) -> int:
    return len(text.split())


@dataclass
class FakeOpenAI:
    owned_by: str = "vllm"
    model: str = "fake/model"
    token_delay_s: float = 0.0
    cut_after: int | None = None  # llama.cpp: end streams early without a finish reason
    cuts: int = 1
    die_after: int | None = None  # break the connection after this many tokens
    logprobs: bool = True
    tokenize: bool = True
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def vllm(self) -> bool:
        return self.owned_by == "vllm"

    # ------------------------------------------------------------------ routing

    def handle(self, method: str, path: str, body: dict[str, Any] | None
               ) -> tuple[int, str, AsyncIterator[bytes] | bytes]:
        """(status, content type, body) for one request."""
        self.requests.append((path, body or {}))
        if method == "GET" and path == "/v1/models":
            return self._json({"object": "list", "data": [{
                "id": self.model, "object": "model", "owned_by": self.owned_by,
                "max_model_len": 2048}]})
        if method == "GET" and path == "/health":
            return 200, "text/plain", b""
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            return self._generate(path, body or {})
        if method == "POST" and path == "/tokenize" and self.vllm:
            text = body.get("prompt") if body else ""
            if body and "messages" in body:
                text = " ".join(str(m.get("content") or "") for m in body["messages"])
            return self._json({"count": words(text or ""), "tokens": [], "max_model_len": 2048})
        if method == "POST" and path == "/extras/tokenize" and not self.vllm and self.tokenize:
            return self._json({"tokens": list(range(words((body or {}).get("input") or "")))})
        return 404, "application/json", b'{"detail":"Not Found"}'

    def _json(self, data: Any, status: int = 200) -> tuple[int, str, bytes]:
        return status, "application/json", orjson.dumps(data)

    def sent(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.requests if p == path]

    # ------------------------------------------------------------------ generation

    def _generate(self, path: str, body: dict[str, Any]) -> tuple[int, str, Any]:
        chat = path.endswith("chat/completions")
        max_tokens = body.get("max_tokens")
        if max_tokens == 0 and self.vllm:
            return self._json({"error": {"message": "max_tokens must be at least 1, got 0",
                                         "type": "BadRequestError", "code": 400}}, 400)
        limit = UNLIMITED if max_tokens in (None, 0) else int(max_tokens)
        if chat:
            messages = body.get("messages") or []
            start = 0
            if body.get("continue_final_message") and self.vllm and messages:
                start = words(str(messages[-1].get("content") or ""))
            prompt = words(" ".join(str(m.get("content") or "") for m in messages))
        else:
            text = body.get("prompt") or ""
            start = 0
            prompt = words(text)
            if body.get("echo"):
                limit = min(limit, 1)
        answer = [f" w{start + i}" for i in range(limit)]
        if body.get("stream"):
            return 200, "text/event-stream", self._events(body, chat, prompt, answer)
        return self._json(self._whole(body, chat, prompt, answer))

    def _whole(self, body: dict[str, Any], chat: bool, prompt: int, answer: list[str]
               ) -> dict[str, Any]:
        text = "".join(answer)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(answer),
                 "total_tokens": prompt + len(answer)}
        if chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length",
                                      "message": {"role": "assistant", "content": text},
                                      "logprobs": self._chat_logprobs(body, answer)}
        else:
            tokens = answer
            if body.get("echo"):
                tokens = [f" p{i}" for i in range(prompt)] + answer
                text = "".join(tokens[:prompt]) + text
            choice = {"index": 0, "text": text, "finish_reason": "length",
                      "logprobs": self._completion_logprobs(body, tokens, echo=bool(
                          body.get("echo")), prompt=prompt)}
        return {"id": "fake", "object": "x", "model": self.model, "choices": [choice],
                "usage": usage}

    def _completion_logprobs(self, body: dict[str, Any], tokens: list[str], *, echo: bool = False,
                             prompt: int = 0) -> dict[str, Any] | None:
        if not body.get("logprobs") or not self.logprobs:
            return None
        n = int(body["logprobs"])
        values = [-0.5 for _ in tokens]
        if echo and prompt:
            values[0] = None  # type: ignore[call-overload]
        return {"tokens": tokens, "token_logprobs": values,
                "top_logprobs": [{t: -0.5, **{f" alt{j}": -1.0 - j for j in range(n - 1)}}
                                 for t in tokens],
                "text_offset": [0] * len(tokens)}

    def _chat_logprobs(self, body: dict[str, Any], tokens: list[str]) -> dict[str, Any] | None:
        if not body.get("logprobs") or not self.logprobs:
            return None
        n = int(body.get("top_logprobs") or 0)
        return {"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": t, "logprob": -0.5}] +
                             [{"token": f" alt{j}", "logprob": -1.0 - j} for j in range(n - 1)]}
                            for t in tokens]}

    async def _events(self, body: dict[str, Any], chat: bool, prompt: int,
                      answer: list[str]) -> AsyncIterator[bytes]:
        options = body.get("stream_options") or {}
        usage_each = self.vllm and options.get("continuous_usage_stats")
        usage_end = self.vllm and options.get("include_usage")
        cut = self.cut_after if self.cuts > 0 else None
        for i, token in enumerate(answer):
            if cut is not None and i == cut:
                self.cuts -= 1
                yield b"data: [DONE]\n\n"  # llama-cpp-python's interruption
                return
            if self.die_after is not None and i == self.die_after:
                raise ConnectionResetError("the fake upstream died")
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            last = i == len(answer) - 1
            event = self._chunk(body, chat, token, "length" if last else None)
            if usage_each:
                event["usage"] = {"prompt_tokens": prompt, "completion_tokens": i + 1,
                                  "total_tokens": prompt + i + 1}
            yield b"data: " + orjson.dumps(event) + b"\n\n"
        if usage_end:
            yield b"data: " + orjson.dumps({"id": "fake", "choices": [], "usage": {
                "prompt_tokens": prompt, "completion_tokens": len(answer),
                "total_tokens": prompt + len(answer)}}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _chunk(self, body: dict[str, Any], chat: bool, token: str,
               finish: str | None) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": token},
                                      "logprobs": self._chat_logprobs(body, [token]),
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": token, "finish_reason": finish,
                      "logprobs": self._completion_logprobs(body, [token])}
        return {"id": "fake", "object": "chunk", "model": self.model, "choices": [choice]}

    # ------------------------------------------------------------------ adapters

    def transport(self) -> MockTransport:
        def answer(request: Request) -> MockResponse:
            status, kind, data = self.handle(request.method, request.target, request.json())
            return MockResponse(status, data, {"content-type": kind})

        return MockTransport(answer)

    def asgi(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            status, kind, data = self.handle(scope["method"], scope["path"],
                                             orjson.loads(raw) if raw else None)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", kind.encode())]})
            if isinstance(data, bytes):
                await send({"type": "http.response.body", "body": data})
                return
            async for piece in data:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        return app


def word_tokenizer(directory: Path) -> Path:
    """A `tokenizer.json` that counts whitespace-separated words, as the fake does."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(64)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def main() -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--owned-by", default="vllm")
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    fake = FakeOpenAI(owned_by=args.owned_by, token_delay_s=args.token_delay)
    uvicorn.run(fake.asgi(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

