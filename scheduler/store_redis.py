"""Program history in Redis, shared by several progserve processes.

One hash per program, `<prefix>:prog:<tenant>:<program id>` (client-chosen parts escaped,
`redis_keys.py`, so no id or tenant can name another key), holding
- `<instance>:service`, `:engine_time_s`, `:weighted_tokens`, `:wait_s`, `:calls`: each
  progserve instance's own part of the history; the totals are the sums over instances;
- `engine:<replica>`: one field per replica that served a call;
- `created` (unix time) and, once the program ended, `status`.

Every operation is one Lua script, atomic, that first checks this instance's marker
(`redis_keys.marker_key`): when Redis restarted empty the marker is gone, and the
operation writes nothing and raises `StoreDataLostError` instead of starting a record
that lost its beginning. Because each instance owns its fields, an instance can write its
whole part back (`write_back`, absolute values: idempotent) after an outage or a data
loss without doubling anything another instance wrote, and a write whose reply was lost
is corrected rather than counted twice.

Failures are typed for `store_resilient.ResilientStateStore`: unreachable
(`StoreUnavailableError`), this operation refused (`StoreWriteRejectedError`: WRONGTYPE,
OOM, READONLY; other keys may still work) or data lost (`StoreDataLostError`).
Every write refreshes a TTL (`ttl_s`); an ended program keeps its history `ended_ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .redis_keys import MARKER_TTL_S, check_instance_id, marker_key, new_instance_id, redis_key
from .store import (
    CallRecord,
    HistoryTotals,
    StoreDataLostError,
    StoreHealth,
    StoreUnavailableError,
    StoreWriteRejectedError,
)

# An instance's own fields, in the order the scripts take and return them.
OWN_FIELDS = ("service", "engine_time_s", "weighted_tokens", "wait_s", "calls")
ENGINE_FIELD = "engine:"
LOST = -1  # what a script returns when the instance's marker is gone

_LOAD_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: instance, service, engine_time_s, weighted_tokens, wait_s, replica, ttl, now,
# marker ttl
_RECORD_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('EXPIRE', KEYS[2], ARGV[9])
local p = ARGV[1] .. ':'
redis.call('HINCRBYFLOAT', KEYS[1], p .. 'service', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[1], p .. 'engine_time_s', ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[1], p .. 'weighted_tokens', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[1], p .. 'wait_s', ARGV[5])
redis.call('HINCRBY', KEYS[1], p .. 'calls', 1)
redis.call('HSETNX', KEYS[1], 'created', ARGV[8])
if tonumber(ARGV[6]) >= 0 then redis.call('HSET', KEYS[1], 'engine:' .. ARGV[6], 1) end
redis.call('EXPIRE', KEYS[1], ARGV[7])
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: status, ended ttl, marker ttl
_END_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# ARGV: check marker (1/0), mode (set/add), instance, service, engine_time_s,
# weighted_tokens, wait_s, calls, created, status ('' for none), ttl, marker ttl,
# engines... Returns the instance's own fields after the write.
_WRITE_BACK_LUA = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local p = ARGV[3] .. ':'
local names = {'service', 'engine_time_s', 'weighted_tokens', 'wait_s'}
for i, name in ipairs(names) do
  if ARGV[2] == 'set' then redis.call('HSET', KEYS[1], p .. name, ARGV[3 + i])
  else redis.call('HINCRBYFLOAT', KEYS[1], p .. name, ARGV[3 + i]) end
end
if ARGV[2] == 'set' then redis.call('HSET', KEYS[1], p .. 'calls', ARGV[8])
else redis.call('HINCRBY', KEYS[1], p .. 'calls', ARGV[8]) end
redis.call('HSETNX', KEYS[1], 'created', ARGV[9])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[10]) end
for i = 13, #ARGV do redis.call('HSET', KEYS[1], 'engine:' .. ARGV[i], 1) end
redis.call('EXPIRE', KEYS[1], ARGV[11])
if ARGV[1] == '1' then redis.call('EXPIRE', KEYS[2], ARGV[12]) end
return redis.call('HMGET', KEYS[1], p .. 'service', p .. 'engine_time_s',
                  p .. 'weighted_tokens', p .. 'wait_s', p .. 'calls')
"""


@dataclass(slots=True)
class SharedHistory:
    """A program's record in Redis: every instance's totals and this instance's part."""

    totals: HistoryTotals
    own: HistoryTotals
    status: str | None = None


@dataclass(slots=True)
class WriteBack:
    """This instance's whole part of one program's history, to write after an outage.
    `mode` "set" overwrites the instance's fields (their value is known exactly); "add"
    adds to them (a program this instance first saw while Redis was away: what it had
    written before, if anything, is not known here)."""

    tenant: str
    program_id: str
    own: HistoryTotals
    engines: set[int]
    created: float
    ttl_s: int
    status: str | None = None
    mode: str = "set"


