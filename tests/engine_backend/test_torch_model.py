"""Our Llama forward pass against transformers' own forward, on the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_backend.torch.kv_pool import KVPool
from engine_backend.torch.model import (
    DecodeGroup,
    ExtendSegment,
    ForwardBatch,
    LlamaModel,
    LlamaSpec,
)

pytest_plugins = ["torch_support"]  # tiny-model fixtures
CPU = torch.device("cpu")


def _load(path: Path) -> tuple[LlamaModel, KVPool]:
    model = LlamaModel.load(path, device=CPU, dtype=torch.float32)
    spec = model.spec
    pool = KVPool(capacity=512, layers=spec.layers, kv_heads=spec.kv_heads,
                  head_dim=spec.head_dim, dtype=torch.float32, device=CPU)  # fmt: skip
    return model, pool


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def _ours_in_pieces(model: LlamaModel, pool: KVPool, ids: torch.Tensor, cut: int) -> torch.Tensor:
    """Prefill `ids[:cut]`, then the rest as a second chunk over the cached prefix, then the
    last token as a decode step: every attention path of the engine, scattered slots."""
    n = len(ids)
    slots = torch.tensor(pool.alloc(n))[torch.randperm(n)]  # not contiguous on purpose
    first = ForwardBatch(ids[:cut], torch.arange(cut), slots[:cut],
                         extends=[ExtendSegment(0, cut, 0, slots[:cut])])  # fmt: skip
    second = ForwardBatch(ids[cut : n - 1], torch.arange(cut, n - 1), slots[cut : n - 1],
                          extends=[ExtendSegment(0, n - 1 - cut, cut, slots[: n - 1])])  # fmt: skip
    last = ForwardBatch(ids[n - 1 :], torch.tensor([n - 1]), slots[n - 1 :],
                        decode_groups=[DecodeGroup(0, 1, torch.tensor([0, n]), slots)])  # fmt: skip
    return torch.cat([model.forward(b, pool) for b in (first, second, last)])


@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_tiny_logits_match_transformers(variant: str, tiny_gqa: Path, tiny_mha: Path) -> None:
    path = tiny_gqa if variant == "gqa" else tiny_mha
    model, pool = _load(path)
    torch.manual_seed(1)
    ids = torch.randint(0, model.spec.vocab_size, (41,))
    expected = _hf_logits(path, ids)
    ours = _ours_in_pieces(model, pool, ids, cut=17)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    "build",
    [
        {"kv_heads": 2, "tie_embeddings": False},
        {
            "kv_heads": 1,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },  # fmt: skip
        {"kv_heads": 2, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ],
    ids=["untied", "llama3-rope", "linear-rope"],
)
def test_variants_match_transformers(build: dict, tiny_dirs: Callable[..., Path]) -> None:
    path = tiny_dirs(layers=2, **build)
    model, pool = _load(path)
    torch.manual_seed(2)
    ids = torch.randint(0, model.spec.vocab_size, (40,))  # past the llama3 original length
    torch.testing.assert_close(
        _ours_in_pieces(model, pool, ids, cut=23), _hf_logits(path, ids), atol=2e-4, rtol=1e-4
    )


def test_spec_reads_old_style_rope_config() -> None:
    spec = LlamaSpec.from_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rope_theta": 123.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [3, 4],
    })  # fmt: skip
    assert spec.rope_theta == 123.0
    assert spec.rope_scaling == {"type": "linear", "factor": 2.0}
    assert spec.kv_heads == 2 and spec.head_dim == 4
    assert spec.eos_token_ids == (3, 4)


@pytest.mark.slow
def test_smollm2_logits_match_transformers() -> None:
    from engine_backend.torch.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    model, pool = _load(path)
    assert model.spec.kv_heads == 3 and model.spec.heads == 9 and model.spec.tie_embeddings
    torch.manual_seed(3)
    ids = torch.randint(0, model.spec.vocab_size, (24,))
    expected = _hf_logits(path, ids)
    ours = _ours_in_pieces(model, pool, ids, cut=11)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
