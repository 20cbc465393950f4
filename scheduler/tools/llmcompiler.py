"""LLMCompiler-style parallel function calling (Kim et al., "An LLM Compiler for Parallel
Function Calling", ICML 2024): the planner's plan format, streaming task fetching onto
the scheduler's data-flow graph, the joiner's answer format.

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
  text; a bare argument (`f($1)`) is the result's text too (a graph variable holds text;
  JSON for a result that is not a string). A task can only reference earlier tasks,
  which also rules out cycles. `$k` is always a reference (write amounts of money
  without the dollar sign).
- `Thought:` lines annotate the next task. `join()` ends the plan (it depends on every
  task before it); so does `<END_OF_PLAN>`. Other lines are ignored.

Plans run on the scheduler's data-flow graph, as the server runs every program: there is
no second task-graph executor. `submit_plan` reads the planner's token stream and adds
each task as a graph tool call (`task_call`: `$k` becomes the variable `{{task_k}}`) the
moment its line is complete, so task 1 starts while the planner is still writing task 2,
and the graph starts each task when the tasks it references have finished. A failed task
fails its dependants (the graph's failure propagation); the others still run. The joiner
is an LLM call whose prompt (`scratchpad_template`) reads every task's variable;
`parse_joiner_output` reads its `Finish(...)` or `Replan(...)`. Replanning is the
program's loop (`examples/llm_compiler.py` plans again after a failed round).
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import networkx as nx

from ..spec import CallSpec
from .errors import (
    JoinerOutputError,
    PlanCycleError,
    PlanReferenceError,
    PlanSyntaxError,
    PlanUnknownToolError,
    ToolArgumentError,
)
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
    parsed_at: float = 0.0  # loop time its line was complete in the planner's stream

    @property
    def is_join(self) -> bool:
        return self.tool == JOIN


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


# -- plans on the scheduler's data-flow graph ---------------------------------------------------


class PlanGraph(Protocol):
    """Where a plan's tasks run: `scheduler.Scheduler` (its data-flow graph starts a tool
    call the moment the variables it reads are written)."""

    async def add_calls(self, program_id: str, calls: list[CallSpec], *,
                        tenant: str = "default") -> None: ...


def task_variable(index: int) -> str:
    """The variable task `index`'s result is written to."""
    return f"task_{index}"


def task_call(task: PlanTask, registry: ToolRegistry, *, program_id: str) -> CallSpec:
    """A plan task as a graph tool call: its arguments by name, each `$k` a `{{task_k}}`
    reference, so the graph starts it when the tasks it references have finished. A graph
    variable holds text: a bare `$k` passes task k's result as text (JSON for a non-string
    result)."""
    args = registry.get(task.tool, program_id=program_id).bind(
        task.kwargs, task.args, call_id=task_variable(task.index), program_id=program_id)
    return CallSpec(id=task_variable(task.index), kind="tool", tool=task.tool,
                    args={name: _template(value) for name, value in args.items()},
                    output=task_variable(task.index))


def _template(value: Any) -> Any:
    if isinstance(value, Ref):
        return "{{" + task_variable(value.task) + "}}"
    if isinstance(value, str):
        return _REF.sub(lambda m: "{{" + task_variable(int(m.group(1))) + "}}", value)
    if isinstance(value, list):
        return [_template(v) for v in value]
    if isinstance(value, dict):
        return {k: _template(v) for k, v in value.items()}
    return value


def scratchpad_template(tasks: dict[int, PlanTask]) -> str:
    """What the joiner reads: each task and its observation, as a prompt template the
    graph fills with the tasks' results."""
    out = ""
    for task in tasks.values():
        if task.is_join:
            continue
        out += f"Thought: {task.thought}\n" if task.thought else ""
        out += f"{task.index}. {task.line.split('.', 1)[1].strip()}\n"
        out += "Observation: {{" + task_variable(task.index) + "}}\n"
    return out


@dataclass(slots=True)
class PlanSubmission:
    """A plan streamed into the graph: its tasks (with `parsed_at`) and when it ended."""

    tasks: dict[int, PlanTask]
    started_at: float
    plan_done_at: float


async def submit_plan(
    graph: PlanGraph,
    program_id: str,
    plan: AsyncIterator[str],
    registry: ToolRegistry,
    *,
    tenant: str = "default",
    max_tasks: int | None = None,
) -> PlanSubmission:
    """Read the planner's stream and add each task to the program's graph the moment its
    line is complete: tasks start while the planner is still writing (streaming task
    fetching), and the graph, not this function, runs them. A malformed plan raises the
    parser's typed error; tasks already added stay in the graph (cancel the program to
    stop them)."""
    loop = asyncio.get_running_loop()
    parser = PlanParser(registry, max_tasks=max_tasks)
    started = loop.time()
    async for delta in plan:
        await _add_tasks(graph, program_id, parser.feed(delta), registry, tenant, loop.time())
    await _add_tasks(graph, program_id, parser.close(), registry, tenant, loop.time())
    return PlanSubmission(parser.tasks, started, loop.time())


async def _add_tasks(graph: PlanGraph, program_id: str, tasks: list[PlanTask],
                     registry: ToolRegistry, tenant: str, now: float) -> None:
    calls = []
    for task in tasks:
        task.parsed_at = now
        if not task.is_join:
            calls.append(task_call(task, registry, program_id=program_id))
    if calls:
        await graph.add_calls(program_id, calls, tenant=tenant)


# -- the joiner --------------------------------------------------------

_JOIN_ACTION = re.compile(
    r"^\s*Action:\s*(Finish|Replan)\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL
)

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
