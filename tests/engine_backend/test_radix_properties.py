"""Hypothesis state-machine tests of the radix cache against a reference model.

The model is the set of cached prefixes (a dict prefix -> value of its last token), so the
cache's sizes, matches and values can be checked independently of the tree. Every insert
gets fresh, unique slot values, so a freed slot showing up in a later match would be caught.
"""

from __future__ import annotations

import itertools
from array import array

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine_backend.radix_cache import RadixCache, TokenKey, TreeNode

Prefix = tuple[int, ...]

tokens = st.lists(st.integers(0, 2), max_size=8)
owners = st.sampled_from(["a", "b", "c"])
# How a caller may hand a key over: a list, a TokenKey, or an engine's int64 container.
KEY_FORMS = {"list": lambda key: key, "TokenKey": TokenKey, "array": lambda key: array("q", key),
             "array+output": lambda key: TokenKey(array("q", key[:2])).extended(array("q", key[2:]))}
key_forms = st.sampled_from(sorted(KEY_FORMS))


def cached_prefixes(cache: RadixCache) -> dict[Prefix, int | None]:
    """Every prefix stored in the tree, with the value of its last token."""
    found: dict[Prefix, int | None] = {}
    stack: list[tuple[TreeNode, Prefix]] = [(cache.root, ())]
    while stack:
        node, path = stack.pop()
        values = node.value
        for i, token in enumerate(node.tokens()):
            path = (*path, token)
            found[path] = values[i] if values is not None else None
        stack.extend((child, path) for child in node.children.values())
    return found


