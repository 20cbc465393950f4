"""The program table: every program the scheduler knows, per tenant, from its start to
the moment it is forgotten.

A program is new (registered, with any history the state store has for it), open
(running or idle), reopened when a call arrives after its end, ended when its client
says so, when it idles past `program_idle_timeout_s`, or when its single call finishes
(an untagged request), and forgotten once more than `keep_finished_programs` ended after
it. Ids are namespaced per tenant: another tenant's id is a plain "not found".

An ended program past the newest `keep_finished_unpacked` is kept packed
(`packed_program.py`: a fraction of the memory) and unpacked when it is read again.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import deque
from collections.abc import Iterator

from .cache_salt import tenant_cache_salt
from .config import CacheConfig, SchedulerConfig
from .errors import ProgramCancelledError, ProgramNotFoundError, SchedulerOverloadedError
from .events import EventBus, EventKind
from .kv_admission import KvAdmission
from .loop_context import LoopContext, run_now
from .packed_program import PackedProgram, can_pack, pack, unpack
from .program import PROGRAM_STATUS_NAMES, CallNode, Program, ProgramStatus
from .retention import RetentionManager
from .store import StateStore
from .tenant_calls import TenantCalls

PROGRAM_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MAX_CACHED_SALTS = 1024  # tenants whose cache salt is kept (`ProgramTable._salt_of`)


class ProgramTable:
    def __init__(
        self,
        config: SchedulerConfig,
        loop: LoopContext,
        bus: EventBus,
        store: StateStore,
        retention: RetentionManager,
        admission: KvAdmission,
        cache: CacheConfig,
        tenant_calls: TenantCalls,
    ) -> None:
        self.config = config
        self.cache = cache
        self.tenant_calls = tenant_calls
        self.loop = loop
        self.bus = bus
        self.store = store
        self.retention = retention
        self.admission = admission
        self._programs: dict[tuple[str, str], Program | PackedProgram] = {}
        self._ended: deque[Program | PackedProgram] = deque()
        self._ended_calls = 0  # calls of the programs in `_ended`
        self._forget_when_done: set[Program] = set()  # past the kept ones, calls open
        self.open_count = 0
        self._program_seq = itertools.count()
        self._call_seq = itertools.count()
        # tenant -> its cache salt: an HMAC-SHA256 per program open, for the same few
        # tenants, was work done again and again.
        # Bounded: past MAX_CACHED_SALTS tenants the oldest is computed again when it
        # comes back.
        self._salts: dict[str, str | None] = {}

    # ------------------------------------------------------------------ lookups
    def get(self, program_id: str, tenant: str) -> Program:
        program = self._programs.get((tenant, program_id))
        if program is None:
            raise ProgramNotFoundError(program_id)
        if type(program) is PackedProgram:
            return self._unpack(program)
        return program  # type: ignore[return-value]

    def find(self, program_id: str, tenant: str) -> Program | None:
        program = self._programs.get((tenant, program_id))
        if type(program) is PackedProgram:
            return self._unpack(program)
        return program  # type: ignore[return-value]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._programs

    def __iter__(self) -> Iterator[Program | PackedProgram]:
        """Every program as kept: a scan reads what both forms have (`PackedProgram`)."""
        return iter(self._programs.values())

    def __len__(self) -> int:
        return len(self._programs)

    @staticmethod
    def check_usable(program: Program) -> None:
        if program.status == ProgramStatus.CANCELLED:
            raise ProgramCancelledError(program.id)

    # ------------------------------------------------------------------ new programs
    @staticmethod
    def new_id() -> str:
        return f"prog-{os.urandom(8).hex()}"  # uuid4().hex[:16]'s shape, without the UUID

    def new_program(
        self,
        program_id: str,
        tenant: str,
        *,
        single_call: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> Program:
        if self.open_count >= self.config.max_programs:
            raise SchedulerOverloadedError(
                f"{self.open_count} programs are open (limit {self.config.max_programs})",
                retry_after=1.0,
            )
        now = self.loop.time()
        return Program(
            id=program_id,
            tenant=tenant,
            arrival=now,
            seq=next(self._program_seq),
            engine_key=program_id if tenant == "default" else f"{tenant}/{program_id}",
            cache_salt=self._salt_of(tenant),
            single_call=single_call,
            metadata=dict(metadata or {}),
            idle_since=now,
        )

    def _salt_of(self, tenant: str) -> str | None:
        salts = self._salts
        if tenant in salts:
            return salts[tenant]
        if len(salts) >= MAX_CACHED_SALTS:
            del salts[next(iter(salts))]
        salt = salts[tenant] = tenant_cache_salt(self.cache, tenant)
        return salt

    def register(self, program: Program) -> None:
        self._programs[(program.tenant, program.id)] = program
        self.open_count += 1
        wanted = self.bus.wanted
        if program.single_call and EventKind.CALL_QUEUED in wanted:
            return  # its call's CALL_QUEUED stands for its start (`with_program_start`)
        program.start_sent = True
        if EventKind.PROGRAM_STARTED in wanted:
            self.bus.program_event(EventKind.PROGRAM_STARTED, program)

    async def seed_history(self, program: Program) -> None:
        """A program another progserve process has served keeps its history."""
        totals = await self.store.load(program.tenant, program.id)
        if totals is not None:
            history = program.history
            history.service = totals.service
            history.engine_time_s = totals.engine_time_s
            history.weighted_tokens = totals.weighted_tokens
            history.wait_s = totals.wait_s
            history.calls_finished = totals.calls_finished
            history.engines_used = set(totals.engines_used)

    def reopen(self, program: Program) -> None:
        """A call arrives for an ended (not cancelled) program: it is open again."""
        if program.status in (ProgramStatus.FINISHED, ProgramStatus.FAILED):
            program.status = ProgramStatus.IDLE
            program.ended_at = None
            self.open_count += 1
            self._forget_when_done.discard(program)
            if program in self._ended:
                self._ended.remove(program)
                self._ended_calls -= len(program.calls)

    # ------------------------------------------------------------------ calls
    def new_call(
        self,
        program: Program,
        call_id: str,
        kind: str,
        thread: str,
        parents: tuple[str, ...],
        *,
        thread_parent: bool = True,
    ) -> CallNode:
        """Add a call to the program; without parents (and `thread_parent`) it follows the
        previous call of its thread."""
        now = self.loop.time()
        if not parents and thread_parent:
            previous = program.last_call_by_thread.get(thread)
            if previous is not None:
                parents = (previous.id,)  # a thread is sequential
        call = CallNode(
            id=call_id,
            program=program,
            kind=kind,
            seq=next(self._call_seq),
            created_at=now,
            thread_id=thread,
            parents=parents,
        )
        program.calls[call_id] = call
        program.last_call_by_thread[thread] = call
        program.open_calls += 1
        if kind == "llm":
            self.tenant_calls.opened(program.tenant)
        program.history.thread_opened(thread)
        program.status = ProgramStatus.RUNNING
        return call

    # ------------------------------------------------------------------ endings
    def went_idle(self, program: Program, now: float) -> None:
        """Nothing of the program is queued or running any more."""
        program.status = ProgramStatus.IDLE
        program.idle_since = now
        if program.single_call:
            self.close(program, ProgramStatus.FINISHED)
        else:
            self.retention.on_idle(program, now)
            self._arm_idle_end(program, now + self.config.program_idle_timeout_s)

    def refused_call(self, program: Program) -> None:
        """Admission refused the call a program was opened (or reopened) for: a one-call
        program will never have a call, and an idle one must still end by itself."""
        if program.open_calls or program.is_closed:
            return
        if program.single_call:
            self.close(program, ProgramStatus.FAILED)
        else:
            self._arm_idle_end(program, program.idle_since + self.config.program_idle_timeout_s)

    def _arm_idle_end(self, program: Program, due: float) -> None:
        """Proxy clients rarely end their programs: one idle past the timeout ends by
        itself (a later call reopens it, with its history)."""
        if program.idle_timer is None:
            program.idle_timer = self.loop.loop.call_at(due, self._idle_end, program)

    def _idle_end(self, program: Program) -> None:
        program.idle_timer = None
        if program.is_closed or program.open_calls:
            return  # its next idle moment re-arms the timer
        due = program.idle_since + self.config.program_idle_timeout_s
        if self.loop.time() >= due:
            self.close(program, ProgramStatus.FINISHED)
        else:
            self._arm_idle_end(program, due)

    def close(self, program: Program, status: ProgramStatus) -> None:
        now = self.loop.time()
        if not program.is_closed:
            self.open_count -= 1
        program.status = status
        program.ended_at = now
        if program.idle_timer is not None:
            program.idle_timer.cancel()
            program.idle_timer = None
        self.retention.on_program_end(program)
        self.admission.on_program_end(program, now)
        ending = self.store.end_program(program.tenant, program.id, PROGRAM_STATUS_NAMES[status])
        if self.store.in_process:  # no task and no loop turn for an update that never waits
            run_now(ending)
        else:
            self.loop.spawn(ending)
        self._announce_end(program)
        self._ended.append(program)
        self._ended_calls += len(program.calls)
        self._forget_old()
        self._pack_one_older()

    def _announce_end(self, program: Program) -> None:
        """PROGRAM_ENDED, unless its call's end event stood for it (a one-call program);
        a one-call program that ends without its call queued (refused) announces its
        start first."""
        if program.end_sent:
            program.end_sent = False
            return
        wanted = self.bus.wanted
        if not program.start_sent:
            program.start_sent = True
            if EventKind.PROGRAM_STARTED in wanted:
                self.bus.program_event(EventKind.PROGRAM_STARTED, program)
        if EventKind.PROGRAM_ENDED in wanted:
            self.bus.program_event(EventKind.PROGRAM_ENDED, program)

    def _forget_old(self) -> None:
        """Past `keep_finished_programs` ended ones (or `keep_finished_calls` calls of
        them), the oldest are forgotten (and their call graphs taken apart, so no cycle
        waits for the collector). The newest stays whatever its size: its client may read
        it right after the end."""
        keep, keep_calls = self.config.keep_finished_programs, self.config.keep_finished_calls
        while len(self._ended) > keep or (self._ended_calls > keep_calls
                                          and len(self._ended) > 1):
            old = self._ended.popleft()
            self._ended_calls -= old.call_count
            if old.open_calls:  # calls still ending (a cancel's aborts): forget it after
                self._forget_when_done.add(old)
            elif old.is_closed:
                self._forget(old)

    def closed_program_idle(self, program: Program) -> None:
        """The last open call of an ended program ended: forget it if it is past the
        kept ones (else it would stay in the table for good)."""
        if program in self._forget_when_done:
            self._forget_when_done.discard(program)
            self._forget(program)

    def _forget(self, program: Program | PackedProgram) -> None:
        self._programs.pop((program.tenant, program.id), None)
        program.drop_calls()

    # ------------------------------------------------------------------ packing
    def _pack_one_older(self) -> None:
        """Pack the ended program `keep_finished_unpacked` places back, if it is at rest:
        one per close, so the cost is spread. One that still had calls ending then (or
        that a reopen shifted past) stays unpacked until it is forgotten."""
        index = len(self._ended) - 1 - self.config.keep_finished_unpacked
        if index < 0:
            return
        program = self._ended[index]
        if type(program) is PackedProgram or not can_pack(program):  # type: ignore[arg-type]
            return
        packed = pack(program)  # type: ignore[arg-type]
        self._ended[index] = packed
        self._programs[(packed.tenant, packed.id)] = packed

    def _unpack(self, packed: PackedProgram) -> Program:
        """A packed program is read: it is a `Program` again, in its place."""
        program = unpack(packed)
        self._programs[(program.tenant, program.id)] = program
        try:
            self._ended[self._ended.index(packed)] = program  # rare: a linear scan is fine
        except ValueError:
            pass
        return program
