"""Attention and KV-movement kernels over a paged KV cache: Triton kernels for GPUs (and the
Triton interpreter), each with a torch reference path that the engine uses on CPU."""

from .ops import (
    cascade_decode_attention,
    gather_kv_slots,
    paged_decode_attention,
    scatter_kv_slots,
)
from .reference import merge_attention_states

__all__ = [
    "cascade_decode_attention",
    "gather_kv_slots",
    "merge_attention_states",
    "paged_decode_attention",
    "scatter_kv_slots",
]
