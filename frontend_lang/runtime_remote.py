"""The remote runtime: a progserve server's native program API, over HTTP with httpx.

    async with RemoteRuntime("http://127.0.0.1:30080", api_key=None) as runtime:
        result = await my_program.run(runtime, "question")

Routes (see `progserve/api/programs.py`): `POST /v1/programs`, `POST /v1/programs/{id}/calls`,
`GET /v1/programs/{id}/variables/{name}` (long poll; `?stream=true` for SSE deltas),
`GET /v1/programs/{id}`, `POST /v1/programs/{id}/end`, `DELETE /v1/programs/{id}`.
Errors come back as problem JSON and are raised as the DSL's typed errors.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from scheduler.spec import CallSpec, ProgramSpec, ProgramState

from .errors import (
    CallFailedError,
    DSLError,
    ProgramCancelledError,
    ProgramDefinitionError,
    ProgramNotFoundError,
    RuntimeUnavailableError,
)

# How long one long poll waits server-side before we ask again (keeps idle connections
# short-lived enough for proxies; a value may take much longer than this).
LONG_POLL_S = 60.0
# A server past its admission limits answers 429 with Retry-After: wait and try again.
MAX_OVERLOAD_RETRIES = 5
# The scheduler's message for a failed call: "... variable 'v' (call 'c') failed: cause"
# or "... call 'c' failed: cause". Used when the problem JSON lacks structured fields.
_FAILED_CALL = re.compile(
    r"(?:variable '(?P<variable>[^']+)' \(call '(?P<call>[^']+)'\)|call '(?P<call2>[^']+)')"
    r" failed: (?P<cause>.*)",
    re.DOTALL,
)


class RemoteRuntime:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 60.0,
        max_connections: int = 128,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            # Waits for values are long polls: no pool timeout, so many can queue.
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> RemoteRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the Runtime protocol ----------------------------------------------------------
    async def submit_program(self, spec: ProgramSpec) -> str:
        body = await self._request("POST", "/v1/programs", spec.program_id, json=_wire(spec))
        return str(body["program_id"])

    async def add_calls(self, program_id: str, calls: list[CallSpec]) -> None:
        await self._request(
            "POST",
            f"/v1/programs/{program_id}/calls",
            program_id,
            json={"calls": [_wire(c) for c in calls]},
        )

    async def wait_variable(self, program_id: str, name: str) -> str:
        path = f"/v1/programs/{program_id}/variables/{name}"
        while True:
            try:
                body = await self._request(
                    "GET",
                    path,
                    program_id,
                    params={"timeout": LONG_POLL_S},
                    timeout=httpx.Timeout(LONG_POLL_S + 30.0, connect=10.0, pool=None),
                )
            except _StillWaiting:
                continue
            return str(body["value"])

    async def stream_variable(self, program_id: str, name: str) -> AsyncIterator[str]:
        path = f"/v1/programs/{program_id}/variables/{name}"
        try:
            async with self._client.stream(
                "GET",
                path,
                params={"stream": "true"},
                timeout=httpx.Timeout(None, connect=10.0, pool=None),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from(response, program_id)
                async for data in _sse_data(response):
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise _error_from_body(event["error"], 502, program_id)
                    yield str(event.get("delta", ""))
        except httpx.HTTPError as exc:
            raise RuntimeUnavailableError(f"{self.url}: {exc}") from exc

    async def program_state(self, program_id: str) -> ProgramState:
        body = await self._request("GET", f"/v1/programs/{program_id}", program_id)
        return ProgramState.model_validate(body)

    async def cancel_program(self, program_id: str) -> None:
        await self._request("DELETE", f"/v1/programs/{program_id}", program_id)

    async def end_program(self, program_id: str) -> None:
        await self._request("POST", f"/v1/programs/{program_id}/end", program_id)

    # -- plumbing ----------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, program_id: str | None, **kwargs: Any
    ) -> dict[str, Any]:
        for attempt in range(MAX_OVERLOAD_RETRIES + 1):
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise RuntimeUnavailableError(f"{method} {self.url}{path}: {exc}") from exc
            if response.status_code != 429 or attempt == MAX_OVERLOAD_RETRIES:
                break
            # Overloaded: nothing was admitted, so the same request can simply come again.
            await asyncio.sleep(_retry_after(response))
        if response.status_code == 408:
            raise _StillWaiting()
        if response.status_code >= 400:
            raise _error_from(response, program_id)
        return response.json()  # type: ignore[no-any-return]


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.05), 30.0)
    except ValueError:
        return 1.0


class _StillWaiting(Exception):
    """A long poll ran out on the server: ask again."""


def _wire(model: ProgramSpec | CallSpec) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_defaults=True)


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _error_from(response: httpx.Response, program_id: str | None) -> DSLError:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:500]}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]  # OpenAI's shape
    return _error_from_body(body, response.status_code, program_id)


def _error_from_body(body: dict[str, Any], status: int, program_id: str | None) -> DSLError:
    message = str(body.get("detail") or body.get("message") or f"HTTP {status}")
    code = body.get("code")
    if code == "call_failed" or (status >= 500 and _FAILED_CALL.search(message)):
        return _call_failed(body, message, program_id)
    if code == "program_cancelled" or status == 409:
        return ProgramCancelledError(program_id, "was cancelled")
    if status in (401, 403):
        return RuntimeUnavailableError(f"HTTP {status}: {message}")
    if status == 404:
        return ProgramNotFoundError(message)
    if 400 <= status < 500 and status != 429:
        return ProgramDefinitionError(message)
    return RuntimeUnavailableError(f"HTTP {status}: {message}")


def _call_failed(body: dict[str, Any], message: str, program_id: str | None) -> CallFailedError:
    call_id, variable, cause = body.get("call_id"), body.get("variable"), message
    match = _FAILED_CALL.search(message)
    if call_id is None and match is not None:
        call_id = match.group("call") or match.group("call2")
        variable = match.group("variable")
        cause = match.group("cause")
    return CallFailedError(program_id, str(call_id or "?"), variable, cause)
