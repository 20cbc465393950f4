"""What the plugin does to SGLang, with SGLang's registries passed in (so it is testable
without SGLang's server stack): register the attention backend, and wrap the radix
cache's KV insertion so that it inserts with progserve's program priority."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .backend import BACKEND_NAME, create_backend
from .priorities import ProgramPriorityFeed

RADIX_CACHE = "sglang.srt.mem_cache.radix_cache.RadixCache"
# The methods that read `req.priority` when a request's KV enters the tree: SGLang 0.5.2x
# funnels every insertion through `_insert_cache`; earlier 0.5 releases read it in both
# `cache_finished_req` and `cache_unfinished_req`.
INSERT_METHODS_NEW = ("_insert_cache",)
INSERT_METHODS_OLD = ("cache_finished_req", "cache_unfinished_req")


def insert_methods(radix_cache_cls: type | None) -> tuple[str, ...]:
    if radix_cache_cls is not None and hasattr(radix_cache_cls, "_insert_cache"):
        return INSERT_METHODS_NEW
    return INSERT_METHODS_OLD


def priority_hook(feed: ProgramPriorityFeed) -> Callable[..., Any]:
    """An AROUND hook: while the wrapped method inserts `req`'s KV, `req.priority` is the
    eviction priority progserve wants; the request's scheduling priority is restored."""

    def around(original: Callable[..., Any], cache: Any, req: Any, *args: Any, **kwargs: Any):
        own = getattr(req, "priority", None)
        req.priority = feed.eviction_priority(str(getattr(req, "rid", "")), own)
        try:
            return original(cache, req, *args, **kwargs)
        finally:
            req.priority = own

    return around


def install(
    *,
    register_attention_backend: Callable[[str], Callable[[Callable[..., Any]], Any]],
    register_hook: Callable[[str, Callable[..., Any]], None],
    radix_cache_cls: type | None,
    feed: ProgramPriorityFeed,
    add_backend_choices: Callable[[Iterable[str]], None] | None = None,
    radix_cache_path: str = RADIX_CACHE,
) -> list[str]:
    """Registers everything; returns the hooked targets."""
    register_attention_backend(BACKEND_NAME)(create_backend)
    if add_backend_choices is not None:
        add_backend_choices([BACKEND_NAME])
    hook = priority_hook(feed)
    targets = [f"{radix_cache_path}.{name}" for name in insert_methods(radix_cache_cls)]
    for target in targets:
        register_hook(target, hook)
    return targets
