"""Sim engine knobs (`settings.sim`). Cost-model coefficients live in `cost_model.py`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SimConfig(BaseModel):
    kv_capacity_tokens: int = Field(400_000, ge=16, description="radix KV cache size in tokens")
    max_running: int = Field(256, ge=1, description="max requests in a decode batch")
    chunked_prefill_tokens: int = Field(8192, ge=16, description="prefill tokens per step")
    eviction: str = Field("priority", description="radix eviction order: lru | priority")
    time_scale: float = Field(1.0, gt=0, description="real-time mode: 0.1 runs 10x faster")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed chunk (real time)")
    seed: int = 0
    model_path: str = "progserve/sim-llama-3-8b"
    max_context_len: int = Field(32768, ge=16)
