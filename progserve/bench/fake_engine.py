"""A fast fake engine server for `progserve bench overhead`: canned answers in SGLang's and
OpenAI's protocols, from a bare asyncio protocol (uvloop and httptools when installed).

It does no work per request beyond parsing HTTP, so it sustains many times what a Python
proxy does on one core, and a proxy's requests/s measured in front of it is the proxy's
own ceiling (the sim engine server, `progserve serve --engine sim`, is itself a progserve
process: in front of it a proxy measures the pair). Every answer is a real, complete
answer of its protocol: `/v1/chat/completions` and `/v1/completions` (JSON, or SSE when
the body asks for `"stream": true`), `/generate` (SGLang), `/v1/models`,
`/get_model_info`, `/get_server_info`, `/health`; anything else is a 404.

    python -m progserve.bench.fake_engine --port 31000
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import Any

import orjson

MODEL = "fake-engine"
_TEXT = " one two three four five six seven eight"
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}


def _json(status: int, body: Any) -> bytes:
    data = orjson.dumps(body)
    reason = b"OK" if status == 200 else b"Not Found"
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (status, reason, len(data))) + data


def _sse(events: list[Any]) -> bytes:
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
            % len(data)) + data


def _answers() -> dict[tuple[bytes, bytes, bool], bytes]:
    """(method, path, streamed) -> the whole HTTP response, built once."""
    chat = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _TEXT},
                         "logprobs": None, "finish_reason": "length"}], "usage": _USAGE}
    chat_chunks = [
        {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": _TEXT},
                      "logprobs": None, "finish_reason": None}]},
        {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
         "usage": _USAGE}]
    completion = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": MODEL,
                  "choices": [{"index": 0, "text": _TEXT, "logprobs": None,
                               "finish_reason": "length"}], "usage": _USAGE}
    completion_chunks = [
        {**completion, "choices": [{"index": 0, "text": _TEXT, "logprobs": None,
                                    "finish_reason": "length"}], "usage": _USAGE}]
    meta = {"id": "fake", "prompt_tokens": 12, "completion_tokens": 8, "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": 8}}
    generate = {"text": _TEXT, "meta_info": meta}
    models = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                          "owned_by": "fake", "max_model_len": 8192}]}
    info = {"model_path": MODEL, "tokenizer_path": None, "is_generation": True}
    server = {"context_length": 8192, "max_total_num_tokens": 1 << 20}
    answers = {
        (b"POST", b"/v1/chat/completions", False): _json(200, chat),
        (b"POST", b"/v1/chat/completions", True): _sse(chat_chunks),
        (b"POST", b"/v1/completions", False): _json(200, completion),
        (b"POST", b"/v1/completions", True): _sse(completion_chunks),
        (b"POST", b"/generate", False): _json(200, generate),
        (b"POST", b"/generate", True): _sse([generate]),
        (b"GET", b"/v1/models", False): _json(200, models),
        (b"GET", b"/get_model_info", False): _json(200, info),
        (b"GET", b"/get_server_info", False): _json(200, server),
        (b"GET", b"/health", False): _json(200, {"status": "ok"}),
        (b"POST", b"/abort_request", False): _json(200, {}),
        (b"POST", b"/flush_cache", False): _json(200, {}),
    }
    return answers


_NOT_FOUND = _json(404, {"error": {"message": "not found", "type": "not_found"}})


class _Connection(asyncio.Protocol):
    """One keep-alive connection: answer each parsed request from the table."""

    def __init__(self, answers: dict[tuple[bytes, bytes, bool], bytes]) -> None:
        import httptools

        self._answers = answers
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception:  # noqa: BLE001 - a malformed request closes its connection
            if self._transport is not None:
                self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        streamed = bool(self._body) and _STREAM.search(b"".join(self._body)) is not None
        key = (self._parser.get_method(), path, streamed)
        self._url, self._body = b"", []
        if self._transport is not None:
            self._transport.write(self._answers.get(key, _NOT_FOUND))


async def serve(host: str, port: int) -> None:
    answers = _answers()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(answers), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