class RadixMachine(RuleBasedStateMachine):
    eviction = "lru"

    @initialize()
    def setup(self) -> None:
        ticks = itertools.count()
        self.freed: set[int] = set()
        self.cache = RadixCache(eviction=self.eviction, store_values=True,
                                clock=lambda: float(next(ticks)), on_evict=self._on_evict)
        self.model: dict[Prefix, int] = {}
        self.locks: list[tuple[TreeNode, Prefix]] = []
        self.slots = itertools.count()

    def _on_evict(self, values: list[int]) -> None:
        assert self.freed.isdisjoint(values), "a slot was freed twice"
        self.freed.update(values)

    def _expected_match(self, key: list[int]) -> tuple[int, list[int]]:
        length = 0
        while length < len(key) and tuple(key[: length + 1]) in self.model:
            length += 1
        return length, [self.model[tuple(key[:i])] for i in range(1, length + 1)]

    @rule(key=tokens, owner=owners, form=key_forms)
    def insert(self, key: list[int], owner: str, form: str) -> None:
        values = [next(self.slots) for _ in key]
        expected_present, _ = self._expected_match(key)
        arg = KEY_FORMS[form](key)
        assert self.cache.insert(arg, values, owner=owner) == expected_present
        for i in range(expected_present, len(key)):
            self.model[tuple(key[: i + 1])] = values[i]

    @rule(key=tokens, touch=st.booleans(), form=key_forms)
    def match(self, key: list[int], touch: bool, form: str) -> None:
        found = self.cache.match_prefix(KEY_FORMS[form](key), touch=touch)
        assert (found.length, found.value) == self._expected_match(key)
        assert self.freed.isdisjoint(found.value), "match returned evicted slots"
        assert found.node.size > 0 or found.length == 0
        assert cached_path(found.node) == tuple(key[: found.length])

    @rule(key=tokens)
    def lock(self, key: list[int]) -> None:
        found = self.cache.match_prefix(key)
        self.cache.inc_lock_ref(found.node)
        self.locks.append((found.node, tuple(key[: found.length])))

    @precondition(lambda self: self.locks)
    @rule(which=st.integers(0, 100))
    def unlock(self, which: int) -> None:
        node, _ = self.locks.pop(which % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(num_tokens=st.integers(0, 12))
    def evict(self, num_tokens: int) -> None:
        evictable_before = self.cache.evictable_size()
        freed_before = set(self.freed)
        nodes_before = all_nodes(self.cache)
        freed = self.cache.evict(num_tokens)
        self.check_eviction_order([n for n in nodes_before if n.evicted])
        after = cached_prefixes(self.cache)
        removed = self.model.keys() - after.keys()
        assert after.keys() <= self.model.keys(), "eviction created tokens"
        assert freed == len(removed)
        assert {self.model[p] for p in removed} == self.freed - freed_before
        assert freed >= min(num_tokens, evictable_before) or self.cache.evictable_size() == 0
        for prefix in removed:
            assert not any(path[: len(prefix)] == prefix for _, path in self.locks), (
                "evicted a locked path"
            )
        self.model = {p: v for p, v in self.model.items() if p in after}

    def check_eviction_order(self, evicted: list[TreeNode]) -> None:
        """Nothing evicted ranks above a leaf that stayed (a parent never ranks below its
        child, so this holds for whole evictions, not only single steps)."""
        remaining = evictable_leaves(self.cache)
        if evicted and remaining:
            policy, owners = self.cache.policy, self.cache.owners
            worst_evicted = max(policy.key(n, owners) for n in evicted)
            assert worst_evicted <= min(policy.key(n, owners) for n in remaining)

    @rule(owner=owners)
    def pin(self, owner: str) -> None:
        self.cache.pin(owner)

    @rule(owner=owners)
    def unpin(self, owner: str) -> None:
        self.cache.unpin(owner)

    @rule(owner=owners, priority=st.integers(-2, 2))
    def set_priority(self, owner: str, priority: int) -> None:
        self.cache.set_owner_priority(owner, float(priority))

    @invariant()
    def sizes_add_up(self) -> None:
        cache = self.cache
        assert cache.evictable_size() + cache.protected_size() == cache.total_size()
        assert cache.total_size() == len(self.model)
        locked = {path[:i] for _, path in self.locks for i in range(1, len(path) + 1)}
        assert cache.protected_size() == len(locked)

    @invariant()
    def tree_equals_model(self) -> None:
        assert cached_prefixes(self.cache) == self.model

    @invariant()
    def lock_counts_match_the_locks_held(self) -> None:
        """A node's lock_ref is the number of held locks at or below it."""
        expected: dict[int, int] = {}
        for node, _ in self.locks:
            while node.parent is not None:
                expected[id(node)] = expected.get(id(node), 0) + 1
                node = node.parent
        stack = list(self.cache.root.children.values())
        while stack:
            node = stack.pop()
            assert node.lock_ref == expected.get(id(node), 0), f"lock_ref of {node!r}"
            stack.extend(node.children.values())


def all_nodes(cache: RadixCache) -> list[TreeNode]:
    found, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.children.values())
    return found


def evictable_leaves(cache: RadixCache) -> list[TreeNode]:
    return [n for n in all_nodes(cache) if n.lock_ref == 0 and not n.children]


def cached_path(node: TreeNode) -> Prefix:
    parts: list[list[int]] = []
    while node.parent is not None:
        parts.append(node.tokens())
        node = node.parent
    return tuple(t for part in reversed(parts) for t in part)


class PriorityRadixMachine(RadixMachine):
    eviction = "priority"

    def check_eviction_order(self, evicted: list[TreeNode]) -> None:
        super().check_eviction_order(evicted)
        # In words: a pinned prefix goes only once no unpinned leaf is left to evict.
        pinned = self.cache.owners.pinned

        def is_pinned(node: TreeNode) -> bool:
            return bool(node.owners and not pinned.isdisjoint(node.owners))

        if any(is_pinned(n) for n in evicted):
            assert all(is_pinned(n) for n in evictable_leaves(self.cache))


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestRadixLRU = RadixMachine.TestCase
TestRadixLRU.settings = _settings
TestRadixPriority = PriorityRadixMachine.TestCase
TestRadixPriority.settings = _settings
