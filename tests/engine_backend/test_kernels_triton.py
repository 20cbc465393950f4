"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the torch reference
paths; and the reference paths against a naive per-head loop. GQA and odd lengths
everywhere (block sizes never divide them)."""

from __future__ import annotations

import os

# `triton.jit` decides at decoration time whether to compile or interpret, and the kernel
# modules are imported lazily: set the switch before anything imports them.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from engine_backend.kernels import ops, reference  # noqa: E402

SCALE = 0.37


def _interpreted(module_name: str) -> None:
    """Re-decorate a kernel module if something imported it before the switch was set."""
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(f"engine_backend.kernels.{module_name}")
    kernels = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("kernel")]
    if not all(isinstance(k, InterpretedFunction) for k in kernels):
        importlib.reload(module)


@pytest.fixture(autouse=True, scope="module")
def _interpreter() -> None:
    _interpreted("triton_attention")
    _interpreted("triton_swap")


def _paged_batch(
    lengths: list[int], slots: int, kv_heads: int, dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, kv_heads, dim, generator=gen)
    v = torch.randn(slots, kv_heads, dim, generator=gen)
    lists = [torch.randperm(slots, generator=gen)[:n] for n in lengths]
    indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    indices = torch.cat(lists) if lists else torch.empty(0, dtype=torch.long)
    return k, v, indptr, indices, lists


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: list[torch.Tensor]):
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2])
    for b, slots in enumerate(lists):
        for h in range(q.shape[1]):
            scores = (k[slots, h // group] @ q[b, h]) * SCALE
            out[b, h] = torch.softmax(scores, 0) @ v[slots, h // group]
            lse[b, h] = torch.logsumexp(scores, 0)
    return out, lse


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "lengths"),
    [(6, 2, 24, [5, 1, 17, 33]), (9, 3, 64, [70, 3]), (4, 4, 16, [1])],
    ids=["gqa3-odd", "smollm2-shape", "mha-single"],
)
def test_paged_decode_attention(heads: int, kv_heads: int, dim: int, lengths: list[int]) -> None:
    k, v, indptr, indices, lists = _paged_batch(lengths, 101, kv_heads, dim, seed=heads)
    q = torch.randn(len(lengths), heads, dim, generator=torch.Generator().manual_seed(1))
    ref_out, ref_lse = reference.paged_decode_attention(q, k, v, indptr, indices, SCALE)
    naive_out, naive_lse = _naive(q, k, v, lists)
    torch.testing.assert_close(ref_out, naive_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lse, naive_lse, atol=1e-5, rtol=1e-5)
    out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, SCALE, backend="triton")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_empty_request_gives_zero() -> None:
    k, v, indptr, indices, _ = _paged_batch([0, 3], 11, 1, 16, seed=0)
    q = torch.randn(2, 2, 16)
    for backend in ("torch", "triton"):
        out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, SCALE, backend=backend)
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
        assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "prefix", "suffixes"),
    [(5, 6, 2, 41, [1, 2, 7, 1, 13]), (3, 9, 3, 100, [1, 1, 1]), (1, 4, 1, 17, [3])],
    ids=["gqa3", "smollm2-shape", "gqa4-one-request"],
)
def test_cascade_attention_equals_paged_attention_over_the_whole_sequence(
    batch: int, heads: int, kv_heads: int, prefix: int, suffixes: list[int]
) -> None:
    dim = 32
    slots = prefix + sum(suffixes) + 9
    gen = torch.Generator().manual_seed(batch)
    k = torch.randn(slots, kv_heads, dim, generator=gen)
    v = torch.randn(slots, kv_heads, dim, generator=gen)
    perm = torch.randperm(slots, generator=gen)
    prefix_slots = perm[:prefix]
    own, at = [], prefix
    for n in suffixes:
        own.append(perm[at : at + n])
        at += n
    suffix_indptr = torch.tensor([0, *torch.tensor(suffixes).cumsum(0).tolist()])
    whole = [torch.cat([prefix_slots, s]) for s in own]
    whole_indptr = torch.tensor([0, *torch.tensor([len(w) for w in whole]).cumsum(0).tolist()])
    q = torch.randn(batch, heads, dim, generator=gen)
    expected, expected_lse = reference.paged_decode_attention(
        q, k, v, whole_indptr, torch.cat(whole), SCALE
    )
    for backend in ("torch", "triton"):
        out, lse = ops.cascade_decode_attention(
            q, k, v, prefix_slots, suffix_indptr, torch.cat(own), SCALE, backend=backend
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_shared_prefix_kernel_matches_reference_alone() -> None:
    from engine_backend.kernels import triton_attention

    k, v, _, _, _ = _paged_batch([], 57, 3, 64, seed=4)
    prefix = torch.randperm(57)[:37]
    q = torch.randn(7, 9, 64)  # 21 query rows per KV head: two tiles of 16, the last partial
    out, lse = triton_attention.shared_prefix_attention(q, k, v, prefix, SCALE)
    ref_out, ref_lse = reference.shared_prefix_attention(q, k, v, prefix, SCALE)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [24, 300])  # one partial block; several blocks
def test_kv_swap_gather_scatter_roundtrip(width: int) -> None:
    rows, slots = 6, 29
    pool = torch.randn(rows, slots, width)
    chosen = torch.tensor([3, 28, 7, 0, 15])
    for backend in ("torch", "triton"):
        packed = ops.gather_kv_slots(pool, chosen, backend=backend)
        assert packed.shape == (rows, len(chosen), width) and packed.is_contiguous()
        assert torch.equal(packed, pool[:, chosen])
        restored = pool.clone()
        restored[:, chosen] = 0
        others = restored.clone()
        ops.scatter_kv_slots(restored, chosen, packed, backend=backend)
        assert torch.equal(restored, pool)
        # Scatter into different slots leaves everything else alone.
        target = torch.tensor([1, 2, 4, 5, 6])
        ops.scatter_kv_slots(others, target, packed, backend=backend)
        assert torch.equal(others[:, target], packed)
        untouched = [i for i in range(slots) if i not in set(target.tolist() + chosen.tolist())]
        assert torch.equal(others[:, untouched], pool[:, untouched])
