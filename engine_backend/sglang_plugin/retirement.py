"""An ended program's KV goes first in SGLang's radix cache (what the sim and torch
engines do with `RadixCache.retire_owner`).

SGLang's `--radix-eviction-policy priority` evicts leaves by (priority, last access), and
a node's priority is the highest of the requests that inserted through it. The plugin
records, for each insertion whose request id names a program, the nodes on the inserted
path as that program's; when progserve lists the program as ended, the nodes that no
other recorded program owns drop to `RETIRED_PRIORITY`, below any request's, so they go
before anything a live program may still need. A later request through such a node
raises it back (SGLang takes the max on insert), so a shared prefix that is still in
use does not stay retired.

Ownership survives SGLang's node splits (`on_split`: the new upper node gets the lower
one's owners), so a path already recorded for a program is not walked again. Bounded:
nodes are held weakly (an evicted, dropped node leaves), and at most `max_programs`
programs are tracked; the one that inserted least recently is forgotten (its nodes keep
their priorities, as without the plugin).

Runs inside SGLang's scheduler process, on its thread; no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

# Below any request priority progserve sends (|priority| < 2**31) and above SGLang's
# root (-sys.maxsize), which is never evicted anyway.
RETIRED_PRIORITY = -(1 << 62)
MAX_PROGRAMS = 65_536


class ProgramRetirement:
    def __init__(self, max_programs: int = MAX_PROGRAMS) -> None:
        self.max_programs = max_programs
        self._owners: WeakKeyDictionary[Any, set[str]] = WeakKeyDictionary()
        self._nodes: OrderedDict[str, WeakSet[Any]] = OrderedDict()
        self.current: str | None = None  # the program whose KV is being inserted now
        self.retired_nodes = 0  # cumulative, for logs and tests

    def tracked_programs(self) -> int:
        return len(self._nodes)

    def owners(self, node: Any) -> frozenset[str]:
        return frozenset(self._owners.get(node, ()))

    def record(self, program: str, node: Any, root: Any) -> None:
        """`node` ends a path `program` inserted: it owns the path up to the root."""
        nodes = self._nodes.get(program)
        if nodes is None:
            nodes = self._nodes[program] = WeakSet()
            if len(self._nodes) > self.max_programs:
                self._forget(next(iter(self._nodes)))
        else:
            self._nodes.move_to_end(program)
        while node is not None and node is not root and node not in nodes:
            nodes.add(node)
            owners = self._owners.get(node)
            if owners is None:
                self._owners[node] = {program}
            else:
                owners.add(program)
            node = node.parent

    def on_split(self, upper: Any, lower: Any) -> None:
        """SGLang cut `lower`'s edge; `upper` is the new node above it."""
        owners = self._owners.get(lower)
        if not owners:
            return
        self._owners[upper] = set(owners)
        for program in owners:
            nodes = self._nodes.get(program)
            if nodes is not None:
                nodes.add(upper)

    def retire(self, program: str) -> int:
        """The program ended: what only it owned drops to `RETIRED_PRIORITY`. Returns the
        number of nodes retired."""
        nodes = self._nodes.pop(program, None)
        retired = 0
        for node in list(nodes or ()):
            owners = self._owners.get(node)
            if owners is None:
                continue
            owners.discard(program)
            if not owners and getattr(node, "value", None) is not None:  # not evicted
                node.priority = RETIRED_PRIORITY
                retired += 1
        self.retired_nodes += retired
        return retired

    def _forget(self, program: str) -> None:
        for node in list(self._nodes.pop(program, ())):
            owners = self._owners.get(node)
            if owners is not None:
                owners.discard(program)
