"""Our own forward pass of a Llama-architecture causal LM over its Hugging Face weights.

RMSNorm, rotary embeddings (with the model's theta and `default` / `linear` / `llama3`
scaling), grouped-query attention over the paged KV pool, SwiGLU MLP, and tied or separate
output embeddings: SmolLM2, Llama 2/3 and TinyLlama are all this architecture.

Q/K/V and gate/up projections are fused into one matrix each at load time, so a layer is
four matrix products over the whole flattened token batch (prefill chunks and decode tokens
together). Attention is the only per-request part (see `ForwardBatch`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine_backend.errors import UnsupportedError
from engine_backend.kernels import cascade_decode_attention, paged_decode_attention
from engine_backend.kernels.ops import Backend

from .kv_pool import KVPool


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_positions: int
    tie_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaSpec:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") not in ("llama", "mistral") or not any(
            a in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs
        ):
            raise UnsupportedError(f"not a Llama-architecture model: {archs}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedError(f"activation {cfg['hidden_act']!r} is not supported")
        if cfg.get("sliding_window"):
            raise UnsupportedError("sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 nests rope settings in `rope_parameters`; older configs have
        # `rope_theta` and `rope_scaling` at the top level.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = rope or dict(cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else scaling,
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with the model's scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
        # between is interpolated smoothly.
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(is_mid, mid, scaled)
    raise UnsupportedError(f"rope scaling {kind!r} is not supported")


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows `[start, end)` of the flat batch. With `prefix_indices`, the group's
    requests share that cached prefix and `indptr`/`indices` list only their own suffixes
    (cascade attention); otherwise they list each request's whole KV."""

    start: int
    end: int
    indptr: torch.Tensor
    indices: torch.Tensor
    prefix_indices: torch.Tensor | None = None


@dataclass(slots=True)
class ExtendSegment:
    """A prefill chunk: rows `[start, start + length)` are one request's tokens at positions
    `[prefix_len, prefix_len + length)`; `kv_indices` are its slots `[0, prefix_len + length)`."""

    start: int
    length: int
    prefix_len: int
    kv_indices: torch.Tensor


