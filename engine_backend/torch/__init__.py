"""Torch engine: real compute over Llama-architecture Hugging Face models.

`TorchEngine.from_pretrained(path_or_None, TorchConfig(...))` (None: the embedded SmolLM2,
see `smollm2.ensure_smollm2`). The names below import lazily, so that importing
`engine_backend.torch.config` (the settings section) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TorchEngine": "engine_backend.torch.engine",
    "TorchConfig": "engine_backend.torch.config",
    "ensure_smollm2": "engine_backend.torch.smollm2",
    "build_tiny_llama": "engine_backend.torch.tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
