"""progserve's paged-decode Triton kernel as an SGLang attention backend.

`create_backend(runner)` builds a subclass of SGLang's own Triton backend whose decode
path calls `engine_backend.kernels.paged_decode_attention` over SGLang's KV pool and its
`kv_indptr` / `kv_indices` metadata (the same CSR slot lists our engine uses). Everything
the kernel does not cover (prefill/extend, sliding windows, MLA, logit capping, attention
sinks, FP8 KV scales, speculative drafts, decode context parallelism) goes to SGLang's
Triton backend unchanged. Written against SGLang 0.5.23's interfaces; it runs on GPUs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from engine_backend.kernels import paged_decode_attention

BACKEND_NAME = "progserve_triton"


def is_plain_decode(backend: Any, layer: Any, forward_batch: Any, extra: dict[str, Any]) -> bool:
    """True when our kernel computes exactly what SGLang's decode would."""
    return (
        not getattr(backend, "use_mla", False)
        and getattr(backend, "dcp_size", 1) == 1
        and getattr(layer, "sliding_window_size", None) in (None, -1)
        and not getattr(layer, "logit_cap", 0)
        and getattr(layer, "k_scale", None) is None
        and layer.qk_head_dim == layer.v_head_dim
        and getattr(forward_batch, "spec_info", None) is None
        and all(value is None for value in extra.values())
    )


def save_kv(forward_batch: Any, layer: Any, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write this step's K/V at the batch's cache locations (SGLang 0.5.2x and earlier)."""
    # The pool's module is loaded wherever a pool exists: look it up, never import it.
    memory_pool = sys.modules.get("sglang.srt.mem_cache.memory_pool")
    write_loc = getattr(memory_pool, "KVWriteLoc", None)
    loc = write_loc.for_batch(forward_batch) if write_loc is not None else None
    forward_batch.token_to_kv_pool.set_kv_buffer(
        layer, loc if loc is not None else forward_batch.out_cache_loc, k, v
    )


def decode_with_progserve_kernel(
    metadata: Any, q: torch.Tensor, layer: Any, forward_batch: Any
) -> torch.Tensor:
    heads, dim = layer.tp_q_head_num, layer.qk_head_dim
    pool = forward_batch.token_to_kv_pool
    out, _ = paged_decode_attention(
        q.reshape(-1, heads, dim),
        pool.get_key_buffer(layer.layer_id),
        pool.get_value_buffer(layer.layer_id),
        metadata.kv_indptr,
        metadata.kv_indices,
        layer.scaling,
    )
    return out.reshape(-1, heads * layer.v_head_dim)


def backend_class(base: type) -> type:
    """Our backend over SGLang's Triton backend class `base`."""

    class ProgserveTritonAttnBackend(base):  # type: ignore[misc, valid-type]
        def forward_decode(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            layer: Any,
            forward_batch: Any,
            save_kv_cache: bool = True,
            **extra: Any,
        ) -> torch.Tensor:
            if not is_plain_decode(self, layer, forward_batch, extra):
                return super().forward_decode(
                    q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **extra
                )
            if save_kv_cache:
                save_kv(forward_batch, layer, k, v)
            return decode_with_progserve_kernel(self.forward_metadata, q, layer, forward_batch)

    return ProgserveTritonAttnBackend


def create_backend(runner: Any) -> Any:
    """The factory SGLang's attention registry calls with its model runner."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return backend_class(TritonAttnBackend)(runner)
