"""Torch reference paths of the kernels: the engine's implementation on CPU, and the ground
truth the Triton kernels are tested against.

Layouts (SGLang's and FlashInfer's):
- a KV cache is `[slots, kv_heads, head_dim]`; a request's KV is a list of slot ids;
- a batch of slot lists is CSR: `kv_indptr [B+1]`, `kv_indices [kv_indptr[-1]]`;
- queries are `[B, heads, head_dim]`, `heads = kv_heads * group` (GQA: query head `h` reads
  KV head `h // group`);
- `lse` is the natural-log sum of exp of the scaled scores, `[B, heads]`; it lets two
  partial attentions over disjoint key sets merge exactly (`merge_attention_states`).
"""

from __future__ import annotations

import torch


def padded_slot_table(
    kv_indptr: torch.Tensor, kv_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR slot lists -> `[B, Lmax]` slot table (padding repeats a valid slot) and its mask."""
    lens = kv_indptr[1:] - kv_indptr[:-1]
    batch = lens.numel()
    width = int(lens.max()) if batch else 0
    cols = torch.arange(width, device=kv_indptr.device)
    mask = cols[None, :] < lens[:, None]
    if kv_indices.numel() == 0:
        return torch.zeros((batch, width), dtype=torch.long, device=kv_indptr.device), mask
    pos = (kv_indptr[:-1, None] + cols[None, :]).clamp(max=kv_indices.numel() - 1)
    return kv_indices[pos].long(), mask


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[N, KVH, G, D]`, k/v `[N, KVH, L, D]`, mask `[N, L]` -> out `[N, KVH, G, D]`, lse
    `[N, KVH, G]` (float32). Rows without any key give out 0 and lse -inf."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * sm_scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per request over that request's scattered KV slots."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    table, mask = padded_slot_table(kv_indptr, kv_indices)
    k = k_cache[table].permute(0, 2, 1, 3)  # [B, KVH, L, D]
    v = v_cache[table].permute(0, 2, 1, 3)
    out, lse = _attend(q.view(batch, kv_heads, group, dim), k, v, mask, sm_scale)
    return out.reshape(batch, heads, dim), lse.reshape(batch, heads)


def shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of the batch against one shared prefix. The prefix KV is gathered once
    and all `B * group` queries of a KV head meet it in one matrix product."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    k = k_cache[prefix_indices.long()].permute(1, 0, 2)[None]  # [1, KVH, P, D]
    v = v_cache[prefix_indices.long()].permute(1, 0, 2)[None]
    # [B, KVH, G, D] -> [1, KVH, B*G, D]: the batch becomes rows of one product per head.
    qs = q.view(batch, kv_heads, group, dim).permute(1, 0, 2, 3).reshape(1, kv_heads, -1, dim)
    out, lse = _attend(qs, k, v, None, sm_scale)
    out = out.view(kv_heads, batch, group, dim).permute(1, 0, 2, 3).reshape(batch, heads, dim)
    lse = lse.view(kv_heads, batch, group).permute(1, 0, 2).reshape(batch, heads)
    return out, lse


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of two disjoint key sets from their partial results."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_indices: torch.Tensor,
    suffix_indptr: torch.Tensor,
    suffix_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for requests forked from one prefix: shared part once, then each
    request's own suffix, merged."""
    out_p, lse_p = shared_prefix_attention(q, k_cache, v_cache, prefix_indices, sm_scale)
    out_s, lse_s = paged_decode_attention(
        q, k_cache, v_cache, suffix_indptr, suffix_indices, sm_scale
    )
    return merge_attention_states(out_p, lse_p, out_s, lse_s)


def gather_kv_slots(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`pool [R, S, W]` (R = layers * 2 rows of a paged pool) -> `[R, n, W]`: a program's
    KV for every layer, packed contiguously so one copy moves it to the host."""
    return pool[:, slots.long()].contiguous()


def scatter_kv_slots(pool: torch.Tensor, slots: torch.Tensor, packed: torch.Tensor) -> None:
    """Inverse of `gather_kv_slots`: write `packed [R, n, W]` into `slots` of `pool`."""
    pool[:, slots.long()] = packed.to(pool.device, pool.dtype)
