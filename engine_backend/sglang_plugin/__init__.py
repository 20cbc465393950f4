"""progserve's SGLang plugin (entry point group `sglang.srt.plugins`, name `progserve`).

SGLang calls `register()` early in each of its processes. It
- registers progserve's Triton paged-decode kernel as the attention backend
  `progserve_triton` (`--attention-backend progserve_triton`), and
- feeds progserve's program priorities into the radix cache's eviction priority
  (`--radix-eviction-policy priority`), read from `$PROGSERVE_PRIORITY_FILE`.

See the README ("SGLang plugin") for how to enable it on a GPU server. Nothing here is
imported by progserve itself; SGLang's modules are imported only inside `register()`.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)


def register() -> list[str]:
    """The entry point. Returns the radix-cache methods it hooked."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .install import RADIX_CACHE, install
    from .priorities import ProgramPriorityFeed

    module_name, _, class_name = RADIX_CACHE.rpartition(".")
    radix_cache_cls = getattr(importlib.import_module(module_name), class_name, None)
    try:  # newer SGLang validates --attention-backend against a list plugins may extend
        from sglang.srt.server_args import add_attention_backend_choices
    except ImportError:
        add_attention_backend_choices = None
    targets = install(
        register_attention_backend=register_attention_backend,
        register_hook=lambda target, hook: HookRegistry.register(target, hook, HookType.AROUND),
        radix_cache_cls=radix_cache_cls,
        feed=ProgramPriorityFeed.from_env(),
        add_backend_choices=add_attention_backend_choices,
    )
    log.info("progserve plugin: attention backend progserve_triton; priority hooks on %s", targets)
    return targets
