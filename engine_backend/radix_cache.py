"""Token-level radix tree over cached prefixes (the KV cache index of the sim and torch engines).

Used three ways: the sim engine (sizes only), the torch engine (values are KV-pool slot
indices, `store_values=True`), and the scheduler's per-replica approximate prefix trees
(`match_prefix(..., touch=False)`).

Design:
- Keys are encoded once into bytes, 8 bytes per token (`TokenKey`, little-endian int64:
  the layout of SGLang's `array("q")`, numpy's and torch's int64), so every prefix
  comparison is a memcmp (`bytes.startswith` at an offset) instead of a per-token loop.
  Encoding costs a copy for a container with the buffer protocol (an int64 one is copied
  as is, a narrower one widened in C, a torch tensor read through its host numpy view)
  and one C pass over a list. A caller that reuses a `TokenKey` (the router across
  replicas, an engine from admission to finish, `extended` by the output) pays it once.
  A node's children are keyed by their first token's bytes.
- Only the single edge where two keys diverge is searched, by bisection on memcmp.
- Evictable leaves sit in a heap keyed by the eviction order (`radix_eviction.py`) with
  lazy invalidation: a touch only stamps the node; a stale entry is re-pushed when popped.
- Locks (`inc_lock_ref`) protect a node and its path to the root; the evictable and
  protected sizes move between each other as lock counts cross zero.
- Namespaces (`namespace=` on match and insert; the engines pass the request's
  `cache_salt`): each has its own root, an empty, permanently locked node under the real
  root, so keys of different namespaces never share a node. It costs one dict lookup per
  call, nothing per token, and no size: eviction and capacity stay global.

Not thread-safe: an engine owns its cache and calls it from one thread.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine_backend.radix_eviction import (
    EvictionPolicy,
    OwnerTable,
    make_eviction_policy,
)

__all__ = ["KeyedTokens", "PrefixMatch", "RadixCache", "TokenKey", "TreeNode"]

TOKEN_BYTES = 8  # an encoded token: little-endian int64 (SGLang's and numpy's token width)
_LITTLE_ENDIAN = sys.byteorder == "little"
# Priority of nodes whose every owner ended (`retire_owner`): below any request's.
RETIRED = -math.inf


def _as_token_list(seq: Sequence[int]) -> list[int]:
    if type(seq) is list:
        return seq
    tolist = getattr(seq, "tolist", None)  # numpy arrays, torch tensors
    return tolist() if tolist is not None else list(seq)


# Buffer formats whose items already are the key's layout (int64 in this machine's order).
_INT64_FORMATS = frozenset({"q", "l", "n", "@q", "@l", "@n", "=q", "<q"} if _LITTLE_ENDIAN else ())
_INT_CODES = frozenset("bBhHiIlLqQnN?")  # struct codes of integers (bool counts: 0 and 1)


def _high_bytes_clear(data: bytes) -> bool:
    """Whether every encoded token is in [0, 2**63): the top byte of each is below 0x80."""
    return data[TOKEN_BYTES - 1 :: TOKEN_BYTES].isascii()


def _checked_unsigned(data: bytes) -> bytes:
    if _high_bytes_clear(data):
        return data
    raise ValueError("token ids must be 64-bit ints")


def _encode_list(tokens: list[int]) -> bytes:
    if _LITTLE_ENDIAN:
        try:
            # One C pass; 'Q' converts much faster than 'q' or struct.pack. It takes every
            # id in [0, 2**64), so ids at or above 2**63 (not int64) are caught after.
            data = array("Q", tokens).tobytes()
        except (OverflowError, TypeError):
            pass  # a negative id (valid), or not an int: struct decides
        else:
            return _checked_unsigned(data)
    try:
        return struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be 64-bit ints: {exc}") from None


def _encode_buffer(view: memoryview) -> bytes:
    """A 1-D buffer of integers (array.array, numpy array, bytes) -> the key's bytes."""
    if view.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got {view.ndim} dimensions")
    if view.itemsize == TOKEN_BYTES and view.format in _INT64_FORMATS:
        return view.tobytes()  # already the layout: one copy
    code = view.format.lstrip("@=<>!")
    if code not in _INT_CODES:
        raise ValueError(f"token ids must be integers, got buffer format {view.format!r}")
    unsigned64 = view.itemsize == TOKEN_BYTES and code in "QLN"
    if unsigned64 and _LITTLE_ENDIAN and view.format == code:
        return _checked_unsigned(view.tobytes())
    return _widen(view, unsigned64)


