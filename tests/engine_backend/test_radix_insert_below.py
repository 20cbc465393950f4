"""`RadixCache.insert_path(below=...)`: starting the walk at a locked node on the key's
path leaves the tree exactly as the walk from the root does (same nodes, access times,
priorities, owners and owner order), and refuses a node it cannot start from."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_backend.radix_cache import RadixCache, TokenKey, TreeNode


def snapshot(cache: RadixCache) -> list[tuple]:
    out = []
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, path = stack.pop()
        path = path + tuple(node.tokens())
        out.append((path, node.last_access, node.priority, node.lock_ref,
                    tuple(sorted(node.owners or ()))))
        stack.extend((child, path) for child in node.children.values())
    owner_order = {owner: [tuple(n.tokens()) for n in nodes]
                   for owner, nodes in cache._owner_nodes.items()}
    return sorted(out) + [owner_order, cache.evictable_size(), cache.protected_size()]


def make() -> RadixCache:
    ticks = itertools.count()
    return RadixCache(eviction="priority", clock=lambda: float(next(ticks)))


seqs = st.lists(st.integers(0, 3), min_size=1, max_size=10)


@given(st.lists(st.tuples(seqs, seqs, st.sampled_from(["a", "b"]), st.integers(-3, 3)),
                min_size=1, max_size=12),
       st.sampled_from([None, "ns"]))
@settings(max_examples=200, deadline=None)
def test_insert_below_a_locked_prefix_equals_the_walk_from_the_root(ops, namespace) -> None:
    plain, below = make(), make()
    for prompt, output, owner, priority in ops:
        key = TokenKey(prompt + output)
        nodes = []
        for cache in (plain, below):  # as an engine: match and lock the prompt, then insert
            node = cache.match_prefix(TokenKey(prompt), namespace=namespace).node
            cache.inc_lock_ref(node)
            nodes.append(node)
        plain.insert_path(key, owner=owner, priority=priority, namespace=namespace)
        below.insert_path(key, owner=owner, priority=priority, namespace=namespace,
                          below=nodes[1])
        for cache, node in zip((plain, below), nodes, strict=True):
            cache.dec_lock_ref(node)
        assert snapshot(below) == snapshot(plain)
        plain.evict(2)
        below.evict(2)
        assert snapshot(below) == snapshot(plain)


def test_insert_below_refuses_an_unlocked_node_or_one_off_the_path() -> None:
    cache = make()
    _, node = cache.insert_path(TokenKey([1, 2, 3]))
    with pytest.raises(ValueError, match="locked"):
        cache.insert_path(TokenKey([1, 2, 3, 4]), below=node)
    cache.inc_lock_ref(node)
    with pytest.raises(ValueError, match="not on the path"):
        cache.insert_path(TokenKey([1, 2, 9, 4]), below=node)
    with pytest.raises(ValueError, match="namespace"):
        cache.insert_path(TokenKey([1, 2, 3, 4]), below=node, namespace="other")
    assert cache.insert_path(TokenKey([1, 2, 3, 4]), below=node)[0] == 3


def test_insert_below_tags_the_path_root_first() -> None:
    """A new owner's nodes are indexed in path order (its leaves are re-pushed in that
    order, which breaks eviction ties), as the walk from the root indexes them."""
    plain, below = make(), make()
    for cache in (plain, below):
        cache.insert_path(TokenKey([1, 2]), owner="a")
        cache.insert_path(TokenKey([1, 2, 3, 4]), owner="a")
    plain.match_prefix(TokenKey([1, 2, 3, 4]))  # the same clock ticks on both sides
    node = below.match_prefix(TokenKey([1, 2, 3, 4])).node
    below.inc_lock_ref(node)
    plain.insert_path(TokenKey([1, 2, 3, 4, 5]), owner="b")
    below.insert_path(TokenKey([1, 2, 3, 4, 5]), owner="b", below=node)
    below.dec_lock_ref(node)
    assert [n.tokens() for n in below._owner_nodes["b"]] == [[1, 2], [3, 4], [5]]
    assert snapshot(below) == snapshot(plain)
