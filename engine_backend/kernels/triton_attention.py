"""Triton attention kernels over a paged KV cache (layouts: see `reference.py`).

Imported lazily (only when a kernel runs on a GPU, or under `TRITON_INTERPRET=1`), because
`triton.jit` decides at decoration time whether it compiles or interprets.

- `paged_decode_attention`: one program per (request, query head) walks the request's slot
  list in blocks, gathering K/V rows by slot id, with an online softmax (FlashDecoding's
  inner loop without the split-K).
- `shared_prefix_attention`: the cascade half for a batch forked from one prefix. One
  program per (KV head, tile of `BLOCK_Q` queries drawn from *all* requests of the batch)
  streams the prefix KV once and meets it with a tensor-core `tl.dot`, instead of every
  request re-reading the same prefix (RelayAttention / Hydragen).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q, K, V, Out, Lse, KvIndptr, KvIndices,
    sm_scale,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ob, stride_oh,
    stride_lb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    start = tl.load(KvIndptr + b)
    end = tl.load(KvIndptr + b + 1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(start, end, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        nmask = offs < end
        slot = tl.load(KvIndices + offs, mask=nmask, other=0).to(tl.int64)
        tile_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
        qk = tl.sum(k * q[None, :], 1) * sm_scale
        qk = tl.where(nmask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=dmask)
    tl.store(Lse + b * stride_lb + h,
             tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf")))  # fmt: skip


@triton.jit
def _shared_prefix_kernel(
    Q, K, V, Out, Lse, PrefixIndices,
    prefix_len, rows, sm_scale,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ob, stride_oh,
    stride_lb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    kvh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # query rows: (request, group)
    rmask = r < rows
    b = r // GROUP
    h = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_off = b[:, None] * stride_qb + h[:, None] * stride_qh + d[None, :]
    q = tl.load(Q + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for s in range(0, prefix_len, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        nmask = offs < prefix_len
        slot = tl.load(PrefixIndices + offs, mask=nmask, other=0).to(tl.int64)
        tile_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
        qk = tl.dot(q, tl.trans(k)) * sm_scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p, v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_off = b[:, None] * stride_ob + h[:, None] * stride_oh + d[None, :]
    tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(Lse + b * stride_lb + h, tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf")),
             mask=rmask)  # fmt: skip


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int, int]:
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV heads")
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    return batch, heads, dim, heads // kv_heads


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, dim, group = _check(q, k_cache)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    _paged_decode_kernel[(batch, heads)](
        q, k_cache, v_cache, out, lse, kv_indptr, kv_indices,
        sm_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_N=block_n,
    )  # fmt: skip
    return out, lse


def shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_indices: torch.Tensor,
    sm_scale: float,
    block_q: int = 16,
    block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, dim, group = _check(q, k_cache)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads), dtype=torch.float32, device=q.device)
    rows = batch * group
    if batch == 0:
        return out, lse
    grid = (k_cache.shape[1], triton.cdiv(rows, block_q))
    _shared_prefix_kernel[grid](
        q, k_cache, v_cache, out, lse, prefix_indices,
        prefix_indices.numel(), rows, sm_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_Q=block_q, BLOCK_N=block_n,
    )  # fmt: skip
    return out, lse