@dataclass(slots=True)
class ForwardBatch:
    """One step's flattened tokens. Decode rows come first, then extend segments."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] slot that receives each token's K/V
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    extends: list[ExtendSegment] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None  # rows whose next-token logits are needed


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    def __init__(
        self,
        spec: LlamaSpec,
        tensors: dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        kernel_backend: Backend = "torch",
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.kernel_backend = kernel_backend
        self.sm_scale = 1.0 / math.sqrt(spec.head_dim)

        def take(name: str) -> torch.Tensor:
            return tensors.pop(name).to(device=device, dtype=dtype)

        def take_opt(name: str) -> torch.Tensor | None:
            return take(name) if name in tensors else None

        def fuse(names: list[str]) -> torch.Tensor | None:
            parts = [take_opt(n) for n in names]
            return None if any(p is None for p in parts) else torch.cat(parts, dim=0)  # type: ignore[arg-type]

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = []
        for i in range(spec.layers):
            p = f"model.layers.{i}."
            attn = [f"{p}self_attn.{n}_proj" for n in ("q", "k", "v")]
            mlp = [f"{p}mlp.{n}_proj" for n in ("gate", "up")]
            self.layers.append(
                LayerWeights(
                    input_norm=take(f"{p}input_layernorm.weight"),
                    qkv=fuse([f"{n}.weight" for n in attn]),  # type: ignore[arg-type]
                    qkv_bias=fuse([f"{n}.bias" for n in attn]),
                    o=take(f"{p}self_attn.o_proj.weight"),
                    o_bias=take_opt(f"{p}self_attn.o_proj.bias"),
                    post_norm=take(f"{p}post_attention_layernorm.weight"),
                    gate_up=fuse([f"{n}.weight" for n in mlp]),  # type: ignore[arg-type]
                    gate_up_bias=fuse([f"{n}.bias" for n in mlp]),
                    down=take(f"{p}mlp.down_proj.weight"),
                    down_bias=take_opt(f"{p}mlp.down_proj.bias"),
                )
            )
        self.norm = take("model.norm.weight")
        lm_head = tensors.pop("lm_head.weight", None)
        self.lm_head = (
            self.embed
            if spec.tie_embeddings or lm_head is None
            else lm_head.to(device=device, dtype=dtype)
        )
        freqs = torch.outer(
            torch.arange(spec.max_positions, dtype=torch.float32), rope_inv_freq(spec)
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        kernel_backend: Backend = "torch",
    ) -> LlamaModel:
        from safetensors.torch import load_file

        spec = LlamaSpec.from_config(json.loads((path / "config.json").read_text()))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(file))
        return cls(spec, tensors, device=device, dtype=dtype, kernel_backend=kernel_backend)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Runs the batch, writing its K/V into the pool; returns float32 logits of
        `batch.logit_rows` (all rows when None)."""
        spec = self.spec
        tokens = batch.input_ids.shape[0]
        cos = self.cos[batch.positions][:, None, :]
        sin = self.sin[batch.positions][:, None, :]
        x = self.embed[batch.input_ids]
        q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        for index, w in enumerate(self.layers):
            h = _rms_norm(x, w.input_norm, spec.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
            q = q.view(tokens, spec.heads, spec.head_dim)
            k = k.view(tokens, spec.kv_heads, spec.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            pool.write(index, batch.out_slots, k, v.view(tokens, spec.kv_heads, spec.head_dim))
            attn = self._attention(index, q, batch, pool)
            x = x + F.linear(attn.view(tokens, q_width), w.o, w.o_bias)
            h = _rms_norm(x, w.post_norm, spec.rms_norm_eps)
            gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down, w.down_bias)
        if batch.logit_rows is not None:
            x = x[batch.logit_rows]
        x = _rms_norm(x, self.norm, spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _attention(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch, pool: KVPool
    ) -> torch.Tensor:
        k_cache, v_cache = pool.k_cache(layer), pool.v_cache(layer)
        out = torch.empty_like(q)
        for g in batch.decode_groups:
            if g.prefix_indices is None:
                o, _ = paged_decode_attention(
                    q[g.start : g.end], k_cache, v_cache, g.indptr, g.indices,
                    self.sm_scale, backend=self.kernel_backend,
                )  # fmt: skip
            else:
                o, _ = cascade_decode_attention(
                    q[g.start : g.end], k_cache, v_cache, g.prefix_indices, g.indptr,
                    g.indices, self.sm_scale, backend=self.kernel_backend,
                )  # fmt: skip
            out[g.start : g.end] = o
        for seg in batch.extends:
            out[seg.start : seg.start + seg.length] = self._extend_attention(
                q[seg.start : seg.start + seg.length], k_cache, v_cache, seg
            )
        return out

    def _extend_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: ExtendSegment
    ) -> torch.Tensor:
        """Causal attention of a prefill chunk over its prefix (cached) plus itself."""
        k = k_cache[seg.kv_indices].transpose(0, 1)  # [KVH, P+n, D]
        v = v_cache[seg.kv_indices].transpose(0, 1)
        if seg.prefix_len == 0:
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k, v, is_causal=True, scale=self.sm_scale, enable_gqa=True
            )
            return o.transpose(0, 1)
        # Over a cached prefix, the query heads of a KV head form one matrix product with
        # it (no K/V repeat for GQA): 2-3x faster than SDPA's masked path on CPU.
        n, heads, dim = q.shape
        kv_heads, total = k.shape[0], k.shape[1]
        group = heads // kv_heads
        qg = q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, -1, dim)
        scores = torch.matmul(qg, k.transpose(1, 2)).mul_(self.sm_scale)
        future = torch.arange(total, device=q.device)[None, :] > (
            torch.arange(n, device=q.device)[:, None] + seg.prefix_len
        )
        scores = scores.view(kv_heads, group, n, total).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(kv_heads, -1, total)
        o = torch.matmul(probs, v)  # [KVH, G*n, D]
        return o.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)
