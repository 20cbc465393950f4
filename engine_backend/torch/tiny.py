"""A tiny random Llama with a real byte-level BPE tokenizer, built offline in seconds.

Tests and examples use it where the behaviour, not the quality, of a model matters: it has
every part SmolLM2 has (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings, a chat template), so
the engine's code paths are the same, at a few hundred tokens per second on one core.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Weights drawn wider than HF's 0.02 default give peaked next-token distributions, so
# greedy decoding is never decided by float noise between near-equal logits.
INIT_STD = 0.12


def _corpus() -> Iterator[str]:
    """Local text to train the tokenizer on: a few modules of Python's standard library, so
    the tiny model (and every output the tests see) stays the same from commit to commit."""
    import email
    import json
    import textwrap

    for module in (json, email, textwrap):
        root = Path(module.__file__).resolve()
        paths = sorted(root.parent.glob("*.py")) if root.name == "__init__.py" else [root]
        for path in paths:
            yield path.read_text(errors="replace")


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tiny_llama(
    out_dir: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    tie_embeddings: bool = True,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random LlamaForCausalLM plus tokenizer to `out_dir`; `kv_heads < heads` is GQA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=tie_embeddings,
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random norms too, so that a wrong norm cannot pass unnoticed
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
