"""Graph capture: the calls a running program has created, and which of them can be sent.

Calls accumulate here between awaits (Parrot: the scheduler should see future calls
before they run). At each await the context takes every *sendable* call and submits them
together. A call is sendable when each variable it reads is produced by a call already
sent (or sent in the same batch), is a program input the server knows, or holds a value
the client knows (a client-side tool's result, an input added late): such values are
inlined into the call's templates. Calls waiting on a client-side value that is not known
yet stay here until it is.

Validation happens on every take: a reference to a variable nobody produces, and a cycle
in the data flow, raise errors that name the variable and the call.
"""

from __future__ import annotations

import graphlib
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.spec import NAME_PATTERN, VARIABLE_REF, CallSpec

from .errors import CycleError, ProgramDefinitionError, UnknownVariableError

_NAME = re.compile(NAME_PATTERN)


@dataclass(slots=True)
class CallRecord:
    spec: CallSpec
    site: str  # "file.py:42": where the program created the call, for error messages
    client_tool: Callable[..., Any] | None = None  # runs in the DSL runtime, not the server
    sent: bool = False


class ProgramGraph:
    """The calls and variables of one program run (client side)."""

    def __init__(self) -> None:
        self.calls: dict[str, CallRecord] = {}
        self.producer: dict[str, str] = {}  # variable -> call id
        self.inputs: dict[str, str] = {}  # program inputs (`let`), name -> value
        self.server_inputs: set[str] = set()  # inputs submitted with the program
        self._ids: Counter[str] = Counter()
        self._names: Counter[str] = Counter()

    # -- building --------------------------------------------------------------------
    def new_call_id(self, kind: str) -> str:
        self._ids[kind] += 1
        return f"{kind}_{self._ids[kind]}"

    def new_variable_name(self, requested: str | None, call_id: str) -> str:
        """A unique variable name. A repeated name (a `gen(name="step")` in a loop) gets a
        suffix: `step`, `step_2`, `step_3`."""
        base = requested or call_id
        if not _NAME.match(base) or len(base) > 100:
            raise ProgramDefinitionError(
                f"call {call_id!r}: variable name {base!r} must be an identifier "
                f"(letters, digits, '_', '.', '-'; at most 100 characters)"
            )
        self._names[base] += 1
        name = base if self._names[base] == 1 else f"{base}_{self._names[base]}"
        while name in self.producer or name in self.inputs:
            self._names[base] += 1
            name = f"{base}_{self._names[base]}"
        return name

    def add_call(self, record: CallRecord) -> None:
        self.calls[record.spec.id] = record
        if record.spec.output:
            self.producer[record.spec.output] = record.spec.id

    def add_input(self, name: str, value: str) -> None:
        self.inputs[name] = value

    def knows(self, name: str) -> bool:
        return name in self.producer or name in self.inputs

    def check_references(self, record: CallRecord) -> None:
        for name in record.spec.input_variables():
            if not self.knows(name):
                raise UnknownVariableError(name, record.spec.id, self.known_names(), record.site)

    def known_names(self) -> list[str]:
        return [*self.inputs, *self.producer]

    def producer_of(self, variable: str) -> CallRecord | None:
        call_id = self.producer.get(variable)
        return self.calls[call_id] if call_id else None

    def mark_latency_critical(self, variable: str) -> None:
        record = self.producer_of(variable)
        if record is not None and not record.sent and not record.spec.latency_critical:
            record.spec = record.spec.model_copy(update={"latency_critical": True})

    def pending(self) -> list[CallRecord]:
        """Server calls created but not sent yet, in creation order."""
        return [r for r in self.calls.values() if not r.sent and r.client_tool is None]

    # -- taking a batch --------------------------------------------------------------
    def take_sendable(self, client_values: Mapping[str, str]) -> list[CallSpec]:
        """Validate the pending calls and take those that can be sent now (see module doc).

        `client_values`: values the client knows, other than inputs the server knows.
        Taken calls are marked sent; their specs come back with those values inlined.
        """
        pending = self.pending()
        for record in pending:
            self.check_references(record)
        order = self._topological(pending)
        batch: list[CallSpec] = []
        for record in order:
            if not self._sendable(record, client_values):
                continue
            batch.append(self._inline(record, client_values))
            record.sent = True
        return batch

    def _sendable(self, record: CallRecord, client_values: Mapping[str, str]) -> bool:
        if any(not self.calls[parent].sent for parent in record.spec.parents):
            return False
        for name in record.spec.input_variables():
            if name in self.server_inputs or name in client_values:
                continue
            producer = self.producer_of(name)
            if producer is None or producer.client_tool is not None or not producer.sent:
                return False  # an unknown client value, or a call held back itself
        return True

    def _topological(self, pending: list[CallRecord]) -> list[CallRecord]:
        by_id = {r.spec.id: r for r in pending}
        sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
        for record in pending:
            parents = [
                self.producer[name]
                for name in record.spec.input_variables()
                if self.producer.get(name) in by_id
            ]
            parents += [p for p in record.spec.parents if p in by_id]
            sorter.add(record.spec.id, *parents)
        try:
            ids = list(sorter.static_order())
        except graphlib.CycleError as exc:
            raise self._cycle_error(exc.args[1]) from None
        return [by_id[call_id] for call_id in ids]

    def _cycle_error(self, cycle_ids: list[str]) -> CycleError:
        # graphlib reports [a, b, ..., a]: each call produces an input of the next one.
        producer_id, consumer_id = cycle_ids[0], cycle_ids[1]
        variable = self.calls[producer_id].spec.output or producer_id
        path = [f"{cid}({self.calls[cid].spec.output})" for cid in cycle_ids]
        consumer = self.calls[consumer_id]
        return CycleError(variable, consumer_id, path, consumer.site)

    def _inline(self, record: CallRecord, client_values: Mapping[str, str]) -> CallSpec:
        spec = record.spec
        names = [n for n in spec.input_variables() if n in client_values]
        if not names:
            return spec
        for name in names:
            if VARIABLE_REF.search(client_values[name]):
                raise ProgramDefinitionError(
                    f"call {record.spec.id!r} ({record.site}): the value of {name!r} contains a '{{{{name}}}}' "
                    f"placeholder, so it cannot be inlined into a template after the program "
                    f"started; pass it with `let` before the first await instead"
                )

        def fill(template: str) -> str:
            return VARIABLE_REF.sub(lambda m: client_values.get(m.group(1), m.group(0)), template)

        update: dict[str, Any] = {}
        if spec.prompt is not None:
            update["prompt"] = fill(spec.prompt)
        if spec.messages is not None:
            update["messages"] = [
                m.model_copy(update={"content": fill(m.content)}) for m in spec.messages
            ]
        if spec.args:
            update["args"] = {k: fill(v) if isinstance(v, str) else v for k, v in spec.args.items()}
        return spec.model_copy(update=update)