def _widen(view: memoryview, unsigned64: bool) -> bytes:
    """Narrower or foreign-order integers -> int64 little-endian, in C where numpy is."""
    try:
        import numpy
    except ImportError:  # a Python pass instead
        try:
            tokens = view.tolist()
        except NotImplementedError:
            raise ValueError(f"unsupported buffer format {view.format!r}") from None
        return _encode_list(tokens)
    if unsigned64:
        return _checked_unsigned(numpy.asarray(view).astype("<u8", copy=False).tobytes())
    return numpy.asarray(view).astype("<i8", copy=False).tobytes()


def _host_array(tensor: object) -> object:
    """A torch tensor (any device) -> a numpy array in host memory (a copy off the device)."""
    try:
        return tensor.numpy()  # type: ignore[attr-defined]  # a CPU tensor: a view
    except (RuntimeError, TypeError):
        pass  # on a device, or part of an autograd graph
    try:
        return tensor.detach().cpu().numpy()  # type: ignore[attr-defined]
    except (RuntimeError, TypeError) as exc:  # e.g. bfloat16, which numpy lacks
        raise ValueError(f"token ids must be integers: {exc}") from None


def encode_tokens(tokens: Sequence[int] | TokenKey) -> bytes:
    """Token ids -> 8 bytes each (little-endian int64), at the cost of a copy for the
    containers engines hold: an `array("q")` or int64 numpy array is copied as is, a torch
    tensor through its host numpy view, narrower integer arrays are widened in C, and a
    list is converted in one C pass. Every later comparison is a memcmp."""
    if type(tokens) is list:
        return _encode_list(tokens)
    if type(tokens) is TokenKey:
        return tokens.data
    if type(tokens) is KeyedTokens:  # e.g. a sim reply's tokens: encoded with its pool
        key = tokens.key_if_current()
        return key.data if key is not None else _encode_list(tokens)
    try:
        view = memoryview(tokens)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        pass  # no buffer protocol (or numpy's object arrays, which refuse it)
    else:
        with view:
            if view.format != "O":  # numpy object arrays: Python ints, as a list below
                return _encode_buffer(view)
    if hasattr(tokens, "cpu") and hasattr(tokens, "numpy"):  # a torch tensor
        with memoryview(_host_array(tokens)) as view:  # type: ignore[arg-type]
            return _encode_buffer(view)
    if isinstance(tokens, list):
        return _encode_list(tokens)
    return _encode_list(_as_token_list(tokens))


def decode_tokens(data: bytes) -> list[int]:
    tokens = array("q")
    tokens.frombytes(data)
    return tokens.tolist()


