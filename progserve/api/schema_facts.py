"""What the server's configuration adds to its OpenAPI schema, and the 405's `Allow`.

The wire models are static; a server's limits are not. So that the schema a client reads
describes exactly what this server accepts (and a schema-driven fuzzer never meets a
"valid" body the server refuses), the schema is completed from the settings:

- every token count a request asks for (`max_tokens`, `max_new_tokens`,
  `max_completion_tokens`, `min_tokens`, `min_new_tokens`) gets `limits.max_tokens` as
  its maximum;
- a graph call's `tool` lists the tools this server registered (an allowlist);
- a batch's lists (several prompts in one request) hold at most `limits.max_batch`
  entries, where the settings have that limit.

What no JSON Schema can say stays a documented 400 with its own `code`
(`errors.BODY_RULES`, listed in docs/reliability.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
# Fields whose list form is a batch (one entry per prompt), by model.
BATCH_FIELDS = {
    "CompletionRequest": ("prompt",),
    "GenerateInput": ("text", "input_ids", "sampling_params", "rid", "return_logprob",
                      "logprob_start_len", "top_logprobs_num"),
}
TOKEN_FIELDS = ("max_tokens", "max_new_tokens", "max_completion_tokens", "min_tokens",
                "min_new_tokens")


def add_server_facts(components: dict[str, Any], *, max_tokens: int,
                     tool_names: Iterable[str] | None, max_batch: int | None = None) -> None:
    """Complete the schema's model schemas (by model name: the components and the request
    bodies) in place (see the module docstring)."""
    for model in components.values():
        properties = model.get("properties", {})
        for name in TOKEN_FIELDS:
            if name in properties:
                for branch in _integer_branches(properties[name]):
                    branch["maximum"] = min(branch.get("maximum", max_tokens), max_tokens)
    for model, fields in BATCH_FIELDS.items():
        properties = components.get(model, {}).get("properties", {})
        for name in fields:
            for branch in properties.get(name, {}).get("anyOf", []):
                if max_batch is not None and "maxItems" in branch:  # a batch's list form
                    branch["maxItems"] = min(branch["maxItems"], max_batch)
    call = components.get("CallSpec")
    tool = call.get("then", {}).get("properties", {}).get("tool") if call else None
    if tool is not None and tool_names is not None:  # only a tool call names a tool
        tool["enum"] = sorted(tool_names)


def allowed_methods(schema: dict[str, Any], path: str) -> str | None:
    """The methods the schema documents at a request path (Starlette's 405 names only
    those of the first route that matched it, and FastAPI mounts one route per method);
    None for a path the schema does not document."""
    for template, operations in schema.get("paths", {}).items():
        pattern = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods = sorted(m.upper() for m in operations if m.upper() in HTTP_METHODS)
            return ", ".join(methods) or None
    return None


def _integer_branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in schema.get("anyOf", [schema]) if s.get("type") == "integer"]
