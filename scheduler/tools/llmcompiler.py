"""LLMCompiler-style parallel function calling: planner format, streaming task-fetching
unit, joiner with replanning (Kim et al., "An LLM Compiler for Parallel Function
Calling", ICML 2024).

Plan format, one item per line::

    Thought: I need both populations.
    1. search("population of Paris")
    2. search("population of Rome")
    3. calculator("$1 + $2")
    4. join()<END_OF_PLAN>

- `N. tool(args)`: task N calls registered tool `tool`. Arguments are Python literals
  (strings, numbers, lists, dicts, True/False/None), positional or by name, read with
  an AST walk; nothing is ever evaluated. Task numbers strictly increase.
- `$k` or `${k}` refers to task k's result: inside a string it is replaced by the result's
  text; as a bare argument (`f($1)`) it is the result itself. A task can only reference
  earlier tasks, which also rules out cycles. `$k` is always a reference (write amounts
  of money without the dollar sign).
- `Thought:` lines annotate the next task. `join()` ends the plan (it depends on every
  task before it); so does `<END_OF_PLAN>`. Other lines are ignored.

The task-fetching unit dispatches each task the moment the tasks it references are
done: dependencies are futures, nothing polls. In streaming mode it reads the planner's
token stream and starts task 1 while the planner is still writing task 2. A failed task
does not stop the plan: its dependants are skipped, and the joiner sees the errors and
can replan, up to `max_replans` times.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .errors import (
    JoinerOutputError,
    PlanCycleError,
    PlanReferenceError,
    PlanSyntaxError,
    PlanUnknownToolError,
    ToolArgumentError,
    ToolError,
    ToolFailedError,
)
from .executor import ToolExecutor
from .registry import ToolRegistry

END_OF_PLAN = "<END_OF_PLAN>"
JOIN = "join"
_THOUGHT = re.compile(r"^\s*Thought:\s*(.*)$")
_NUMBERED = re.compile(r"^\s*(\d+)\s*\.")
_ACTION = re.compile(r"^\s*(\d+)\s*\.\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*\((.*)\)\s*$")
_REF = re.compile(r"\$\{?(\d+)\}?")
# A string literal (kept as written) or a bare reference (rewritten to a name).
_STRING_OR_REF = re.compile(
    r"""(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|\$\{?(?P<ref>\d+)\}?"""
)
_REF_NAME = re.compile(r"^__plan_ref_(\d+)__$")


@dataclass(slots=True, frozen=True)
class Ref:
    """A bare `$k` argument: task k's result itself."""

    task: int


@dataclass(slots=True)
class PlanTask:
    index: int
    tool: str
    args: list[Any]
    kwargs: dict[str, Any]
    dependencies: tuple[int, ...]
    line: str
    thought: str | None = None
    # filled while the plan runs (loop time)
    parsed_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    observation: Any = None
    error: ToolError | None = None

    @property
    def is_join(self) -> bool:
        return self.tool == JOIN

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """The task and its outcome, as the joiner and the replanner read it."""
        out = f"Thought: {self.thought}\n" if self.thought else ""
        out += f"{self.index}. {self.line.split('.', 1)[1].strip()}\n"
        outcome = f"Error: {self.error}" if self.error else f"Observation: {self.observation}"
        return out + outcome + "\n"


class PlanParser:
    """Incremental parser of a plan: text deltas in, complete tasks out, in order."""

    def __init__(self, registry: ToolRegistry, *, max_tasks: int | None = None) -> None:
        self._registry = registry
        self._max_tasks = max_tasks or registry.config.max_plan_tasks
        self._buffer = ""
        self._thought: str | None = None
        self._tasks: dict[int, PlanTask] = {}
        self.ended = False

    @property
    def tasks(self) -> dict[int, PlanTask]:
        return self._tasks

    def feed(self, delta: str) -> list[PlanTask]:
        if self.ended:
            return []
        self._buffer += delta
        *lines, self._buffer = self._buffer.split("\n")
        out: list[PlanTask] = []
        for line in lines:
            out += self._line(line)
            if self.ended:
                break
        return out

    def close(self) -> list[PlanTask]:
        """The stream ended: parse the last line. A plan without `join()` is joined
        implicitly."""
        out = [] if self.ended else self._line(self._buffer)
        self._buffer = ""
        self.ended = True
        return out

    def _line(self, raw: str) -> list[PlanTask]:
        line = raw.rstrip("\r")
        if END_OF_PLAN in line:
            line = line.split(END_OF_PLAN, 1)[0]
            self.ended = True
        if thought := _THOUGHT.match(line):
            self._thought = thought.group(1).strip() or None
            return []
        if not _NUMBERED.match(line):
            return []  # chatter between tasks
        task = self._task(line)
        if task.is_join:
            self.ended = True
        return [task]

    def _task(self, line: str) -> PlanTask:
        action = _ACTION.match(line)
        if action is None:
            raise PlanSyntaxError("expected `N. tool(arguments)`", line=line)
        index, tool, args_text = int(action.group(1)), action.group(2), action.group(3)
        if self._tasks and index <= max(self._tasks):
            raise PlanSyntaxError(
                f"task numbers must strictly increase (after {max(self._tasks)})",
                task=index,
                line=line,
            )
        if len(self._tasks) >= self._max_tasks:
            raise PlanSyntaxError(f"more than {self._max_tasks} tasks", task=index, line=line)
        if tool == JOIN:
            if args_text.strip():
                raise PlanSyntaxError("join() takes no arguments", task=index, line=line)
            args, kwargs, deps = [], {}, tuple(sorted(self._tasks))
        else:
            if tool not in self._registry:
                raise PlanUnknownToolError(
                    f"unknown tool {tool!r}; registered: {', '.join(self._registry.names())}",
                    task=index,
                    line=line,
                )
            deps = self._dependencies(index, args_text, line)
            args, kwargs = _parse_arguments(index, args_text, line)
            self._check_arity(index, tool, args, kwargs, line)
        task = PlanTask(index, tool, args, kwargs, deps, line.strip(), thought=self._thought)
        self._thought = None
        self._tasks[index] = task
        return task

    def _dependencies(self, index: int, args_text: str, line: str) -> tuple[int, ...]:
        deps = sorted({int(k) for k in _REF.findall(args_text)})
        for k in deps:
            if k == index:
                raise PlanReferenceError(f"${k} refers to the task itself", task=index, line=line)
            if k > index:
                raise PlanReferenceError(
                    f"${k} refers to a later task (a plan must reference earlier tasks only)",
                    task=index,
                    line=line,
                )
            if k not in self._tasks:
                raise PlanReferenceError(f"${k} refers to no task", task=index, line=line)
            if self._tasks[k].is_join:
                raise PlanReferenceError(f"${k} is join(), which has no result", task=index)
        return tuple(deps)

    def _check_arity(
        self, index: int, tool: str, args: list[Any], kwargs: dict[str, Any], line: str
    ) -> None:
        try:
            self._registry.get(tool).bind(kwargs, args)
        except ToolArgumentError as exc:
            raise PlanSyntaxError(
                f"bad arguments for {tool!r}: {exc.detail}", task=index, line=line
            ) from None


_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*\((.*)\)\s*$", re.DOTALL)


def parse_call(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """`tool(args)` -> (tool, positional, named), with the plan's argument rules (literals
    and `$k` references only). Used for ReAct-style `Action: tool(args)` lines too."""
    match = _CALL.match(text)
    if match is None:
        raise PlanSyntaxError("expected `tool(arguments)`", line=text)
    args, kwargs = _parse_arguments(None, match.group(2), text)
    return match.group(1), args, kwargs


def _parse_arguments(index: int | None, text: str, line: str) -> tuple[list[Any], dict[str, Any]]:
    def rewrite(match: re.Match[str]) -> str:
        return match.group("string") or f"__plan_ref_{match.group('ref')}__"

    try:
        tree = ast.parse(f"f({_STRING_OR_REF.sub(rewrite, text)})", mode="eval")
    except SyntaxError:
        raise PlanSyntaxError("arguments are not valid literals", task=index, line=line) from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "f":
        raise PlanSyntaxError("arguments are not valid literals", task=index, line=line)
    try:
        args = [_literal(node) for node in call.args]
        kwargs = {}
        for keyword in call.keywords:
            if keyword.arg is None:
                raise ValueError("**arguments are not allowed")
            kwargs[keyword.arg] = _literal(keyword.value)
    except ValueError as exc:
        raise PlanSyntaxError(str(exc), task=index, line=line) from None
    return args, kwargs


def _literal(node: ast.AST) -> Any:
    """A literal value or a reference; anything else (calls, names, operators) is refused."""
    match node:
        case ast.Name(id=name) if ref := _REF_NAME.match(name):
            return Ref(int(ref.group(1)))
        case ast.List(elts=items) | ast.Tuple(elts=items) | ast.Set(elts=items):
            return [_literal(item) for item in items]
        case ast.Dict(keys=keys, values=values):
            if any(k is None for k in keys):
                raise ValueError("**mappings are not allowed in arguments")
            return {_literal(k): _literal(v) for k, v in zip(keys, values, strict=True)}
        case ast.Starred():
            raise ValueError("*arguments are not allowed")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(
            f"arguments must be literals or $k references, not {ast.unparse(node)!r}"
        ) from None


def parse_plan(
    text: str, registry: ToolRegistry, *, max_tasks: int | None = None
) -> dict[int, PlanTask]:
    """Parse a whole plan. A reference to a later task is reported as a cycle when the
    references form one (`PlanCycleError`), else as a forward reference."""
    parser = PlanParser(registry, max_tasks=max_tasks)
    try:
        parser.feed(text)
        parser.close()
    except PlanReferenceError as exc:
        cycle = _find_cycle(text)
        if cycle:
            path = " -> ".join(f"${k}" for k in cycle)
            raise PlanCycleError(f"references form a cycle: {path}", task=exc.task) from exc
        raise
    return parser.tasks


def _find_cycle(text: str) -> list[int]:
    graph = nx.DiGraph()
    for line in text.splitlines():
        if action := _ACTION.match(line.split(END_OF_PLAN, 1)[0]):
            index = int(action.group(1))
            graph.add_node(index)
            refs = {int(k) for k in _REF.findall(action.group(3))} - {index}  # self: own error
            graph.add_edges_from((k, index) for k in refs)
    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return []
    return [u for u, _ in edges] + [edges[0][0]]


# -- the task-fetching unit ------------------------------------------------------------------


@dataclass(slots=True)
class PlanExecution:
    """One plan, run: its tasks with observations or errors, and timings (loop time)."""

    tasks: dict[int, PlanTask]
    text: str
    started_at: float
    plan_done_at: float
    finished_at: float

    def results(self) -> dict[int, Any]:
        return {i: t.observation for i, t in self.tasks.items() if not t.is_join and t.ok}

    def scratchpad(self) -> str:
        return "".join(t.describe() for t in self.tasks.values() if not t.is_join)


class TaskFetchingUnit:
    """Runs one plan: each task starts as soon as the tasks it references are done."""

    def __init__(
        self,
        executor: ToolExecutor,
        *,
        program_id: str,
        call_prefix: str = "plan",
        max_tasks: int | None = None,
    ) -> None:
        self._executor = executor
        self._program_id = program_id
        self._call_prefix = call_prefix
        self._max_tasks = max_tasks
        self._tasks: dict[int, PlanTask] = {}
        self._done: dict[int, asyncio.Future[None]] = {}
        self._running: list[asyncio.Task[None]] = []

    async def run(self, plan: str | AsyncIterator[str]) -> PlanExecution:
        """Run a plan given whole (a string) or as the planner's stream of text deltas.
        In streaming mode, tasks start while the planner is still writing."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        parser = PlanParser(self._executor.registry, max_tasks=self._max_tasks)
        text: list[str] = []
        stream = _as_stream(plan)
        try:
            async for delta in stream:
                text.append(delta)
                self._dispatch(parser.feed(delta))
                if parser.ended:
                    break
            self._dispatch(parser.close())
            plan_done = loop.time()
            if self._running:
                await asyncio.wait(self._running)
        except BaseException:
            await self._cancel_all()
            raise
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # stop the planner: the plan is complete or broken
        for task in self._running:
            task.result()  # a bug in the unit itself surfaces here, not silently
        return PlanExecution(parser.tasks, "".join(text), started, plan_done, loop.time())

    def _dispatch(self, tasks: list[PlanTask]) -> None:
        loop = asyncio.get_running_loop()
        for task in tasks:
            task.parsed_at = loop.time()
            self._tasks[task.index] = task
            self._done[task.index] = loop.create_future()
            self._running.append(
                loop.create_task(self._run_task(task), name=f"plan-task:{task.index}")
            )

    async def _run_task(self, task: PlanTask) -> None:
        tasks = {d: self._tasks[d] for d in task.dependencies}
        if task.dependencies:
            await asyncio.wait([self._done[d] for d in task.dependencies])
        loop = asyncio.get_running_loop()
        task.started_at = loop.time()
        try:
            failed = [i for i, t in tasks.items() if not t.ok]
            if task.is_join:
                return
            if failed:
                task.error = ToolFailedError(
                    task.tool,
                    f"skipped: it depends on failed task(s) {', '.join(f'${i}' for i in failed)}",
                    call_id=self._call_id(task),
                    program_id=self._program_id,
                )
                return
            args = [_resolve(a, tasks) for a in task.args]
            kwargs = {k: _resolve(v, tasks) for k, v in task.kwargs.items()}
            try:
                named = self._executor.registry.get(task.tool).bind(kwargs, args)
                task.observation = await self._executor.run(
                    task.tool, named, program_id=self._program_id, call_id=self._call_id(task)
                )
            except ToolError as exc:
                task.error = exc
        finally:
            task.finished_at = loop.time()
            self._done[task.index].set_result(None)

    def _call_id(self, task: PlanTask) -> str:
        return f"{self._call_prefix}-task-{task.index}"

    async def _cancel_all(self) -> None:
        pending = [t for t in self._running if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)


def _resolve(value: Any, tasks: dict[int, PlanTask]) -> Any:
    """Replace references by results: a bare `$k` by the result itself, `$k` inside a
    string by the result's text (exact indices: `$1` never matches inside `$12`)."""
    if isinstance(value, Ref):
        return tasks[value.task].observation
    if isinstance(value, str):
        return _REF.sub(lambda m: _text(tasks[int(m.group(1))].observation), value)
    if isinstance(value, list):
        return [_resolve(v, tasks) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, tasks) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


async def _as_stream(plan: str | AsyncIterator[str]) -> AsyncIterator[str]:
    if isinstance(plan, str):
        yield plan
        return
    try:
        async for delta in plan:
            yield delta
    finally:  # `async for` does not close what it iterates: stop the planner's stream
        aclose = getattr(plan, "aclose", None)
        if aclose is not None:
            await aclose()


# -- the joiner and the replanning loop --------------------------------------------------------

_JOIN_ACTION = re.compile(
    r"^\s*Action:\s*(Finish|Replan)\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL
)

Planner = Callable[[str, str | None], AsyncIterator[str]]
"""`planner(question, context)`: the planner LLM's stream of text deltas. `context` is
None for the first plan, else the previous plans with their observations."""

Joiner = Callable[[str, str, bool], Awaitable[str]]
"""`joiner(question, scratchpad, final)`: the joiner LLM's answer, `Thought: ...` then
`Action: Finish(answer)` or `Action: Replan(reason)`. `final` is true when no replan is
left (a Replan is then taken as the final answer)."""


@dataclass(slots=True, frozen=True)
class JoinDecision:
    thought: str
    answer: str
    replan: bool


def parse_joiner_output(text: str) -> JoinDecision:
    """Read the joiner's `Thought:` and `Action: Finish(...)` / `Action: Replan(...)`."""
    thought, decision = "", None
    for line in text.splitlines():
        if match := _THOUGHT.match(line):
            thought = match.group(1).strip()
        elif match := _JOIN_ACTION.match(line):
            decision = (match.group(1).lower() == "replan", match.group(2).strip())
    if decision is None:
        raise JoinerOutputError(
            f"the joiner gave no `Action: Finish(...)` or `Action: Replan(...)`: {text[:200]!r}"
        )
    return JoinDecision(thought, decision[1], decision[0])


@dataclass(slots=True)
class CompilerResult:
    answer: str
    thought: str
    rounds: list[PlanExecution] = field(default_factory=list)

    @property
    def replans(self) -> int:
        return max(0, len(self.rounds) - 1)


class LLMCompiler:
    """Plan -> run (streaming) -> join, replanning up to `max_replans` times."""

    def __init__(
        self,
        executor: ToolExecutor,
        planner: Planner,
        joiner: Joiner,
        *,
        max_replans: int | None = None,
    ) -> None:
        self._executor = executor
        self._planner = planner
        self._joiner = joiner
        self.max_replans = (
            executor.config.max_replans if max_replans is None else max(0, max_replans)
        )

    async def run(self, question: str, *, program_id: str) -> CompilerResult:
        result = CompilerResult(answer="", thought="")
        contexts: list[str] = []
        for round_index in range(self.max_replans + 1):
            final = round_index == self.max_replans
            unit = TaskFetchingUnit(
                self._executor, program_id=program_id, call_prefix=f"round-{round_index}"
            )
            context = _replan_context(contexts) if contexts else None
            execution = await unit.run(self._planner(question, context))
            result.rounds.append(execution)
            decision = parse_joiner_output(
                await self._joiner(question, execution.scratchpad(), final)
            )
            result.answer, result.thought = decision.answer, decision.thought
            if not decision.replan or final:
                return result
            contexts.append(f"{execution.scratchpad()}Thought: {decision.thought}\n")
        return result


def _replan_context(contexts: list[str]) -> str:
    previous = "".join(f"Previous Plan:\n{c}\n" for c in contexts)
    return previous + "Current Plan:\n"


def planner_instructions(registry: ToolRegistry, *, replan: bool = False) -> str:
    """A system prompt that teaches a model the plan format, listing the registered tools."""
    tools = "\n".join(
        f"- {t.name}({', '.join(t.parameters.get('properties', {}))}): {t.description}"
        for t in registry
    )
    text = (
        "Write a plan that answers the question with as much parallelism as possible.\n"
        f"Tools:\n{tools}\n- join(): collect the results and answer; always the last task.\n"
        "Rules: one task per line as `N. tool(arguments)` with N strictly increasing; "
        "arguments are literals; use $N for the result of an earlier task N; tasks that "
        "do not depend on each other must not reference each other; you may put a "
        "`Thought:` line before a task; finish with `join()" + END_OF_PLAN + "`.\n"
    )
    if replan:
        text += (
            "You get the previous plans with their observations and the reason to replan. "
            "Do not repeat tasks that already ran; start with a `Thought:` line.\n"
        )
    return text
