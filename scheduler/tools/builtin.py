"""Example tools: a calculator (a safe AST evaluator, never `eval`), a local document
search, a search with configurable latency (for benchmarks), and two incremental tools
in Conveyor's style (a multi-argument search, a step-by-step plan validator).

`register_builtin_tools` registers the safe ones on a registry.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import math
import operator
import re
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .code_runner import CodeRunnerTool
from .incremental import IncrementalTool
from .registry import ToolRegistry

# -- calculator -------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 512
MAX_EXPRESSION_NODES = 256
MAX_INT_BITS = 4096  # larger intermediate integers are refused (no 10**10**10 bombs)

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2,
    "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "hypot": math.hypot,
    "floor": math.floor, "ceil": math.ceil,
}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or is too large."""


def evaluate_arithmetic(expression: str) -> int | float:
    """Evaluate arithmetic by walking its syntax tree: numbers, + - * / // % ** (and `^`
    as power), parentheses, the constants pi, e, tau and a few math functions. Anything
    else (names, attributes, strings, comprehensions, lambdas) is refused."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    text = expression.strip().replace("^", "**")
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPRESSION_NODES:
        raise CalculatorError("expression too complex")
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Any:
    match node:
        case ast.Constant(value=bool()):
            raise CalculatorError("booleans are not numbers here")
        case ast.Constant(value=int() | float() as value):
            return _checked(value)
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _checked(_UNARY[type(op)](_evaluate(operand)))
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            a, b = _evaluate(left), _evaluate(right)
            if isinstance(op, ast.Pow):
                _check_power(a, b)
            try:
                return _checked(_BINARY[type(op)](a, b))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("result too large") from None
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            values = [_evaluate(arg) for arg in args]
            try:
                return _checked(_FUNCTIONS[name](*values))
            except (ValueError, TypeError, OverflowError) as exc:
                raise CalculatorError(f"{name}: {exc}") from None
    raise CalculatorError(f"not allowed in an arithmetic expression: {ast.unparse(node)!r}")


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and abs(base).bit_length() * exponent > MAX_INT_BITS:
            raise CalculatorError("result too large")


def _checked(value: Any) -> Any:
    if isinstance(value, complex):
        raise CalculatorError("complex result")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    return value


async def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression, e.g. "(2 + 3) * sqrt(16) / 4"."""
    # Async on purpose: the work is tiny and bounded, and staying on the loop keeps the
    # tool exact under the virtual-time benchmark clock.
    return evaluate_arithmetic(expression)


# -- local document search ---------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9_]+")


@dataclass(slots=True, frozen=True)
class _Document:
    path: str
    text: str
    terms: Counter[str]


