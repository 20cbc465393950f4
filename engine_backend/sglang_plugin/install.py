"""What the plugin does to SGLang, with SGLang's registries passed in (so it is testable
without SGLang's server stack): register the attention backend, wrap the radix cache's
KV insertion so that it inserts with progserve's program priority, and (SGLang versions
whose `insert` returns the node it ended at) retire ended programs' KV
(`retirement.py`): the insert records the path's owner, node splits pass ownership on,
and eviction first retires the programs progserve listed as ended."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .backend import BACKEND_NAME, create_backend
from .priorities import ProgramPriorityFeed, program_of_rid
from .retirement import ProgramRetirement

RADIX_CACHE = "sglang.srt.mem_cache.radix_cache.RadixCache"
# The methods that read `req.priority` when a request's KV enters the tree: SGLang 0.5.2x
# funnels every insertion through `_insert_cache`; earlier 0.5 releases read it in both
# `cache_finished_req` and `cache_unfinished_req`.
INSERT_METHODS_NEW = ("_insert_cache",)
INSERT_METHODS_OLD = ("cache_finished_req", "cache_unfinished_req")
# The tree operations the retirement hooks wrap (a newer `insert` returns its last node).
TREE_INSERT, TREE_SPLIT, TREE_EVICT = "insert", "_split_node", "evict"


def insert_methods(radix_cache_cls: type | None) -> tuple[str, ...]:
    if radix_cache_cls is not None and hasattr(radix_cache_cls, "_insert_cache"):
        return INSERT_METHODS_NEW
    return INSERT_METHODS_OLD


def priority_hook(
    feed: ProgramPriorityFeed, retirement: ProgramRetirement | None = None
) -> Callable[..., Any]:
    """An AROUND hook: while the wrapped method inserts `req`'s KV, `req.priority` is the
    eviction priority progserve wants (the request's scheduling priority is restored),
    and `retirement.current` names the request's program for the tree-insert hook."""

    def around(original: Callable[..., Any], cache: Any, req: Any, *args: Any, **kwargs: Any):
        own = getattr(req, "priority", None)
        rid = str(getattr(req, "rid", ""))
        req.priority = feed.eviction_priority(rid, own)
        if retirement is not None:
            retire_ended(feed, retirement)
            retirement.current = program_of_rid(rid)
        try:
            return original(cache, req, *args, **kwargs)
        finally:
            req.priority = own
            if retirement is not None:
                retirement.current = None

    return around


def retire_ended(feed: ProgramPriorityFeed, retirement: ProgramRetirement) -> None:
    for program in feed.take_ended():
        retirement.retire(program)


def tree_insert_hook(retirement: ProgramRetirement) -> Callable[..., Any]:
    """Records the inserted path for the program being inserted (if any)."""

    def around(original: Callable[..., Any], cache: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(cache, *args, **kwargs)
        program = retirement.current
        node = getattr(result, "last_device_node", None)
        if program is not None and node is not None:
            retirement.record(program, node, cache.root_node)
        return result

    return around


def tree_split_hook(retirement: ProgramRetirement) -> Callable[..., Any]:
    def around(original: Callable[..., Any], cache: Any, key: Any, child: Any,
               *args: Any, **kwargs: Any) -> Any:
        upper = original(cache, key, child, *args, **kwargs)
        retirement.on_split(upper, child)
        return upper

    return around


def tree_evict_hook(feed: ProgramPriorityFeed, retirement: ProgramRetirement) -> Callable[..., Any]:
    """Before SGLang picks victims, ended programs' nodes are retired."""

    def around(original: Callable[..., Any], cache: Any, *args: Any, **kwargs: Any) -> Any:
        retire_ended(feed, retirement)
        return original(cache, *args, **kwargs)

    return around


def install(
    *,
    register_attention_backend: Callable[[str], Callable[[Callable[..., Any]], Any]],
    register_hook: Callable[[str, Callable[..., Any]], None],
    radix_cache_cls: type | None,
    feed: ProgramPriorityFeed,
    add_backend_choices: Callable[[Iterable[str]], None] | None = None,
    radix_cache_path: str = RADIX_CACHE,
    retirement: ProgramRetirement | None = None,
) -> list[str]:
    """Registers everything; returns the hooked targets. Retirement hooks go in when the
    radix cache has the tree operations they wrap (`retirement`: the tracker to use)."""
    register_attention_backend(BACKEND_NAME)(create_backend)
    if add_backend_choices is not None:
        add_backend_choices([BACKEND_NAME])
    tree_ops = (TREE_INSERT, TREE_SPLIT, TREE_EVICT)
    if radix_cache_cls is None or not all(hasattr(radix_cache_cls, op) for op in tree_ops):
        retirement = None
    elif retirement is None:
        retirement = ProgramRetirement()
    hooks: list[tuple[str, Callable[..., Any]]] = [
        (name, priority_hook(feed, retirement)) for name in insert_methods(radix_cache_cls)
    ]
    if retirement is not None:
        hooks += [(TREE_INSERT, tree_insert_hook(retirement)),
                  (TREE_SPLIT, tree_split_hook(retirement)),
                  (TREE_EVICT, tree_evict_hook(feed, retirement))]
    targets = []
    for name, hook in hooks:
        target = f"{radix_cache_path}.{name}"
        register_hook(target, hook)
        targets.append(target)
    return targets
