"""The kernels' entry points: each runs its Triton kernel or its torch reference path.

`backend="auto"` picks Triton for CUDA tensors and the reference path otherwise;
`backend="triton"` forces Triton (on CPU tensors that needs `TRITON_INTERPRET=1` set before
the first kernel call). The Triton modules are imported only when used.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import reference

Backend = Literal["auto", "triton", "torch"]


def wants_triton(tensor: torch.Tensor, backend: Backend) -> bool:
    if backend == "auto":
        return tensor.is_cuda
    return backend == "triton"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over scattered KV slots (CSR slot lists): `(out, lse)`."""
    if wants_triton(q, backend):
        from . import triton_attention

        return triton_attention.paged_decode_attention(
            q, k_cache, v_cache, kv_indptr, kv_indices, sm_scale
        )
    return reference.paged_decode_attention(q, k_cache, v_cache, kv_indptr, kv_indices, sm_scale)


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_indices: torch.Tensor,
    suffix_indptr: torch.Tensor,
    suffix_indices: torch.Tensor,
    sm_scale: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for a batch forked from one prefix: the prefix KV is read once for the
    whole batch, each request's suffix separately, and the two merged exactly."""
    if not wants_triton(q, backend):
        return reference.cascade_decode_attention(
            q, k_cache, v_cache, prefix_indices, suffix_indptr, suffix_indices, sm_scale
        )
    from . import triton_attention

    out_p, lse_p = triton_attention.shared_prefix_attention(
        q, k_cache, v_cache, prefix_indices, sm_scale
    )
    out_s, lse_s = triton_attention.paged_decode_attention(
        q, k_cache, v_cache, suffix_indptr, suffix_indices, sm_scale
    )
    return reference.merge_attention_states(out_p, lse_p, out_s, lse_s)


def gather_kv_slots(
    pool: torch.Tensor, slots: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """`[rows, S, W]` pool -> `[rows, n, W]` contiguous copy of `slots` (for a swap-out)."""
    if wants_triton(pool, backend):
        from . import triton_swap

        return triton_swap.gather_kv_slots(pool, slots)
    return reference.gather_kv_slots(pool, slots)


def scatter_kv_slots(
    pool: torch.Tensor, slots: torch.Tensor, packed: torch.Tensor, backend: Backend = "auto"
) -> None:
    """Write a packed `[rows, n, W]` buffer back into `slots` of the pool (a swap-in)."""
    if wants_triton(pool, backend):
        from . import triton_swap

        triton_swap.scatter_kv_slots(pool, slots, packed)
        return
    reference.scatter_kv_slots(pool, slots, packed)
