"""Shared fixtures of the torch-engine tests: tiny random Llamas built once per session.

Test modules import these fixtures (there is no conftest of our own here), so pytest sees
one definition per module; the models are therefore cached on disk under the session's
base temp dir, keyed by their build arguments, and built once per session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_backend.torch.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_dirs(**build_kwargs)`: a tiny model directory, built once per distinct kwargs."""
    base = tmp_path_factory.getbasetemp()

    def get(**kwargs: Any) -> Path:
        key = repr(sorted(kwargs.items()))
        path = base / f"tiny-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        if not (path / "tokenizer_config.json").exists():
            build_tiny_llama(path, **kwargs)
        return path

    return get


@pytest.fixture(scope="session")
def tiny_gqa(tiny_dirs: Callable[..., Path]) -> Path:
    """4 query heads over 2 KV heads, tied embeddings (SmolLM2's shape, small)."""
    return tiny_dirs(kv_heads=2)


@pytest.fixture(scope="session")
def tiny_mha(tiny_dirs: Callable[..., Path]) -> Path:
    return tiny_dirs(kv_heads=4)
