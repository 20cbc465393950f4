"""`HTTPEngineConfig`: the settings of the HTTP engines (`settings.http_engine`), for
`--engine sglang|openai`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class HTTPEngineConfig(BaseModel):
    api_key: str | None = Field(None, description="bearer key sent to the upstream engine")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect and control-call timeout")
    send_priority: bool = Field(
        True, description="sglang: pass engine ranks down as `priority` (the server runs "
        "--enable-priority-scheduling)"
    )
    openai_priority: bool = Field(
        False, description="openai: pass engine ranks down as `priority` (the server is vLLM "
        "run with --scheduling-policy priority)"
    )
    low_priority_values_first: bool = Field(
        False, description="sglang: the server runs --schedule-low-priority-values-first"
    )
    sglang_priority_file: Path | None = Field(
        None,
        description="sglang: write KV retention hints (pins, ended programs) to this file "
                    "for progserve's SGLang plugin (the servers' $PROGSERVE_PRIORITY_FILE); "
                    "a directory: this process's own file in it, for several progserve "
                    "processes in front of the same servers",
    )
    sglang_cache_salt_field: Literal["cache_salt", "extra_key", "off"] = Field(
        "cache_salt",
        description="sglang: the /generate field that carries a request's tenant cache salt "
                    "(cache_salt: SGLang with a cache_salt request field, 0.5.23 has it; "
                    "extra_key: older servers, whose extra_key keys the radix cache; off: "
                    "send none, prefixes are shared across tenants)",
    )
    logprobs: bool | None = Field(
        None, description="openai: does the server return logprobs (None: probe at start)"
    )
    cache_salt: Literal["auto", "on", "off"] = Field(
        "auto",
        description="openai: send a request's tenant cache salt as `cache_salt` (auto: when "
                    "the upstream is vLLM, which honours it; other servers may refuse or "
                    "ignore the field)",
    )
    tokenizer: Path | None = Field(
        None,
        description="openai: a tokenizer directory (tokenizer.json) to count tokens the "
                    "upstream does not report (default: --model when it is a directory)",
    )
