"""How `bench live`'s clients reach an engine: straight to an in-process engine (torch),
or over OpenAI chat completions (an engine's own server, or progserve in front of it).

Each returns a `CallRecord` (TTFT, prompt / completion / cached tokens) and the text.
Also here: the engines' own counters (vLLM's Prometheus `/metrics`, the torch engine's
`stats()`), read before and after a run.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx

from engine_backend.base import Engine
from engine_backend.chat_template import ChatTemplate
from engine_backend.types import GenerateRequest, SamplingParams

from .live_programs import CallRecord

CALL_TIMEOUT_S = 600.0


def _sampling(out_tokens: int) -> dict[str, Any]:
    """Greedy, exactly `out_tokens` tokens (the shape's length): `ignore_eos` with
    `max_tokens` (progserve's openai engine refuses `min_tokens`, vLLM takes both)."""
    return {"max_tokens": out_tokens, "ignore_eos": True, "temperature": 0.0}


class DirectEngineCaller:
    """A user of the engine without progserve: each call straight to `engine.generate`,
    its messages rendered with the model's chat template (what the engine's own OpenAI
    server does)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.template = ChatTemplate(engine.model_info().chat_template)
        self._seq = 0
        self.track_tokens = False  # record each streamed chunk's time (calibration)

    async def __call__(self, program_id: str, index: int, messages: list[dict[str, str]],
                       out_tokens: int, last: bool) -> tuple[CallRecord, str]:
        self._seq += 1
        request = GenerateRequest(
            rid=f"{program_id}/{index}/{self._seq}", text=self.template.render(messages),
            sampling=SamplingParams(max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                                    ignore_eos=True, temperature=0.0))
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        times: list[float] = []
        prompt = completion = cached = 0
        async for chunk in self.engine.generate(request):
            if chunk.text or chunk.token_ids:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                if self.track_tokens:
                    times.append(now)
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                prompt, completion, cached = (chunk.prompt_tokens, chunk.completion_tokens,
                                              chunk.cached_tokens)
        end = time.perf_counter()
        if ttft is None:  # every token was special (no text): the answer's end
            ttft = end - start
        return CallRecord(start, ttft, end, prompt, completion, cached, times), "".join(parts)


class OpenAICaller:
    """OpenAI chat completions, streamed, to `base_url` (an engine's server, or progserve).
    `tag_programs`: send progserve's program headers (the program id, the call chain, and
    `X-Program-End` on the program's last call)."""

    def __init__(self, base_url: str, model: str, *, tag_programs: bool,
                 api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=server_root(base_url), headers=headers,
                                        timeout=CALL_TIMEOUT_S,
                                        limits=httpx.Limits(max_connections=1000))
        self.model = model
        self.tag_programs = tag_programs
        self.track_tokens = False  # record each streamed chunk's time (calibration)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _headers(self, program_id: str, index: int, last: bool) -> dict[str, str]:
        if not self.tag_programs:
            return {}
        headers = {"X-Program-Id": program_id, "X-Call-Id": f"c{index}"}
        if index:
            headers["X-Parent-Calls"] = f"c{index - 1}"
        if last:
            headers["X-Program-End"] = "true"
        return headers

    async def __call__(self, program_id: str, index: int, messages: list[dict[str, str]],
                       out_tokens: int, last: bool) -> tuple[CallRecord, str]:
        body = {"model": self.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **_sampling(out_tokens)}
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        times: list[float] = []
        usage: dict[str, Any] = {}
        async with self.client.stream("POST", "/v1/chat/completions", json=body,
                                      headers=self._headers(program_id, index, last)) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"chat completion failed: {resp.status_code} {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - start
                        if self.track_tokens:
                            times.append(now)
                    parts.append(text)
                if event.get("usage"):
                    usage = event["usage"]
        end = time.perf_counter()
        if ttft is None:  # every token was special (no text): the answer's end
            ttft = end - start
        details = usage.get("prompt_tokens_details") or {}
        record = CallRecord(start, ttft, end, int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0),
                            int(details.get("cached_tokens") or 0), times)
        return record, "".join(parts)


def server_root(url: str) -> str:
    """`http://host:port` from the server root or its `/v1` root (as `--engine-url` takes)."""
    return url.rstrip("/").removesuffix("/v1")


async def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model an OpenAI-compatible server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30.0, headers=headers) as client:
        resp = await client.get(server_root(base_url) + "/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])


# vLLM's Prometheus counters (V1 engine names) -> our names
VLLM_COUNTERS = {
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:num_preemptions_total": "preemptions",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Our names of `VLLM_COUNTERS`, summed over their labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in VLLM_COUNTERS:
            name = VLLM_COUNTERS[match.group(1)]
            out[name] = out.get(name, 0.0) + float(match.group(3))
    return out


async def vllm_counters(base_url: str) -> dict[str, float]:
    """The engine's counters from `/metrics` ({} where the server exposes none)."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.get(server_root(base_url) + "/metrics")
    except httpx.HTTPError:
        return {}
    return parse_prometheus(resp.text) if resp.status_code == 200 else {}


async def engine_counters(engine: Engine) -> dict[str, float]:
    """The in-process engine's counters, named as vLLM's are here."""
    stats = await engine.stats()
    return {"prefix_cache_hits": float(stats.cache_hit_tokens),
            "prefix_cache_queries": float(stats.cache_query_tokens),
            "preemptions": float(stats.preemptions),
            "kv_capacity_tokens": float(stats.kv_capacity_tokens)}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, value in after.items():
        if name == "kv_capacity_tokens":
            out[name] = value
        else:
            out[name] = value - before.get(name, 0.0)
    if out.get("prefix_cache_queries"):
        out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits", 0.0) / out[
            "prefix_cache_queries"]
    return out
