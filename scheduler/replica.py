"""An engine replica as the scheduler sees it: its in-flight budget, the calls running on it
or parked waiting for it, and an approximate index of the prefixes it caches.

The index (`PrefixIndex`) is what the router reads to estimate a call's cache hit on each
replica; `PrefixTree` implements it with the radix cache, without values. Approximate
twice over, to stay cheap on the hot path: token prompts are keyed by every
`router_token_stride`-th token (a C-speed slice; a prefix shared token by token is shared
on the sampled grid too), text prompts by 16-character blocks (`prompt_key`). The tree is
bounded to about the engine's KV size (`router_tree_tokens`), evicting LRU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine_backend.radix_cache import KeyedTokens, RadixCache, TokenKey

from .ready_queue import ReadyHeap

if TYPE_CHECKING:
    from engine_backend.base import Engine
    from engine_backend.types import Capabilities, GenerateRequest

    from .config import SchedulerConfig
    from .program import CallNode

# Text prompts are keyed by blocks of this many characters (one pseudo-token each): coarse,
# but prefix-consistent and cheap.
TEXT_BLOCK_CHARS = 16

RouteKey = TokenKey  # a prompt encoded for the index: compare it, extend it, nothing else


class PrefixIndex(Protocol):
    """What a replica is believed to cache, in route-key elements."""

    def match(self, key: RouteKey, namespace: str | None) -> int:
        """Elements of `key` the replica caches (its longest cached prefix) in a cache
        namespace (a tenant's cache salt; None: shared)."""
        ...

    def insert(self, key: RouteKey, namespace: str | None) -> None:
        """The replica now caches `key` in `namespace`."""
        ...

    def size(self) -> int:
        """Key elements the index holds (the SGLang router's tree size)."""
        ...


def text_route_key(text: str) -> list[int]:
    return [hash(text[i : i + TEXT_BLOCK_CHARS]) for i in range(0, len(text), TEXT_BLOCK_CHARS)]


def prompt_key(request: GenerateRequest, config: SchedulerConfig) -> tuple[RouteKey, float]:
    """The request's prompt as a route key, and the tokens each key element stands for."""
    ids = request.input_ids
    if ids is not None:
        stride = config.router_token_stride
        full = ids.key_if_current() if type(ids) is KeyedTokens else None
        if full is not None:  # every stride-th 8-byte token of the encoded prompt
            return TokenKey.from_bytes(full.data_strided(stride)), float(stride)
        return TokenKey(ids[::stride]), float(stride)
    return (TokenKey(text_route_key(request.text or "")),
            TEXT_BLOCK_CHARS / config.chars_per_token)


def with_output(key: RouteKey, request: GenerateRequest, output_ids: Sequence[int],
                stride: int) -> RouteKey:
    """A token prompt's key continued with its output, on the prompt's sampling grid
    (every `stride`-th position)."""
    assert request.input_ids is not None
    first = -len(request.input_ids) % stride
    return key.extended(output_ids[first::stride])


class PrefixTree:
    """One replica's `PrefixIndex`: a radix tree without values, bounded in key elements
    (LRU)."""

    __slots__ = ("tree", "capacity")

    def __init__(self, capacity: int) -> None:
        ticks = itertools.count()
        self.tree = RadixCache(eviction="lru", store_values=False, clock=lambda: next(ticks))
        self.capacity = capacity

    def match(self, key: RouteKey, namespace: str | None) -> int:
        return self.tree.match_prefix(key, touch=False, namespace=namespace).length

    def insert(self, key: RouteKey, namespace: str | None) -> None:
        tree = self.tree
        tree.insert(key, namespace=namespace)
        excess = tree.total_size() - self.capacity
        if excess > 0:
            tree.evict(excess)

    def size(self) -> int:
        return self.tree.total_size()


@dataclass(slots=True, eq=False)
class Replica:
    index: int
    engine: Engine
    capabilities: Capabilities
    tree: PrefixIndex
    max_requests: int
    max_tokens: int
    inflight_requests: int = 0
    inflight_tokens: int = 0
    dispatched: int = 0
    running: set[CallNode] = field(default_factory=set)
    parked: ReadyHeap = field(default_factory=lambda: ReadyHeap("parked"))
    healthy: bool = True  # False while down (scheduler/replica_health.py): takes no calls
    kv_capacity: int = 0  # tokens, from the engine's stats at start; 0 = unknown

    def has_room(self, call: CallNode) -> bool:
        if self.inflight_requests >= self.max_requests or not self.healthy:
            return False
        # An idle replica always takes one call, however large.
        return (
            self.inflight_tokens + call.budget_tokens <= self.max_tokens
            or self.inflight_requests == 0
        )

    def has_request_room(self) -> bool:
        return self.healthy and self.inflight_requests < self.max_requests

    def backlog(self) -> int:
        """Calls on the replica or parked waiting for it."""
        return self.inflight_requests + len(self.parked)

    def load_key(self) -> tuple[int, int, int]:
        return (self.inflight_requests, self.inflight_tokens, self.index)


def make_replicas(engines: Sequence[Engine], config: SchedulerConfig) -> list[Replica]:
    # The trees hold sampled keys: one element stands for `router_token_stride` tokens.
    tree_elements = max(1, config.router_tree_tokens // config.router_token_stride)
    return [
        Replica(
            index=i,
            engine=engine,
            capabilities=engine.capabilities(),
            tree=PrefixTree(tree_elements),
            max_requests=config.max_inflight_requests,
            max_tokens=config.max_inflight_tokens,
        )
        for i, engine in enumerate(engines)
    ]
