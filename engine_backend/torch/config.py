"""Torch engine knobs (`settings.torch`). Importing this module never imports torch, so the
core install can nest the section in its settings model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TorchConfig(BaseModel):
    model_path: str | None = Field(
        None, description="Hugging Face Llama-architecture model dir; None: the embedded SmolLM2"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU"
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of the worker; 0: half the cores (1 on 2 cores, "
        "where two threads made decode slower on a busy machine)",
    )
    kv_capacity_tokens: int = Field(32768, ge=64, description="paged KV pool size in tokens")
    max_running: int = Field(16, ge=1, description="max requests in a decode batch")
    chunked_prefill_tokens: int = Field(
        512, ge=16, description="prompt tokens per step (chunked prefill)"
    )
    admission_reserve_tokens: int = Field(
        64, ge=0, description="KV slots kept free per running request for its next tokens"
    )
    priority_preemption: bool = Field(
        True, description="a waiting request preempts a running one of lower priority"
    )
    prefix_cache: bool = Field(True, description="share prompt prefixes' KV via the radix tree")
    eviction: Literal["lru", "priority"] = Field(
        "priority", description="radix eviction order: lru | priority (ended programs first, pinned last)"
    )
    preemption: Literal["recompute", "swap"] = Field(
        "recompute",
        description="recompute: a preempted request's KV goes to the radix cache and is "
        "recomputed if evicted; swap: its KV moves to host memory and back",
    )
    cascade_min_prefix: int = Field(
        64,
        ge=0,
        description="decode batches whose requests share a cached prefix at least this long "
        "use shared-prefix (cascade) attention; 0 disables it",
    )
    use_triton: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: Triton kernels on GPU, torch reference paths on CPU"
    )
    max_context_len: int | None = Field(None, ge=16, description="None: the model's own")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed chunk")
    seed: int = Field(0, description="seed of requests that give none")
