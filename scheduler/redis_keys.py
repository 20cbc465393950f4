"""Redis key names that no client-chosen string can collide with, and the marker that
tells a progserve instance whether Redis still holds what it wrote.

Program ids and tenant names come from clients and may contain `:` (ids match
`[A-Za-z0-9_.:-]`), the separator of Redis key names: with plain concatenation
`progserve:prog:<tenant>:foo:engines` was both program `foo:engines`'s hash and program
`foo`'s engine set, and the WRONGTYPE that followed broke the store for every tenant.
Here every client-chosen part is percent-encoded (`quote(part, safe="")`: `:` and `%`
never appear unescaped), and every key is `<prefix>:<kind>:<part>...` with a fixed number
of parts per kind, so the map from (kind, parts) to key names is injective.

The instance marker (`<prefix>:instance:<id>`) is written when an instance first uses
Redis and checked atomically with its writes: a Redis that restarted empty has lost it,
so the instance knows to write back everything it holds instead of adding to a record
that lost its beginning.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

_INSTANCE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MARKER_TTL_S = 7 * 24 * 3600  # refreshed on every write; an idle week costs a re-sync


def key_part(value: str) -> str:
    """One client-chosen part of a key name: no `:` left, and distinct values stay
    distinct (percent-encoding is injective)."""
    return quote(value, safe="")


def redis_key(prefix: str, kind: str, *parts: str) -> str:
    """`<prefix>:<kind>:<escaped part>...`. `kind` is a fixed word chosen by the code."""
    return ":".join((prefix, kind, *map(key_part, parts)))


def new_instance_id() -> str:
    """A fresh id for one progserve process's writes (hex: safe in keys and fields)."""
    return os.urandom(8).hex()


def check_instance_id(instance_id: str) -> str:
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise ValueError(f"instance id {instance_id!r} must match {_INSTANCE_ID.pattern}")
    return instance_id


def marker_key(prefix: str, instance_id: str) -> str:
    return redis_key(prefix, "instance", instance_id)
