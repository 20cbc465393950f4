"""The probe's HTTP side: one JSON call or one SSE stream, every failure turned into an
answer with a one-line error (a probe reports; it never raises on what a server says)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

_MAX_ERROR_CHARS = 160


@dataclass(slots=True)
class Answer:
    status: int  # 0: no HTTP answer (unreachable, timed out)
    data: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.data is not None

    @property
    def rejected(self) -> bool:
        """The server answered and refused the request (a 4xx)."""
        return 400 <= self.status < 500


@dataclass(slots=True)
class StreamAnswer:
    status: int
    events: list[Any] = field(default_factory=list)
    done: bool = False  # the stream ended with `data: [DONE]`
    error: str = ""


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def error_message(status: int, body: str) -> str:
    """The server's own message where its answer is OpenAI-shaped, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return one_line(f"HTTP {status}: {body}")
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            err = err.get("message") or err
        return one_line(f"HTTP {status}: {err}")
    return one_line(f"HTTP {status}: {body}")


class ProbeClient:
    """An httpx client of one server; `timeout_s` bounds each call."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get(self, path: str) -> Answer:
        return await self._call("GET", path, None)

    async def get_text(self, path: str) -> str | None:
        """A plain-text GET (e.g. /metrics); None unless it answers 200."""
        try:
            resp = await self._http.get(path)
        except httpx.HTTPError:
            return None
        return resp.text if resp.status_code == 200 else None

    async def post(self, path: str, body: dict[str, Any]) -> Answer:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Answer:
        try:
            resp = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            return Answer(0, error=one_line(f"{type(exc).__name__}: {exc}"))
        if resp.status_code != 200:
            return Answer(resp.status_code, error=error_message(resp.status_code, resp.text))
        try:
            return Answer(200, resp.json())
        except ValueError:
            return Answer(200, error=one_line(f"not JSON: {resp.text}"))

    async def stream(self, path: str, body: dict[str, Any]) -> StreamAnswer:
        """POST with an SSE answer; `data:` events parsed as JSON, to `[DONE]` or the end."""
        try:
            async with self._http.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return StreamAnswer(resp.status_code,
                                        error=error_message(resp.status_code, text))
                out = StreamAnswer(200)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        out.done = True
                        break
                    try:
                        out.events.append(json.loads(payload))
                    except ValueError:
                        out.error = one_line(f"an event is not JSON: {payload}")
                return out
        except httpx.HTTPError as exc:
            return StreamAnswer(0, error=one_line(f"{type(exc).__name__}: {exc}"))
