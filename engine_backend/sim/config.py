"""Sim engine knobs (`settings.sim`). How the knobs become step times is in `cost_model.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HardwareProfile(BaseModel):
    """The model and GPU the step-cost model imitates. Defaults: Llama-3-8B in bf16 on one
    H100 SXM5 (sources and the derivation are in `cost_model.py`)."""

    model_config = ConfigDict(extra="forbid")

    params: float = Field(8.03e9, gt=0, description="model parameters (Llama-3-8B: 8.03e9)")
    bytes_per_param: float = Field(2.0, gt=0, description="bf16 weights")
    num_layers: int = Field(32, ge=1, description="transformer layers")
    hidden_size: int = Field(4096, ge=1, description="model width")
    kv_heads: int = Field(8, ge=1, description="GQA key/value heads")
    head_dim: int = Field(128, ge=1, description="attention head size")
    kv_bytes_per_elem: float = Field(2.0, gt=0, description="bf16 KV cache")
    hbm_bandwidth: float = Field(3.35e12, gt=0, description="bytes/s (H100 SXM5 datasheet)")
    bandwidth_efficiency: float = Field(0.8, gt=0, le=1, description="achieved / peak HBM")
    peak_flops: float = Field(989e12, gt=0, description="dense bf16 FLOP/s (H100 SXM5)")
    matmul_efficiency: float = Field(0.3, gt=0, le=1, description="achieved MFU of GEMMs")
    attention_efficiency: float = Field(0.3, gt=0, le=1, description="achieved MFU of prefill attention")
    step_overhead_s: float = Field(1.2e-3, ge=0, description="per step: launch, sampling, scheduling")


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ~55 GB left for KV on an 80 GB H100 after 16 GB of weights and activations,
    # at 128 KiB per token for Llama-3-8B: about 420k tokens.
    kv_capacity_tokens: int = Field(400_000, ge=16, description="radix KV cache size in tokens")
    max_running: int = Field(256, ge=1, description="max requests in a decode batch")
    chunked_prefill_tokens: int = Field(8192, ge=16, description="prefill tokens per step")
    eviction: Literal["lru", "priority"] = Field(
        "priority", description="radix eviction order: lru | priority (ended programs first, pinned last)"
    )
    priority_preemption: bool = Field(
        True, description="a waiting request that outranks a running one may preempt it"
    )
    # SGLang's admission headroom: reserve new_token_ratio * remaining max_new_tokens of
    # running requests (clipped); the ratio decays per step and jumps back after a retraction.
    init_new_token_ratio: float = Field(
        0.7, ge=0, le=1, description="share of max_new_tokens reserved at admission (SGLang)"
    )
    min_new_token_ratio: float = Field(
        0.1, ge=0, le=1, description="floor the reserve ratio decays to"
    )
    new_token_ratio_decay_steps: int = Field(
        600, ge=1, description="decode steps from the initial to the minimum ratio"
    )
    clip_max_new_tokens: int = Field(4096, ge=1, description="cap of one request's reservation")
    retract_decode_steps: int = Field(20, ge=0, description="ratio estimate after a retraction")
    time_scale: float = Field(1.0, gt=0, description="real-time mode: 0.1 runs 10x faster")
    stream_interval: int = Field(
        1, ge=0, description="tokens per streamed chunk; 0 = one chunk at the end (benchmarks)"
    )
    seed: int = Field(0, description="seed of synthetic outputs")
    synthetic_mean_tokens: int = Field(
        128, ge=1, description="mean output length when no expectation is registered"
    )
    script_file: Path | None = Field(
        None, description="JSON list of {pattern, reply} rules for the scripted responder"
    )
    model_path: str = Field("progserve/sim-llama-3-8b", description="name it reports")
    max_context_len: int = Field(32768, ge=16, description="longest prompt + output")
    hardware: HardwareProfile = Field(default_factory=HardwareProfile)
