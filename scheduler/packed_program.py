"""An ended program kept for state queries, packed: its numbers in one `bytes`, its
strings in one tuple.

Why: a kept ended program as live objects costs about 2 KB of Python objects per call
(a slotted `CallNode`, a dozen float objects, empty sets and dicts), some 25 small
blocks each, and those blocks pin the allocator's arenas: under `bench load` the server's
RSS grew by the kept programs' size again on every round (docs/reliability.md,
"Memory"). Packed, a call costs under 300 bytes in two blocks per program.

A packed program answers what a scan of the program table reads (status, counts, its
summary); anything else (a state query, a variable read, a call that reopens it) unpacks
it into a `Program` again (`unpack`), with every call in its ended state.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from .program import CallNode, CallStatus, Program, ProgramHistory, ProgramStatus, VariableSlot

# Program: arrival, ended_at (NaN: None), idle_since, waiting_since, then its history's
# service, engine_time_s, weighted_tokens, wait_s, wait_wall_s; seq, home_replica,
# auto_ids, calls_finished.
_PROGRAM = struct.Struct("<9d4q")
# Call: created_at, queued_at, dispatched_at, first_token_at, finished_at, wait, priority,
# service, engine_time; seq, status, replica, level, prompt, completion and cached
# tokens, preemptions, retries.
_CALL = struct.Struct("<9d9q")
_CALL_STRINGS = 7  # id, kind, thread_id, parents, output, error, spec (tool calls only)
_VARIABLE_FIELDS = 4  # name, producer, value, failure


class PackedProgram:
    """What the program table keeps of an ended program past the newest few."""

    __slots__ = ("id", "tenant", "status", "single_call", "engine_key", "cache_salt",
                 "metadata", "error", "call_count", "engines_used", "numbers", "strings",
                 "variables")
    # What a scan of the table reads of every program (`ProgramTable.__iter__`).
    open_calls = 0
    queued: tuple[CallNode, ...] = ()
    running: tuple[CallNode, ...] = ()
    is_closed = True

    def __init__(self, program: Program) -> None:
        self.id = program.id
        self.tenant = program.tenant
        self.status = program.status
        self.single_call = program.single_call
        self.engine_key = program.engine_key
        self.cache_salt = program.cache_salt
        self.metadata = program.metadata or None
        self.error = program.error
        self.call_count = len(program.calls)
        history = program.history
        self.engines_used = tuple(sorted(history.engines_used))
        self.numbers = _pack_numbers(program)
        self.strings = tuple(_call_strings(program))
        self.variables = tuple(_variable_fields(program))

    @property
    def arrival(self) -> float:
        return _PROGRAM.unpack_from(self.numbers)[0]

    @property
    def ended_at(self) -> float | None:
        return _ended_at(_PROGRAM.unpack_from(self.numbers))

    @property
    def history(self) -> ProgramHistory:
        return _history(_PROGRAM.unpack_from(self.numbers), self.engines_used)

    def drop_calls(self) -> None:
        """Nothing to take apart: a packed program holds no call graph."""


def can_pack(program: Program) -> bool:
    """Only a program at rest: ended, and every call of it ended."""
    return (program.is_closed and not program.open_calls
            and all(call.status >= CallStatus.FINISHED for call in program.calls.values()))


def pack(program: Program) -> PackedProgram:
    """The packed form; the program's own call graph is taken apart (no cycle left for
    the collector), so whoever still holds the `Program` must look it up again."""
    packed = PackedProgram(program)
    program.drop_calls()
    return packed


def unpack(packed: PackedProgram) -> Program:
    numbers = _PROGRAM.unpack_from(packed.numbers)
    program = Program(
        id=packed.id, tenant=packed.tenant, arrival=numbers[0], seq=numbers[9],
        engine_key=packed.engine_key, cache_salt=packed.cache_salt,
        history=_history(numbers, packed.engines_used), status=ProgramStatus(packed.status),
        single_call=packed.single_call, start_sent=True,
        metadata=dict(packed.metadata or {}), ended_at=_ended_at(numbers), error=packed.error,
        home_replica=numbers[10], idle_since=numbers[2], waiting_since=numbers[3],
        auto_ids=numbers[11],
    )
    _unpack_calls(program, packed)
    _unpack_variables(program, packed.variables)
    return program


# ----------------------------------------------------------------------------- packing


def _pack_numbers(program: Program) -> bytes:
    history = program.history
    ended = math.nan if program.ended_at is None else program.ended_at
    parts = [_PROGRAM.pack(
        program.arrival, ended, program.idle_since, program.waiting_since, history.service,
        history.engine_time_s, history.weighted_tokens, history.wait_s, history.wait_wall_s,
        program.seq, program.home_replica, program.auto_ids, history.calls_finished)]
    pack_call = _CALL.pack
    for c in program.calls.values():
        parts.append(pack_call(
            c.created_at, c.queued_at, c.dispatched_at, c.first_token_at, c.finished_at,
            c.wait, c.priority, c.service, c.engine_time, c.seq, c.status, c.replica,
            c.level, c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.preemptions,
            c.retries))
    return b"".join(parts)


def _call_strings(program: Program) -> list[Any]:
    out: list[Any] = []
    for c in program.calls.values():
        out += (c.id, c.kind, c.thread_id, c.parents, c.output, c.error,
                c.spec if c.kind == "tool" else None)
    return out


def _variable_fields(program: Program) -> list[Any]:
    out: list[Any] = []
    for slot in program.variables.values():
        value = "".join(slot.parts) if slot.done else None
        out += (slot.name, slot.producer, value, slot.failed)
    return out


# ----------------------------------------------------------------------------- unpacking


def _ended_at(numbers: tuple[Any, ...]) -> float | None:
    return None if math.isnan(numbers[1]) else numbers[1]


def _history(numbers: tuple[Any, ...], engines_used: tuple[int, ...]) -> ProgramHistory:
    return ProgramHistory(service=numbers[4], engine_time_s=numbers[5],
                          weighted_tokens=numbers[6], wait_s=numbers[7],
                          wait_wall_s=numbers[8], calls_finished=numbers[12],
                          engines_used=set(engines_used))


def _unpack_calls(program: Program, packed: PackedProgram) -> None:
    strings = packed.strings
    calls = program.calls
    last_by_thread = program.last_call_by_thread
    for i, numbers in enumerate(_CALL.iter_unpack(packed.numbers[_PROGRAM.size:])):
        call_id, kind, thread, parents, output, error, spec = \
            strings[i * _CALL_STRINGS:(i + 1) * _CALL_STRINGS]
        call = CallNode(
            id=call_id, program=program, kind=kind, seq=numbers[9], created_at=numbers[0],
            thread_id=thread, parents=parents, spec=spec, output=output,
            status=CallStatus(numbers[10]), priority=numbers[6], level=numbers[12],
            replica=numbers[11], queued_at=numbers[1], dispatched_at=numbers[2],
            first_token_at=numbers[3], first_token_sent=numbers[3] >= 0,
            finished_at=numbers[4], wait=numbers[5], prompt_tokens=numbers[13],
            completion_tokens=numbers[14], cached_tokens=numbers[15], service=numbers[7],
            engine_time=numbers[8], preemptions=numbers[16], retries=numbers[17],
            error=error,
        )
        calls[call_id] = call
        last_by_thread[thread] = call  # calls are in creation order


def _unpack_variables(program: Program, fields: tuple[Any, ...]) -> None:
    for i in range(0, len(fields), _VARIABLE_FIELDS):
        name, producer, value, failed = fields[i:i + _VARIABLE_FIELDS]
        slot = VariableSlot(name, producer=producer, failed=failed)
        if value is not None:
            slot.parts = [value]
            slot.done = True
        program.variables[name] = slot