class TokenKey:
    """Token ids encoded once for the cache. Pass it instead of a list to skip re-encoding:
    the router matches one prompt against every replica's tree, and an engine inserts
    `key.extended(output_ids)` at finish, encoding only the new tokens."""

    __slots__ = ("data",)

    def __init__(self, tokens: Sequence[int] | TokenKey = ()) -> None:
        """Any 1-D integer container: a list, `array.array`, numpy array, torch tensor (any
        device), or another `TokenKey`; each costs about what copying it does."""
        self.data = encode_tokens(tokens)

    @classmethod
    def of_token_ids(cls, ids: Sequence[int]) -> TokenKey:
        """The key of the token ids an engine received: the key a `KeyedTokens` carries
        (free, unless the list was resized since), else encoded (`encode_token_ids`:
        ValueError on a negative id)."""
        if type(ids) is KeyedTokens:
            key = ids.key_if_current()
            if key is not None:
                return key
        key = cls.__new__(cls)
        key.data = encode_token_ids(ids)
        return key

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenKey:
        if len(data) % TOKEN_BYTES:
            raise ValueError(f"encoded key length is not a multiple of {TOKEN_BYTES} bytes")
        key = cls.__new__(cls)
        key.data = data
        return key

    def extended(self, tokens: Sequence[int] | TokenKey) -> TokenKey:
        """This key followed by `tokens` (any container `TokenKey()` takes): encodes only
        the new tokens, then one copy of the whole."""
        key = TokenKey.__new__(TokenKey)
        key.data = self.data + encode_tokens(tokens)
        return key

    def tokens(self) -> list[int]:
        return decode_tokens(self.data)

    def data_strided(self, stride: int) -> bytes:
        """The encoding of every `stride`-th token (`tokens()[::stride]`), by a C slice."""
        data = self.data
        if not data:
            return data
        return memoryview(data).cast("B", (len(data) // TOKEN_BYTES, TOKEN_BYTES))[::stride].tobytes()

    def __len__(self) -> int:
        return len(self.data) // TOKEN_BYTES

    def __repr__(self) -> str:
        return f"TokenKey(len={len(self)})"


def encode_token_ids(tokens: Sequence[int] | TokenKey) -> bytes:
    """Like `encode_tokens`, for token ids, which are never negative: raises ValueError on a
    negative id (its top byte is set, as is that of an id at or above 2**63)."""
    if type(tokens) is KeyedTokens:
        key = tokens.key_if_current()  # checked when it was encoded
        if key is not None:
            return key.data
    if isinstance(tokens, list) and _LITTLE_ENDIAN:
        try:
            data = array("Q", tokens).tobytes()  # as in _encode_list, one check below
        except (OverflowError, TypeError):
            raise ValueError("token ids must be non-negative 64-bit ints") from None
    else:
        data = encode_tokens(tokens)
    if not _high_bytes_clear(data):
        raise ValueError("token ids must be non-negative 64-bit ints")
    return data


class KeyedTokens(list[int]):
    """A token-id list that carries its encoded `TokenKey` (`key`). A client that builds
    prompts by appending to earlier ones (a chat history, an agent's trajectory) encodes
    each new piece once (`concat`), and an engine or router takes `key` instead of
    re-encoding the whole prompt on every call. Ids are non-negative (checked when
    encoded). Never mutate one in place: its key would go stale (a list built from it, by
    `+` or slicing, is a plain list again)."""

    __slots__ = ("key",)

    key: TokenKey

    @classmethod
    def of(cls, tokens: Sequence[int]) -> KeyedTokens:
        out = cls(tokens)
        out.key = TokenKey.from_bytes(encode_token_ids(out))
        return out

    @classmethod
    def with_key(cls, tokens: list[int], key: TokenKey) -> KeyedTokens:
        """`tokens` with a key the caller already has for them (e.g. a slice of a longer
        key's bytes): nothing is encoded."""
        if len(key.data) != len(tokens) * TOKEN_BYTES:
            raise ValueError(f"a key of {len(key)} tokens for {len(tokens)} tokens")
        out = cls(tokens)
        out.key = key
        return out

    @classmethod
    def concat(cls, *parts: Sequence[int]) -> KeyedTokens:
        """The parts end to end; only the parts without a key are encoded."""
        out = cls()
        data: list[bytes] = []
        for part in parts:
            out += part
            key = part.key_if_current() if type(part) is KeyedTokens else None
            data.append(key.data if key is not None else encode_token_ids(part))
        out.key = TokenKey.from_bytes(b"".join(data))
        return out

    def key_if_current(self) -> TokenKey | None:
        """`key`, unless the list was resized since it was built (a cheap staleness check)."""
        try:
            key = self.key
        except AttributeError:  # being built (`of`)
            return None
        return key if len(key.data) == len(self) * TOKEN_BYTES else None


@dataclass(slots=True, eq=False)
class TreeNode:
    key: bytes  # encoded tokens of the edge into this node
    value: list[int] | None
    parent: TreeNode | None
    last_access: float
    children: dict[bytes, TreeNode] = field(default_factory=dict)  # by first token's bytes
    lock_ref: int = 0
    priority: float = 0.0  # max `insert(priority=...)` seen on this path; RETIRED: orphaned
    owners: set[str] | None = None
    evicted: bool = False

    @property
    def size(self) -> int:
        return len(self.key) // TOKEN_BYTES

    def tokens(self) -> list[int]:
        return decode_tokens(self.key)

    def __repr__(self) -> str:
        return f"TreeNode(size={self.size}, lock_ref={self.lock_ref}, evicted={self.evicted})"


@dataclass(slots=True)
class PrefixMatch:
    length: int  # number of matched tokens
    node: TreeNode  # last matched node, split so it ends exactly at `length`; root if 0

    @property
    def value(self) -> list[int]:
        """Per-token values along the matched path ([] without stored values), gathered
        when asked for (a caller that needs only the length pays nothing, as with SGLang's
        separate `path_device_indices`). Read it before the path can be evicted, or lock
        `node` first; later splits and inserts do not change it."""
        parts: list[list[int]] = []
        node = self.node
        while node.parent is not None:
            if node.value is None:
                return []
            parts.append(node.value)
            node = node.parent
        values: list[int] = []
        for part in reversed(parts):
            values += part
        return values


def _shared_bytes(edge: bytes, data: bytes, start: int) -> int:
    """Bytes (whole tokens) shared by `edge` and `data[start:]`; their first tokens are equal."""
    # Bisect on memcmp: `lo` tokens are shared, `hi` tokens are not.
    lo, hi = 1, min(len(edge), len(data) - start) // TOKEN_BYTES + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if data.startswith(edge[: mid * TOKEN_BYTES], start):
            lo = mid
        else:
            hi = mid
    return lo * TOKEN_BYTES


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
        self.root = TreeNode(key=b"", value=[] if self.store_values else None, parent=None,
                             last_access=self.clock())
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable_size = 0
        self._protected_size = 0
        self._num_nodes = 0
        # (*EvictionKey, seq, node): every policy's keys have one length.
        self._heap: list[tuple[object, ...]] = []
        self._seq = itertools.count()
        # Insertion-ordered (dicts as sets): re-pushing an owner's leaves in a fixed order
        # keeps eviction ties, hence runs, independent of memory addresses.
        self._owner_nodes: dict[str, dict[TreeNode, None]] = {}
        self._namespace_roots: dict[str, TreeNode] = {}

    def match_prefix(
        self, key: Sequence[int] | TokenKey, *, touch: bool = True, namespace: str | None = None
    ) -> PrefixMatch:
        """Longest cached prefix of `key` (within `namespace`). Splits the last edge so the
        match ends on a node."""
        # Hot: the common cases inline (a TokenKey, a namespace seen before).
        data = key.data if type(key) is TokenKey else encode_tokens(key)
        now = self.clock() if touch else 0.0
        node = self.root if namespace is None else (
            self._namespace_roots.get(namespace) or self._namespace_root(namespace))
        pos, end = 0, len(data)
        while pos < end:
            # Hot loop: the step is spelled out here and in insert() (no call per node).
            child = node.children.get(data[pos : pos + TOKEN_BYTES])
            if child is None:
                break
            if not data.startswith(child.key, pos):
                child = self._split(child, _shared_bytes(child.key, data, pos))
            if touch:
                child.last_access = now
            node, pos = child, pos + len(child.key)
        return PrefixMatch(length=pos // TOKEN_BYTES, node=node)

    def insert(
        self,
        key: Sequence[int] | TokenKey,
        value: Sequence[int] | None = None,
        *,
        owner: str | None = None,
        priority: float = 0.0,
        namespace: str | None = None,
    ) -> int:
        """Cache `key` (within `namespace`); returns how many leading tokens were already
        cached.

        Values of the already-cached part are not replaced: the caller frees its duplicates.
        """
        return self.insert_path(key, value, owner=owner, priority=priority,
                                namespace=namespace)[0]

    def insert_path(
        self,
        key: Sequence[int] | TokenKey,
        value: Sequence[int] | None = None,
        *,
        owner: str | None = None,
        priority: float = 0.0,
        namespace: str | None = None,
        below: TreeNode | None = None,
    ) -> tuple[int, TreeNode]:
        """`insert`, also returning the node where `key` now ends (to lock it without
        another walk): (tokens already cached, node).

        `below`: a node the caller holds locked whose path (root to it, in `namespace`) is
        a prefix of `key`, as an engine's request holds the node of its cached prefix.
        The walk then starts there: its path is updated as the walk from the root would
        (same nodes, same order) by following parent links, with no edge lookups or
        compares."""
        data = key.data if type(key) is TokenKey else encode_tokens(key)
        value_list = (None if value is None and not self.store_values
                      else self._checked_values(len(data) // TOKEN_BYTES, value))
        now = self.clock()
        if not self.policy.uses_owners:
            owner = None  # nothing reads owners: skip the bookkeeping
        node = self.root if namespace is None else (
            self._namespace_roots.get(namespace) or self._namespace_root(namespace))
        pos, end = 0, len(data)
        if below is not None and below is not node:
            node, pos = self._touch_path(node, below, data, now, owner, priority)
        while pos < end:
            child = node.children.get(data[pos : pos + TOKEN_BYTES])
            if child is None:
                break
            if not data.startswith(child.key, pos):
                child = self._split(child, _shared_bytes(child.key, data, pos))
            child.last_access = now
            if priority > child.priority:
                child.priority = priority
            if owner is not None:
                owners = child.owners
                if owners is None or owner not in owners:
                    self._add_owner(child, owner)
            node, pos = child, pos + len(child.key)
        present = pos // TOKEN_BYTES
        if pos < end:
            tail = value_list[present:] if value_list is not None else None
            node = self._add_leaf(node, data[pos:], tail, now, owner, priority)
        return present, node

    def _touch_path(self, top: TreeNode, below: TreeNode, data: bytes, now: float,
                    owner: str | None, priority: float) -> tuple[TreeNode, int]:
        """`insert_path`'s walk from `top` down to the locked node `below`, by parent links:
        (below, its depth in bytes)."""
        if below.evicted or not below.lock_ref:
            raise ValueError(f"insert below {below!r}: it must be locked")
        path: list[TreeNode] = []
        pos = 0
        node = below
        while node is not top:
            path.append(node)
            pos += len(node.key)
            node = node.parent  # type: ignore[assignment]
            if node is None:
                raise ValueError(f"{below!r} is not in the key's namespace")
        if pos > len(data) or not data.startswith(below.key, pos - len(below.key)):
            raise ValueError(f"{below!r} is not on the path of the key")
        for node in reversed(path):
            node.last_access = now
            if priority > node.priority:
                node.priority = priority
            if owner is not None:
                owners = node.owners
                if owners is None or owner not in owners:
                    self._add_owner(node, owner)
        return below, pos

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Protect the path node..root from eviction; returns tokens that became protected."""
        if node.evicted:
            self._check_alive(node)
        moved = 0
        root = self.root
        while node is not root:
            if node.lock_ref == 0:
                moved += len(node.key) // TOKEN_BYTES
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]
        self._evictable_size -= moved
        self._protected_size += moved
        return moved

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Release one lock on the path node..root; returns tokens that became evictable."""
        if node.evicted:
            self._check_alive(node)
        moved = 0
        root = self.root
        while node is not root:
            if node.lock_ref <= 0:
                raise ValueError(f"dec_lock_ref on an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key) // TOKEN_BYTES
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
            entry = heapq.heappop(heap)
            node = entry[-1]
            if node.evicted or node.lock_ref or node.children:  # no longer an evictable leaf
                continue
            current = policy.key(node, owners)
            if current != entry[:-2]:  # touched or re-prioritised since it was pushed
                heapq.heappush(heap, (*current, next(self._seq), node))
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
            owners = node.owners
            if owners is not None:
                owners.discard(owner)
                if not owners:
                    node.owners = None  # an empty set still costs 216 bytes a node

    def retire_owner(self, owner: str) -> None:
        """The owner is gone for good (its program ended): drop it like `forget_owner`,
        and mark the nodes it alone owned `RETIRED`, the first to go under the
        `priority` order. Nobody will ask for them again unless a new request shares
        them, and that request's insert raises them back to its own priority."""
        self.owners.pinned.discard(owner)
        self.owners.priorities.pop(owner, None)
        for node in self._owner_nodes.pop(owner, ()):
            owners = node.owners
            if owners is None:
                continue
            owners.discard(owner)
            if not owners:
                node.owners = None  # an empty set still costs 216 bytes a node
                node.priority = RETIRED
                if self._is_evictable_leaf(node):
                    self._push(node)  # its key went down: the heap must see it again

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def num_nodes(self) -> int:
        return self._num_nodes

    # ------------------------------------------------------------------ internals

    def _namespace_root(self, namespace: str) -> TreeNode:
        """The root of `namespace`'s keys: an empty node under the real root, not among its
        children (no key of another namespace can reach it) and locked for good (never
        evicted; its size is 0, so it counts nowhere). One per namespace seen since the
        last `reset` (the engines' namespaces are tenants: a few)."""
        node = self._namespace_roots.get(namespace)
        if node is None:
            root = self.root
            node = TreeNode(key=b"", value=[] if self.store_values else None, parent=root,
                            last_access=root.last_access, lock_ref=1)
            self._namespace_roots[namespace] = node
        return node

    def _checked_values(self, num_tokens: int, value: Sequence[int] | None) -> list[int] | None:
        if not self.store_values:
            if value is not None:
                raise ValueError("this RadixCache stores no values (store_values=False)")
            return None
        if value is None:
            raise ValueError("this RadixCache stores values: insert() needs `value`")
        value_list = _as_token_list(value)
        if len(value_list) != num_tokens:
            raise ValueError(f"value has {len(value_list)} entries for {num_tokens} tokens")
        return value_list

    def _add_owner(self, node: TreeNode, owner: str) -> None:
        if node.owners is None:
            node.owners = {owner}
        elif owner in node.owners:
            return
        else:
            node.owners.add(owner)
        self._owner_nodes.setdefault(owner, {})[node] = None

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child`'s edge after `at` bytes; the new upper node is returned."""
        parent = child.parent
        assert parent is not None
        cut = at // TOKEN_BYTES
        upper = TreeNode(
            key=child.key[:at],
            value=child.value[:cut] if child.value is not None else None,
            parent=parent,
            last_access=child.last_access,
            lock_ref=child.lock_ref,
            priority=child.priority,
        )
        upper.children[child.key[at : at + TOKEN_BYTES]] = child
        parent.children[child.key[:TOKEN_BYTES]] = upper
        child.parent = upper
        child.key = child.key[at:]
        if child.value is not None:
            child.value = child.value[cut:]
        if child.owners:
            for owner in child.owners:
                self._add_owner(upper, owner)
        self._num_nodes += 1
        return upper

    def _add_leaf(
        self,
        parent: TreeNode,
        key: bytes,
        value: list[int] | None,
        now: float,
        owner: str | None,
        priority: float,
    ) -> TreeNode:
        leaf = TreeNode(key=key, value=value, parent=parent, last_access=now, priority=priority)
        parent.children[key[:TOKEN_BYTES]] = leaf
        if owner is not None:
            self._add_owner(leaf, owner)
        self._evictable_size += len(key) // TOKEN_BYTES
        self._num_nodes += 1
        self._push(leaf)
        if len(self._heap) > 2 * self._num_nodes + 1024:
            self._compact_heap()
        return leaf

    def _remove_leaf(self, leaf: TreeNode, freed_values: list[int]) -> int:
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.key[:TOKEN_BYTES]]
        leaf.evicted = True
        if leaf.value is not None:
            freed_values += leaf.value
        if leaf.owners:
            for owner in leaf.owners:
                nodes = self._owner_nodes.get(owner)
                if nodes is not None:
                    nodes.pop(leaf, None)
        size = len(leaf.key) // TOKEN_BYTES
        # Stale heap entries keep an evicted leaf alive until they are popped or compacted
        # away (up to as many as there are live nodes): it keeps only its shell.
        leaf.key, leaf.value, leaf.owners = b"", None, None
        self._evictable_size -= size
        self._num_nodes -= 1
        if parent.lock_ref == 0 and not parent.children:
            self._push(parent)
        return size

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return not node.evicted and node.lock_ref == 0 and not node.children

    def _push(self, node: TreeNode) -> None:
        # Flat entries, (*key, seq, node): the heap compares one tuple, not nested ones.
        heapq.heappush(self._heap, (*self.policy.key(node, self.owners), next(self._seq), node))

    def _refresh_owner(self, owner: str) -> None:
        """Re-push an owner's evictable leaves after their keys went down (lazy heap)."""
        if not self.policy.uses_owners:
            return
        for node in self._owner_nodes.get(owner, ()):
            if self._is_evictable_leaf(node):
                self._push(node)

    def _compact_heap(self) -> None:
        # Stale entries (leaves that grew children, touched leaves) pile up between evictions.
        live: dict[int, TreeNode] = {}
        for entry in self._heap:
            node = entry[-1]
            if self._is_evictable_leaf(node):
                live[id(node)] = node
        policy, owners, seq = self.policy, self.owners, self._seq
        self._heap = [(*policy.key(n, owners), next(seq), n) for n in live.values()]
        heapq.heapify(self._heap)

    def _check_alive(self, node: TreeNode) -> None:
        if node.evicted:
            raise ValueError(f"{node!r} was evicted")
