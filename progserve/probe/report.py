"""What a probe found: one boolean and a one-line reason per feature, as JSON and as a table,
and what progserve does differently for each missing feature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The JSON keys `progserve probe --json` writes, one boolean each (a contract: keep them).
FEATURES = (
    "chat",
    "completions",
    "stream",
    "logprobs",
    "top_logprobs",
    "usage_in_stream",
    "cached_tokens",
    "priority",
    "cache_salt",
    "tool_calls",
    "chat_template",
)

# What progserve does differently when the server lacks a feature (logged by `serve`).
CONSEQUENCES = {
    "chat": "chat requests cannot go to the server's chat endpoint: progserve must render "
            "the prompt itself and send it as a completion",
    "completions": "calls that arrive as raw prompts (/generate, /v1/completions, DSL "
                   "programs) cannot be sent as completions to this server",
    "stream": "streamed calls fail on this server; only whole answers work",
    "logprobs": "calls that ask for logprobs (SGLang's select included) are refused with "
                "400",
    "top_logprobs": "top_logprobs come back empty",
    "usage_in_stream": "streamed calls get no token usage from this server: their prompt and "
                       "cached token counts are progserve's estimates or 0",
    "cached_tokens": "no prefix-cache hits are reported: hit rates read 0 and attained "
                     "service counts every prompt token as uncached (routing still uses "
                     "progserve's own prefix trees)",
    "priority": "progserve cannot rely on the server ordering calls by priority: its order "
                "holds only while calls wait in progserve, so keep "
                "scheduler.max_inflight_requests small",
    "cache_salt": "prefixes this server caches are shared across tenants (a cache hit is "
                  "visible to another tenant); run a server per tenant where that matters",
    "tool_calls": "the server returns no structured tool calls: tools must be put in the "
                  "prompt and calls parsed from the text by progserve",
    "chat_template": "progserve cannot render the model's own chat template: chat must go to "
                     "the server's chat endpoint, else progserve's built-in ChatML is a guess",
}


@dataclass(slots=True)
class Finding:
    ok: bool
    reason: str


def missing(reason: str) -> Finding:
    return Finding(False, reason)


def present(reason: str) -> Finding:
    return Finding(True, reason)


@dataclass
class ProbeReport:
    engine: str
    url: str
    model: str | None = None
    findings: dict[str, Finding] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # Facts beside the booleans (e.g. whether the server validates a `priority` field).
    details: dict[str, Any] = field(default_factory=dict)

    def finding(self, feature: str) -> Finding:
        return self.findings.get(feature) or missing("not probed")

    @property
    def speaks_protocol(self) -> bool:
        """The server answered at least one generation request of its protocol."""
        return self.finding("completions").ok or self.finding("chat").ok

    def absent(self) -> list[str]:
        return [name for name in FEATURES if not self.finding(name).ok]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.finding(name).ok for name in FEATURES}
        out["reasons"] = {name: self.finding(name).reason for name in FEATURES}
        out.update(engine=self.engine, url=self.url, model=self.model,
                   elapsed_s=round(self.elapsed_s, 3), details=self.details)
        return out

    def table(self) -> str:
        width = max(len(name) for name in FEATURES)
        lines = [f"progserve probe: --engine {self.engine} {self.url}",
                 f"model: {self.model or '(unknown)'}   ({self.elapsed_s:.1f} s)", ""]
        lines.append(f"{'feature':<{width}}  ok   reason")
        lines.append(f"{'-' * width}  ---  {'-' * 40}")
        for name in FEATURES:
            found = self.finding(name)
            lines.append(f"{name:<{width}}  {'yes' if found.ok else 'no ':<3}  {found.reason}")
        return "\n".join(lines)
