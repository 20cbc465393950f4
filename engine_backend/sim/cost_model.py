"""The sim engine's step-cost model: how long one batched forward step takes on the GPU.

    step_time(P, pairs, B, C) = overhead
                              + max(weight_bytes / bw,  (P + B) * flops_per_token / matmul_flops)
                              + C * kv_bytes_per_token / bw
                              + pairs * attn_flops_per_pair / attn_flops

with P prefill tokens and B decoding requests in the step, C the total context (KV tokens)
that the decoding requests read, and `pairs` the (query, key) pairs of the prefill
attention (a chunk of positions [a, b) of one prompt has sum(i + 1 for i in [a, b)) pairs).

- Small-batch decode is bound by streaming the weights from HBM once per step; past the
  roofline ridge the GEMMs become compute bound (`max`).
- Decode attention is bound by reading every running request's KV cache: it grows with C.
- Prefill is compute bound: GEMMs per token plus the quadratic attention.
- A recompute after a retraction is just prefill again: it costs the same formula.

Default coefficients: Llama-3-8B in bf16 on one H100 SXM5 (`HardwareProfile` defaults).
Sources:
- Meta's Llama 3 model card / config.json: 8.03e9 parameters, 32 layers, hidden 4096,
  32 query heads and 8 KV heads (GQA) of dimension 128.
- NVIDIA H100 SXM5 datasheet: HBM3 3.35 TB/s; 989 TFLOP/s dense bf16 (1979 with sparsity).
- Achieved fractions: memory-bound kernels reach ~80% of peak HBM bandwidth; serving
  GEMMs and FlashAttention at mixed shapes reach ~30% MFU end to end.
Derived numbers (the defaults):
- weights: 8.03e9 * 2 B = 16.06 GB; at 0.8 * 3.35 TB/s = 2.68 TB/s that is 5.99 ms per step.
  Plus 1.2 ms per-step overhead (kernel launches, sampling, CPU scheduling with CUDA
  graphs) gives ~7.2 ms per step at batch 1 (~139 tok/s single stream), in line with
  published single-stream Llama-3-8B figures on H100 for vLLM and SGLang (130-160 tok/s).
- KV: 2 (K, V) * 32 layers * 8 heads * 128 dims * 2 B = 128 KiB per token, so reading
  context costs 48.9 ns per token per step (64 requests x 2k context adds ~6.3 ms).
- GEMMs: 2 * 8.03e9 = 16.06 GFLOP per token; at 0.3 * 989 TFLOP/s = 297 TFLOP/s that is
  54 us per token, so decode turns compute bound above a batch of ~110 requests.
- Prefill: 54 us per token of GEMMs plus attention (4 * 32 * 4096 = 524k FLOP per
  query-key pair): ~18k tok/s for a 1k-token prompt, ~16k tok/s for an 8k chunk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from engine_backend.sim.config import HardwareProfile


@dataclass(slots=True, frozen=True)
class StepCostModel:
    overhead_s: float  # fixed cost of every step
    weights_s: float  # one read of the weights (memory-bound floor of a step)
    per_token_s: float  # GEMM time per token in the step (prefill or decode)
    per_context_token_s: float  # decode attention: reading one token of KV
    per_attention_pair_s: float  # prefill attention: one (query, key) pair

    @classmethod
    def from_hardware(cls, hw: HardwareProfile) -> StepCostModel:
        bandwidth = hw.hbm_bandwidth * hw.bandwidth_efficiency
        kv_bytes_per_token = 2 * hw.num_layers * hw.kv_heads * hw.head_dim * hw.kv_bytes_per_elem
        return cls(
            overhead_s=hw.step_overhead_s,
            weights_s=hw.params * hw.bytes_per_param / bandwidth,
            per_token_s=2 * hw.params / (hw.peak_flops * hw.matmul_efficiency),
            per_context_token_s=kv_bytes_per_token / bandwidth,
            per_attention_pair_s=4 * hw.num_layers * hw.hidden_size
            / (hw.peak_flops * hw.attention_efficiency),
        )

    @classmethod
    def llama3_8b_h100(cls) -> StepCostModel:
        return cls.from_hardware(HardwareProfile())

    def step_time(
        self, prefill_tokens: int, attention_pairs: int, decode_batch: int, context: int
    ) -> float:
        """Seconds of one step (see the module docstring)."""
        tokens = prefill_tokens + decode_batch
        if tokens == 0:
            return 0.0
        return (
            self.overhead_s
            + max(self.weights_s, tokens * self.per_token_s)
            + context * self.per_context_token_s
            + attention_pairs * self.per_attention_pair_s
        )

    def decode_span(self, batch: int, context: int, steps: int) -> float:
        """Seconds of `steps` decode-only steps of a constant batch whose context starts at
        `context` and grows by `batch` tokens per step (closed form of the sum)."""
        if steps <= 0 or batch <= 0:
            return 0.0
        fixed = self.overhead_s + max(self.weights_s, batch * self.per_token_s)
        growth = steps * context + batch * steps * (steps - 1) // 2
        return steps * fixed + growth * self.per_context_token_s

    def decode_steps_within(self, batch: int, context: int, seconds: float) -> int:
        """The most whole decode steps (as in `decode_span`) that finish within `seconds`."""
        if seconds <= 0 or batch <= 0:
            return 0
        fixed = self.overhead_s + max(self.weights_s, batch * self.per_token_s)
        # span(k) = a k^2 + b k with a = c B / 2, b = fixed + c C - c B / 2
        c = self.per_context_token_s
        a = c * batch / 2
        b = fixed + c * context - a
        if a > 0:
            k = int((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))
        else:
            k = int(seconds / b)
        # Float rounding: settle on the exact boundary.
        while k > 0 and self.decode_span(batch, context, k) > seconds:
            k -= 1
        while self.decode_span(batch, context, k + 1) <= seconds:
            k += 1
        return k


# ------------------------------------------------------------ calibrated profiles
# `progserve bench calibrate` measures a real engine's step costs and fits the five
# coefficients above; the sim loads them back as a `HardwareProfile` (`--hardware FILE`).
# A profile is physical numbers, so the fit is written as the "effective" hardware that
# yields exactly the measured coefficients: the model's real shape (parameters, layers,
# heads) is kept, and bandwidth, bytes per KV element and peak FLOP/s absorb the rest.
STEP_COST_FLOOR_S = 1e-12  # a coefficient the fit drove to zero (a profile needs > 0)


def profile_for_step_costs(costs: StepCostModel, shape: HardwareProfile) -> HardwareProfile:
    """The `HardwareProfile` of `shape`'s model whose `StepCostModel.from_hardware` gives
    `costs` (up to float rounding): the inverse of `from_hardware`."""
    weights_s = max(costs.weights_s, STEP_COST_FLOOR_S)
    bandwidth = shape.params * shape.bytes_per_param / weights_s
    kv_elems = 2 * shape.num_layers * shape.kv_heads * shape.head_dim
    kv_bytes = max(costs.per_context_token_s, STEP_COST_FLOOR_S) * bandwidth / kv_elems
    gemm_flops = 2 * shape.params / max(costs.per_token_s, STEP_COST_FLOOR_S)
    pair_flops = 4 * shape.num_layers * shape.hidden_size / max(
        costs.per_attention_pair_s, STEP_COST_FLOOR_S)
    peak = max(gemm_flops, pair_flops)  # both efficiencies stay <= 1
    return shape.model_copy(update={
        "hbm_bandwidth": bandwidth, "bandwidth_efficiency": 1.0,
        "kv_bytes_per_elem": kv_bytes, "peak_flops": peak,
        "matmul_efficiency": gemm_flops / peak, "attention_efficiency": pair_flops / peak,
        "step_overhead_s": max(costs.overhead_s, 0.0),
    })


def load_hardware_profile(path: str | Path) -> HardwareProfile:
    """A profile file: a bare `HardwareProfile` JSON, or `bench calibrate`'s output (whose
    `hardware` key holds it)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("hardware"), dict):
        data = data["hardware"]
    return HardwareProfile.model_validate(data)