class RedisStateStore:
    """The `StateStore` interface over Redis (see the module docstring)."""

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "progserve:history",
        ttl_s: int = 24 * 3600,
        ended_ttl_s: int = 3600,
        instance_id: str | None = None,
    ) -> None:
        import redis.asyncio as redis  # imported here: the in-memory store needs no redis

        self._redis = redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.ended_ttl_s = ended_ttl_s
        self.instance_id = check_instance_id(instance_id or new_instance_id())
        self._marker = marker_key(prefix, self.instance_id)
        self._load = self._redis.register_script(_LOAD_LUA)
        self._record = self._redis.register_script(_RECORD_LUA)
        self._end = self._redis.register_script(_END_LUA)
        self._write_back = self._redis.register_script(_WRITE_BACK_LUA)
        self._registered = False

    def key(self, tenant: str, program_id: str) -> str:
        return redis_key(self.prefix, "prog", tenant, program_id)

    # -- StateStore ----------------------------------------------------------------------

    async def load(self, tenant: str, program_id: str) -> HistoryTotals | None:
        shared = await self.load_shared(tenant, program_id)
        return shared.totals if shared is not None else None

    async def record_call(self, tenant: str, program_id: str, record: CallRecord) -> HistoryTotals:
        return (await self.record_shared(tenant, program_id, record)).totals

    async def end_program(self, tenant: str, program_id: str, status: str) -> None:
        args = (status, self.ended_ttl_s, MARKER_TTL_S)
        self._check_lost(await self._call(self._end, self.key(tenant, program_id), args))

    async def close(self) -> None:
        await self._redis.aclose()

    def health(self) -> StoreHealth:
        return StoreHealth("redis")  # the resilient wrapper tracks outages

    # -- shared records ------------------------------------------------------------------

    async def load_shared(self, tenant: str, program_id: str) -> SharedHistory | None:
        flat = self._check_lost(await self._call(self._load, self.key(tenant, program_id), ()))
        return self._parse(flat) if flat else None

    async def record_shared(self, tenant: str, program_id: str, record: CallRecord) -> SharedHistory:
        args = (self.instance_id, repr(record.service), repr(record.engine_time_s),
                repr(record.weighted_tokens), repr(record.wait_s), record.replica, self.ttl_s,
                time.time(), MARKER_TTL_S)  # fmt: skip
        flat = await self._call(self._record, self.key(tenant, program_id), args)
        return self._parse(self._check_lost(flat))

    async def write_back(self, items: Sequence[WriteBack], *,
                         check_marker: bool) -> list[HistoryTotals | Exception]:
        """Write this instance's part of each program, one atomic script each, in one
        round trip. Per item: the instance's own totals now in Redis, or the error of that
        item (`StoreDataLostError` when `check_marker` and the marker is gone,
        `StoreWriteRejectedError`). Raises `StoreUnavailableError` when Redis is away."""
        from redis.exceptions import RedisError, ResponseError

        await self._register()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for item in items:
                    await self._write_back(keys=[self.key(item.tenant, item.program_id),
                                                 self._marker],
                                           args=self._write_back_args(item, check_marker),
                                           client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except ResponseError as exc:  # e.g. a script that cannot be loaded
            raise StoreWriteRejectedError(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(repr(exc)) from exc
        out: list[HistoryTotals | Exception] = []
        for result in results:
            if isinstance(result, ResponseError):
                out.append(StoreWriteRejectedError(str(result)))
            elif isinstance(result, Exception):  # the connection broke midway
                raise StoreUnavailableError(repr(result)) from result
            elif result == LOST:
                out.append(StoreDataLostError(self.instance_id))
            else:
                out.append(_own_totals(result))
        return out

    async def synced(self) -> bool:
        """Whether Redis still holds this instance's marker (it did not lose our writes)."""
        return bool(await self._command(self._redis.exists(self._marker)))

    async def mark_synced(self) -> None:
        """Everything this instance holds is written back: set its marker again."""
        await self._command(self._redis.set(self._marker, "1", ex=MARKER_TTL_S))
        self._registered = True

    # -- plumbing ------------------------------------------------------------------------

    def _write_back_args(self, item: WriteBack, check_marker: bool) -> list[Any]:
        own = item.own
        return ["1" if check_marker else "0", item.mode, self.instance_id, repr(own.service),
                repr(own.engine_time_s), repr(own.weighted_tokens), repr(own.wait_s),
                own.calls_finished, item.created, item.status or "", max(1, item.ttl_s),
                MARKER_TTL_S, *sorted(item.engines)]  # fmt: skip

    async def _register(self) -> None:
        """The first use writes this instance's marker (see `redis_keys`)."""
        if not self._registered:
            await self.mark_synced()

    async def _call(self, script: Any, key: str, args: Sequence[Any]) -> Any:
        await self._register()
        return await self._command(script(keys=[key, self._marker], args=args))

    @staticmethod
    async def _command(awaitable: Any) -> Any:
        from redis.exceptions import RedisError, ResponseError

        try:
            return await awaitable
        except ResponseError as exc:
            raise StoreWriteRejectedError(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(repr(exc)) from exc

    def _check_lost(self, result: Any) -> Any:
        if result == LOST:
            raise StoreDataLostError(f"redis lost the writes of instance {self.instance_id}")
        return result

    def _parse(self, flat: list[str]) -> SharedHistory:
        totals, own = HistoryTotals(), HistoryTotals()
        status = None
        mine = self.instance_id + ":"
        for name, value in zip(flat[::2], flat[1::2], strict=True):
            if name.startswith(ENGINE_FIELD):
                totals.engines_used.add(int(name[len(ENGINE_FIELD):]))
            elif name == "status":
                status = value
            elif name != "created":
                instance, _, field = name.rpartition(":")
                _add_field(totals, field, value)
                if instance + ":" == mine:
                    _add_field(own, field, value)
        own.engines_used = set(totals.engines_used)
        return SharedHistory(totals, own, status)


def _add_field(totals: HistoryTotals, field: str, value: str) -> None:
    if field == "calls":
        totals.calls_finished += int(value)
    elif field in OWN_FIELDS:
        setattr(totals, field, getattr(totals, field) + float(value))


def _own_totals(values: list[str | None]) -> HistoryTotals:
    service, engine_time_s, weighted_tokens, wait_s, calls = (v or "0" for v in values)
    return HistoryTotals(float(service), float(engine_time_s), float(weighted_tokens),
                         float(wait_s), int(calls))
