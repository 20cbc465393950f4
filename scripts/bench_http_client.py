"""progserve's HTTP client vs aiohttp's, on the HTTP engines' own path.

Both sides run the same engine code (`SGLangHTTPEngine.generate` for a whole `/generate`
answer, `OpenAIHTTPEngine.generate` for a streamed `/v1/completions` of 8 tokens) over
a different transport: `ConnectionPool` (progserve's) or `AiohttpTransport` (below:
aiohttp's pooled `ClientSession`, its C parser). The upstream is a canned HTTP/1.1 server
in another process, so the measured CPU is the client's. Rounds alternate the two sides;
reported: CPU microseconds per call (process_time), the median over rounds.

    python scripts/bench_http_client.py [--rounds 6] [--calls 2000] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson

TOKENS = 8


def _sse() -> bytes:
    events = [{"id": "x", "object": "text_completion", "model": "m",
               "choices": [{"index": 0, "text": f" tok{i}", "logprobs": None,
                            "finish_reason": None}]} for i in range(TOKENS)]
    events.append({"id": "x", "object": "text_completion", "model": "m",
                   "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    events.append({"id": "x", "object": "text_completion", "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": TOKENS,
                             "total_tokens": 5 + TOKENS}})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


ANSWERS = {
    b"GET /get_model_info": (b"application/json", orjson.dumps(
        {"model_path": "m", "is_generation": True})),
    b"GET /v1/models": (b"application/json", orjson.dumps(
        {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]})),
    b"POST /generate": (b"application/json", orjson.dumps(
        {"text": " tok" * TOKENS, "output_ids": list(range(TOKENS)),
         "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": TOKENS},
                       "prompt_tokens": 5, "completion_tokens": TOKENS, "cached_tokens": 0}})),
}


def serve(port: int) -> None:
    """The canned upstream: SSE streams go out chunked, one write per event."""
    import uvloop

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                key = b" ".join(head.split(b" ", 2)[:2])
                if key == b"POST /v1/completions" and b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for event in _sse().split(b"\n\n")[:-1]:
                        event += b"\n\n"
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    writer.write(b"0\r\n\r\n")
                else:
                    kind, data = ANSWERS.get(key, (b"application/json", b'{"detail":"nope"}'))
                    status = b"200 OK" if key in ANSWERS else b"404 Not Found"
                    writer.write(b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                                 % (status, kind, len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


class AiohttpResponse:
    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def next_chunk(self) -> bytes | None:
        import aiohttp

        from engine_backend.errors import EngineUnavailableError

        try:
            data = await self._resp.content.readany()
        except aiohttp.ClientError as exc:
            raise EngineUnavailableError(f"connection lost: {exc}") from exc
        return data or None

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class AiohttpTransport:
    """The `Transport` seam over aiohttp: what replacing our client would look like."""

    def __init__(self, origin: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            origin, connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def send(self, request: Any) -> AiohttpResponse:
        headers = dict(request.headers)
        if request.body is not None:
            headers["Content-Type"] = "application/json"
        resp = await self.session.request(request.method, request.target, data=request.body,
                                          headers=headers)
        return AiohttpResponse(resp)

    async def aclose(self) -> None:
        await self.session.close()


async def cpu_us_per_call(engine_cls: type, url: str, transport: Any, calls: int,
                          stream: bool) -> float:
    from engine_backend.types import GenerateRequest, SamplingParams

    engine = engine_cls(url, transport=transport)
    await engine.start()
    sampling = SamplingParams(max_new_tokens=TOKENS, temperature=0)
    try:
        for i in range(50):  # warm the connection and the code
            async for _ in engine.generate(GenerateRequest(rid=f"w{i}", text="Hello there",
                                                           sampling=sampling, stream=stream)):
                pass
        start = time.process_time()
        for i in range(calls):
            async for _ in engine.generate(GenerateRequest(rid=f"r{i}", text="Hello there",
                                                           sampling=sampling, stream=stream)):
                pass
        return (time.process_time() - start) / calls * 1e6
    finally:
        await engine.close()


async def bench(url: str, rounds: int, calls: int) -> dict[str, Any]:
    from engine_backend.http.pool import ConnectionPool
    from engine_backend.openai_http import OpenAIHTTPEngine
    from engine_backend.sglang_http import SGLangHTTPEngine

    paths = {"sglang /generate, whole answer": (SGLangHTTPEngine, False),
             "openai /v1/completions, 8-token stream": (OpenAIHTTPEngine, True)}
    sides = {"progserve": lambda: ConnectionPool(url), "aiohttp": lambda: AiohttpTransport(url)}
    out: dict[str, Any] = {}
    for path, (engine_cls, stream) in paths.items():
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                samples[name].append(await cpu_us_per_call(
                    engine_cls, url, sides[name](), calls, stream))
        medians = {name: statistics.median(v) for name, v in samples.items()}
        out[path] = {"cpu_us_per_call": {k: round(v, 1) for k, v in medians.items()},
                     "aiohttp_minus_progserve_us": round(medians["aiohttp"] - medians["progserve"], 1),
                     "rounds": {k: [round(x, 1) for x in v] for k, v in samples.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        time.sleep(1.0)
        coro = bench(f"http://127.0.0.1:{port}", args.rounds, args.calls)
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(coro)
        else:
            result = asyncio.run(coro)
    finally:
        server.terminate()
    import aiohttp

    print(json.dumps({"loop": args.loop, "aiohttp": aiohttp.__version__, **result}, indent=1))


if __name__ == "__main__":
    main()
