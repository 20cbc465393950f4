"""Eviction orders for the radix cache: a policy is an eviction *key* per leaf; lowest goes first.

The cache keeps evictable leaves in a heap with lazy invalidation, so a policy's key may
only grow over time (a touch, a pin, a raised priority). The only events that lower a key
are owner events (`unpin`, a lowered owner priority, `retire_owner`); the cache re-pushes
that owner's leaves when they happen. A custom policy must keep to that contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine_backend.radix_cache import TreeNode

EvictionKey = tuple[float, ...]


class OwnerTable:
    """Per-owner retention state: which owners are pinned and each owner's priority."""

    __slots__ = ("pinned", "priorities")

    def __init__(self) -> None:
        self.pinned: set[str] = set()
        self.priorities: dict[str, float] = {}

    def protection(self, node: TreeNode) -> tuple[int, float]:
        """(pinned, priority) of a node: the max protection over the node's owners."""
        owners = node.owners
        priority = node.priority
        if not owners:
            return 0, priority
        pinned = 0 if self.pinned.isdisjoint(owners) else 1  # iterates the smaller set
        priorities = self.priorities
        if len(priorities) < len(owners):  # a prefix shared by many programs
            for owner, owner_priority in priorities.items():
                if owner_priority > priority and owner in owners:
                    priority = owner_priority
        else:
            for owner in owners:
                owner_priority = priorities.get(owner, priority)
                if owner_priority > priority:
                    priority = owner_priority
        return pinned, priority


class EvictionPolicy(Protocol):
    name: str
    uses_owners: bool  # False: the cache skips owner bookkeeping

    def key(self, node: TreeNode, owners: OwnerTable) -> EvictionKey:
        """Eviction key of a leaf; the smallest key is evicted first."""
        ...


class LRUEviction:
    """Least recently used first. Pins and priorities are ignored (the plain baseline)."""

    name = "lru"
    uses_owners = False

    def key(self, node: TreeNode, owners: OwnerTable) -> EvictionKey:
        return (node.last_access,)


class PriorityEviction:
    """Unpinned before pinned, then lower priority first, then least recently used.

    The hooks for program-aware retention: a program waiting on a tool pins its owner
    id, so its prefix is the last thing to go; a program that ended retires its id, so
    what it alone cached (priority `RETIRED`) is the first.
    """

    name = "priority"
    uses_owners = True

    def key(self, node: TreeNode, owners: OwnerTable) -> EvictionKey:
        pinned, priority = owners.protection(node)
        return (pinned, priority, node.last_access)


EVICTION_POLICIES: dict[str, type[LRUEviction] | type[PriorityEviction]] = {
    "lru": LRUEviction,
    "priority": PriorityEviction,
}


def make_eviction_policy(spec: str | EvictionPolicy) -> EvictionPolicy:
    """A policy from its name (`lru`, `priority`) or the policy object itself."""
    if not isinstance(spec, str):
        return spec
    try:
        return EVICTION_POLICIES[spec.lower()]()
    except KeyError:
        known = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction order {spec!r} (known: {known})") from None
