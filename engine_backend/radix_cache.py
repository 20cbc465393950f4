"""Token-level radix tree over cached prefixes (the KV cache index of the sim and torch engines).

Used three ways: the sim engine (sizes only), the torch engine (values are KV-pool slot
indices, `store_values=True`), and the scheduler's per-replica approximate prefix trees
(`match_prefix(..., touch=False)`).

Design:
- An edge holds a list of tokens; a node's children are keyed by their first token.
- Prefix comparison is C-speed list-slice equality; only the single edge where two
  sequences diverge is searched (galloping, then binary search on slice equality).
- Evictable leaves sit in a heap keyed by the eviction order (`radix_eviction.py`) with
  lazy invalidation: a touch only stamps the node; a stale entry is re-pushed when popped.
- Locks (`inc_lock_ref`) protect a node and its path to the root; the evictable and
  protected sizes move between each other as lock counts cross zero.

Not thread-safe: an engine owns its cache and calls it from one thread.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine_backend.radix_eviction import (
    EvictionKey,
    EvictionPolicy,
    OwnerTable,
    make_eviction_policy,
)

__all__ = ["PrefixMatch", "RadixCache", "TreeNode"]

# Divergence search: first compare growing chunks, then bisect down to this many tokens.
_GALLOP_START = 16
_LINEAR_SCAN = 16


@dataclass(slots=True, eq=False)
class TreeNode:
    key: list[int]
    value: list[int] | None
    parent: TreeNode | None
    last_access: float
    children: dict[int, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    priority: float = 0.0  # max `insert(priority=...)` seen on this path
    owners: set[str] | None = None
    evicted: bool = False

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        head = self.key[:4]
        more = "..." if len(self.key) > 4 else ""
        return f"TreeNode(len={len(self.key)}, key={head}{more}, lock_ref={self.lock_ref})"


@dataclass(slots=True)
class PrefixMatch:
    length: int  # number of matched tokens
    value: list[int]  # per-token values along the matched path ([] without stored values)
    node: TreeNode  # last matched node, split so it ends exactly at `length`; root if 0


def _as_token_list(seq: Sequence[int]) -> list[int]:
    if type(seq) is list:
        return seq  # read only, never stored: edges are slices (copies)
    tolist = getattr(seq, "tolist", None)  # numpy arrays, torch tensors
    return tolist() if tolist is not None else list(seq)


def _common_prefix_len(edge: list[int], key: list[int], start: int) -> int:
    """Length of the common prefix of `edge` and `key[start:]`, given their first tokens match."""
    n = len(edge)
    if key[start : start + n] == edge:
        return n
    limit = min(n, len(key) - start)
    # Gallop with growing chunks: O(position of divergence) C-level compares.
    lo, step = 1, _GALLOP_START
    while True:
        hi = min(lo + step, limit)
        if key[start + lo : start + hi] != edge[lo:hi]:
            break
        if hi == limit:
            return limit
        lo, step = hi, step * 2
    # The first difference lies in [lo, hi): bisect, then scan a short run.
    while hi - lo > _LINEAR_SCAN:
        mid = (lo + hi) // 2
        if key[start + lo : start + mid] == edge[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if key[start + i] != edge[i]:
            return i
    return hi


class RadixCache:
    def __init__(
        self,
        *,
        eviction: str | EvictionPolicy = "lru",
        on_evict: Callable[[list[int]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        store_values: bool = False,
    ) -> None:
        self.policy: EvictionPolicy = make_eviction_policy(eviction)
        self.on_evict = on_evict
        self.clock = clock
        self.store_values = store_values
        self.owners = OwnerTable()
        self.reset()

    # ----------------------------------------------------------------- public API

    def reset(self) -> None:
        """Drop every cached prefix (without calling on_evict). Owner pins/priorities stay."""
        self.root = TreeNode(key=[], value=[] if self.store_values else None, parent=None,
                             last_access=self.clock())
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable_size = 0
        self._protected_size = 0
        self._num_nodes = 0
        self._heap: list[tuple[EvictionKey, int, TreeNode]] = []
        self._seq = itertools.count()
        self._owner_nodes: dict[str, set[TreeNode]] = {}

    def match_prefix(self, key: Sequence[int], *, touch: bool = True) -> PrefixMatch:
        """Longest cached prefix of `key`. Splits the last edge so the match ends on a node."""
        key = _as_token_list(key)
        now = self.clock() if touch else 0.0
        values: list[int] = []
        node, pos, end = self.root, 0, len(key)
        while pos < end:
            child = node.children.get(key[pos])
            if child is None:
                break
            matched = _common_prefix_len(child.key, key, pos)
            if matched < len(child.key):
                child = self._split(child, matched)
            if touch:
                child.last_access = now
            if child.value is not None:
                values += child.value
            node, pos = child, pos + matched
        return PrefixMatch(length=pos, value=values, node=node)

    def insert(
        self,
        key: Sequence[int],
        value: Sequence[int] | None = None,
        *,
        owner: str | None = None,
        priority: float = 0.0,
    ) -> int:
        """Cache `key`; returns how many leading tokens were already cached.

        Values of the already-cached part are not replaced: the caller frees its duplicates.
        """
        key = _as_token_list(key)
        value_list = self._checked_values(key, value)
        now = self.clock()
        node, pos, end = self.root, 0, len(key)
        while pos < end:
            child = node.children.get(key[pos])
            if child is None:
                break
            matched = _common_prefix_len(child.key, key, pos)
            if matched < len(child.key):
                child = self._split(child, matched)
            self._visit(child, now, owner, priority)
            node, pos = child, pos + matched
        if pos < end:
            tail = value_list[pos:] if value_list is not None else None
            self._add_leaf(node, key[pos:], tail, now, owner, priority)
        return pos

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Protect the path node..root from eviction; returns tokens that became protected."""
        self._check_alive(node)
        moved = 0
        root = self.root
        while node is not root:
            if node.lock_ref == 0:
                moved += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]
        self._evictable_size -= moved
        self._protected_size += moved
        return moved

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Release one lock on the path node..root; returns tokens that became evictable."""
        self._check_alive(node)
        moved = 0
        root = self.root
        while node is not root:
            if node.lock_ref <= 0:
                raise ValueError(f"dec_lock_ref on an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key)
                if not node.children:
                    self._push(node)
            node = node.parent  # type: ignore[assignment]
        self._evictable_size += moved
        self._protected_size -= moved
        return moved

    def evict(self, num_tokens: int) -> int:
        """Evict unlocked leaves in eviction order until `num_tokens` are freed (or none is left).

        Calls `on_evict` once with the freed values (when values are stored). Returns the
        number of tokens freed, which may exceed `num_tokens` (whole leaves go).
        """
        freed = 0
        freed_values: list[int] = []
        heap, policy, owners = self._heap, self.policy, self.owners
        while freed < num_tokens and heap:
            entry_key, _, node = heapq.heappop(heap)
            if not self._is_evictable_leaf(node):
                continue
            current = policy.key(node, owners)
            if current != entry_key:  # touched or re-prioritised since it was pushed
                heapq.heappush(heap, (current, next(self._seq), node))
                continue
            freed += self._remove_leaf(node, freed_values)
        if freed_values and self.on_evict is not None:
            self.on_evict(freed_values)
        return freed

    def pin(self, owner: str) -> None:
        """Keep `owner`'s prefixes until unpinned (evicted last under the `priority` order)."""
        self.owners.pinned.add(owner)

    def unpin(self, owner: str) -> None:
        if owner in self.owners.pinned:
            self.owners.pinned.discard(owner)
            self._refresh_owner(owner)

    def set_owner_priority(self, owner: str, priority: float) -> None:
        """Higher keeps longer under the `priority` order."""
        old = self.owners.priorities.get(owner)
        self.owners.priorities[owner] = priority
        if old is not None and priority < old:
            self._refresh_owner(owner)

    def forget_owner(self, owner: str) -> None:
        """Drop an owner's pin, priority and node index (e.g. when its program ends)."""
        self.owners.pinned.discard(owner)
        self.owners.priorities.pop(owner, None)
        self._refresh_owner(owner)
        for node in self._owner_nodes.pop(owner, ()):
            if node.owners is not None:
                node.owners.discard(owner)

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def num_nodes(self) -> int:
        return self._num_nodes

    # ------------------------------------------------------------------ internals

    def _checked_values(self, key: list[int], value: Sequence[int] | None) -> list[int] | None:
        if not self.store_values:
            if value is not None:
                raise ValueError("this RadixCache stores no values (store_values=False)")
            return None
        if value is None:
            raise ValueError("this RadixCache stores values: insert() needs `value`")
        value_list = _as_token_list(value)
        if len(value_list) != len(key):
            raise ValueError(f"value has {len(value_list)} entries for {len(key)} tokens")
        return value_list

    def _visit(self, node: TreeNode, now: float, owner: str | None, priority: float) -> None:
        node.last_access = now
        if priority > node.priority:
            node.priority = priority
        if owner is not None:
            self._add_owner(node, owner)

    def _add_owner(self, node: TreeNode, owner: str) -> None:
        if node.owners is None:
            node.owners = {owner}
        elif owner in node.owners:
            return
        else:
            node.owners.add(owner)
        self._owner_nodes.setdefault(owner, set()).add(node)

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child`'s edge after `at` tokens; the new upper node is returned."""
        parent = child.parent
        assert parent is not None
        upper = TreeNode(
            key=child.key[:at],
            value=child.value[:at] if child.value is not None else None,
            parent=parent,
            last_access=child.last_access,
            lock_ref=child.lock_ref,
            priority=child.priority,
        )
        upper.children[child.key[at]] = child
        parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[at:]
        if child.value is not None:
            child.value = child.value[at:]
        if child.owners:
            for owner in child.owners:
                self._add_owner(upper, owner)
        self._num_nodes += 1
        return upper

    def _add_leaf(
        self,
        parent: TreeNode,
        key: list[int],
        value: list[int] | None,
        now: float,
        owner: str | None,
        priority: float,
    ) -> None:
        leaf = TreeNode(key=key, value=value, parent=parent, last_access=now, priority=priority)
        parent.children[key[0]] = leaf
        if owner is not None:
            self._add_owner(leaf, owner)
        self._evictable_size += len(key)
        self._num_nodes += 1
        self._push(leaf)
        self._maybe_compact_heap()

    def _remove_leaf(self, leaf: TreeNode, freed_values: list[int]) -> int:
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.key[0]]
        leaf.evicted = True
        if leaf.value is not None:
            freed_values += leaf.value
        if leaf.owners:
            for owner in leaf.owners:
                nodes = self._owner_nodes.get(owner)
                if nodes is not None:
                    nodes.discard(leaf)
        size = len(leaf.key)
        self._evictable_size -= size
        self._num_nodes -= 1
        if parent.lock_ref == 0 and not parent.children:
            self._push(parent)
        return size

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return not node.evicted and node.lock_ref == 0 and not node.children

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (self.policy.key(node, self.owners), next(self._seq), node))

    def _refresh_owner(self, owner: str) -> None:
        """Re-push an owner's evictable leaves after their keys went down (lazy heap)."""
        for node in self._owner_nodes.get(owner, ()):
            if self._is_evictable_leaf(node):
                self._push(node)

    def _maybe_compact_heap(self) -> None:
        # Stale entries (leaves that grew children, touched leaves) pile up between evictions.
        if len(self._heap) <= 2 * self._num_nodes + 1024:
            return
        live: dict[int, TreeNode] = {}
        for _, _, node in self._heap:
            if self._is_evictable_leaf(node):
                live[id(node)] = node
        policy, owners, seq = self.policy, self.owners, self._seq
        self._heap = [(policy.key(n, owners), next(seq), n) for n in live.values()]
        heapq.heapify(self._heap)

    def _check_alive(self, node: TreeNode) -> None:
        if node.evicted:
            raise ValueError(f"{node!r} was evicted")
