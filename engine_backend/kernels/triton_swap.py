"""Triton gather/scatter of KV slots: a preempted program's KV, scattered over the paged pool
in every layer, is packed into one contiguous buffer (one launch), so that a single copy
moves it to host memory; swapping back is one copy in and one scatter (Autellix's swap).

Imported lazily, like `triton_attention`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(Pool, Slots, Packed, n, width, stride_pr, stride_ps,
                   BLOCK_W: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    r = tl.program_id(1)
    slot = tl.load(Slots + i).to(tl.int64)
    src = Pool + r.to(tl.int64) * stride_pr + slot * stride_ps
    dst = Packed + (r.to(tl.int64) * n + i) * width
    for w0 in range(0, width, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        mask = w < width
        tl.store(dst + w, tl.load(src + w, mask=mask), mask=mask)


@triton.jit
def _scatter_kernel(Pool, Slots, Packed, n, width, stride_pr, stride_ps,
                    BLOCK_W: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    r = tl.program_id(1)
    slot = tl.load(Slots + i).to(tl.int64)
    dst = Pool + r.to(tl.int64) * stride_pr + slot * stride_ps
    src = Packed + (r.to(tl.int64) * n + i) * width
    for w0 in range(0, width, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        mask = w < width
        tl.store(dst + w, tl.load(src + w, mask=mask), mask=mask)


def _grid_args(pool: torch.Tensor, slots: torch.Tensor) -> tuple[int, int]:
    if pool.dim() != 3 or pool.stride(2) != 1:
        raise ValueError("pool must be [rows, slots, width] with a contiguous width")
    return slots.numel(), pool.shape[2]


def gather_kv_slots(pool: torch.Tensor, slots: torch.Tensor, block_w: int = 256) -> torch.Tensor:
    n, width = _grid_args(pool, slots)
    packed = torch.empty((pool.shape[0], n, width), dtype=pool.dtype, device=pool.device)
    if n:
        _gather_kernel[(n, pool.shape[0])](
            pool, slots, packed, n, width, pool.stride(0), pool.stride(1), BLOCK_W=block_w
        )
    return packed


def scatter_kv_slots(
    pool: torch.Tensor, slots: torch.Tensor, packed: torch.Tensor, block_w: int = 256
) -> None:
    n, width = _grid_args(pool, slots)
    packed = packed.to(pool.device, pool.dtype).contiguous()
    if n:
        _scatter_kernel[(n, pool.shape[0])](
            pool, slots, packed, n, width, pool.stride(0), pool.stride(1), BLOCK_W=block_w
        )