class DocumentSearch:
    """Search the text files under one directory (term frequency x inverse document
    frequency). Files are indexed once, on the first query; symlinks leading outside
    the root are skipped. Synchronous: the executor runs it in a worker thread."""

    def __init__(
        self,
        root: str | Path,
        *,
        patterns: tuple[str, ...] = ("*.md", "*.txt", "*.rst"),
        max_files: int = 10_000,
        max_file_bytes: int = 1 << 20,
    ) -> None:
        self.root = Path(root).resolve()
        self._patterns = patterns
        self._max_files = max_files
        self._max_file_bytes = max_file_bytes
        self._docs: list[_Document] | None = None
        self._lock = threading.Lock()

    def __call__(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        """Find the local documents that best match `query`; returns paths and snippets."""
        words = [w.lower() for w in _WORD.findall(query)]
        if not words:
            return []
        docs = self._index()
        scored = []
        for doc in docs:
            score = sum(
                doc.terms[w] * math.log(1 + len(docs) / (1 + self._df(w, docs))) for w in words
            )
            if score > 0:
                scored.append((score, doc))
        scored.sort(key=lambda item: (-item[0], item[1].path))
        return [
            {"path": doc.path, "score": round(score, 4), "snippet": _snippet(doc.text, words)}
            for score, doc in scored[: max(1, min(int(k), 50))]
        ]

    def _df(self, word: str, docs: list[_Document]) -> int:
        return sum(1 for doc in docs if word in doc.terms)

    def _index(self) -> list[_Document]:
        with self._lock:
            if self._docs is None:
                self._docs = self._load()
            return self._docs

    def _load(self) -> list[_Document]:
        docs: list[_Document] = []
        for pattern in self._patterns:
            for path in sorted(self.root.rglob(pattern)):
                if len(docs) >= self._max_files:
                    return docs
                real = path.resolve()
                if not real.is_file() or not real.is_relative_to(self.root):
                    continue
                with contextlib.suppress(OSError):
                    text = real.read_bytes()[: self._max_file_bytes].decode(errors="replace")
                    terms = Counter(w.lower() for w in _WORD.findall(text))
                    docs.append(_Document(str(path.relative_to(self.root)), text, terms))
        return docs


def _snippet(text: str, words: list[str], width: int = 160) -> str:
    lower = text.lower()
    hits = [i for i in (lower.find(w) for w in words) if i >= 0]
    start = max(0, min(hits) - width // 4) if hits else 0
    return " ".join(text[start : start + width].split())


# -- a search with configurable latency (benchmarks, examples) ----------------------------


class SimulatedSearch:
    """A search that waits `latency_s` (a number, or a function of the query) with
    `asyncio.sleep`, then answers from `answers` (or a stock sentence). It stands in for a
    web or database search in benchmarks: in virtual time it costs no wall time."""

    def __init__(
        self,
        latency_s: float | Callable[[str], float] = 0.5,
        answers: Mapping[str, Any] | None = None,
    ) -> None:
        self._latency = latency_s if callable(latency_s) else (lambda _q: float(latency_s))
        self._answers = answers or {}

    async def __call__(self, query: str) -> Any:
        """Search for `query`."""
        await asyncio.sleep(self._latency(query))
        return self._answers.get(query, f"no result for {query!r}")


# -- incremental tools (Conveyor-style) -----------------------------------------------------

Lookup = Callable[[str, Any], Awaitable[Any]]


class MultiFieldSearch(IncrementalTool):
    """A search with several arguments: each argument starts its own lookup (`lookup(name,
    value)`) as soon as the LLM has written it; `finish` gathers them, in argument order."""

    input_format = "json"

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    async def on_partial(self, name: str, value: Any) -> None:
        self._tasks[name] = asyncio.create_task(self._lookup(name, value))

    async def finish(self) -> dict[str, Any]:
        return {name: await task for name, task in self._tasks.items()}

    async def aclose(self) -> None:
        await _cancel_all(self._tasks.values())


class PlanValidator(IncrementalTool):
    """Validates a multi-step plan in order, step by step as the LLM writes it: each step's
    check (`check(name, step)`, returning a verdict) starts once the step is written and
    the previous check is done (a step is judged in the state the earlier ones leave)."""

    input_format = "json"

    def __init__(self, check: Lookup) -> None:
        self._check = check
        self._chain: list[tuple[str, asyncio.Task[Any]]] = []

    async def on_partial(self, name: str, value: Any) -> None:
        previous = self._chain[-1][1] if self._chain else None
        self._chain.append((name, asyncio.create_task(self._after(previous, name, value))))

    async def _after(self, previous: asyncio.Task[Any] | None, name: str, value: Any) -> Any:
        if previous is not None:
            await asyncio.wait([previous])
        return await self._check(name, value)

    async def finish(self) -> dict[str, Any]:
        verdicts = {name: await task for name, task in self._chain}
        return {"valid": all(bool(v) for v in verdicts.values()), "steps": verdicts}

    async def aclose(self) -> None:
        await _cancel_all(task for _, task in self._chain)


async def _cancel_all(tasks: Any) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def register_builtin_tools(
    registry: ToolRegistry,
    *,
    docs_root: str | Path | None = None,
    code_runner: bool = False,
) -> ToolRegistry:
    """Register `calculator`, `search_docs` (when `docs_root` is given) and `python` (the
    sandboxed code runner, only when asked: it executes model-written code)."""
    registry.register("calculator", calculator, idempotent=True, timeout_s=2.0)
    if docs_root is not None:
        registry.register(
            "search_docs",
            DocumentSearch(docs_root),
            description="Search local documents; returns paths and snippets.",
            idempotent=True,
            parameters={
                "type": "object",
                "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                "required": ["query"],
            },
        )
    if code_runner:
        cfg = registry.config.code_runner
        registry.register(
            "python",
            incremental=CodeRunnerTool(cfg),
            description="Run Python code (standard library only) and return its output.",
            timeout_s=cfg.timeout_s + 5.0,  # the runner enforces its own limit first
            max_concurrency=4,
            parameters={
                "type": "object",
                "properties": {"code": {"type": "string"}},
                "required": ["code"],
            },
        )
    return registry
