"""Partial tool execution (Conveyor): parse the LLM's token stream incrementally and feed
a tool each input part as soon as it is complete, while decoding continues.

Two incremental parsers, one per `IncrementalTool.input_format`:

- `JsonArgumentStream` reads a JSON object of arguments and reports each top-level member
  once its value is complete. Partial JSON is parsed with the maintained
  `partial-json-parser` package; completeness is decided structurally (a member is
  complete when a later member has started, when the object has closed, or when its
  value is a closed string, a terminated number, a literal or a closed array).
- `CodeStatementStream` reads Python source (optionally inside a ``` fence, after prose)
  and reports each complete top-level statement: a simple statement as soon as its line
  ends and it parses; a compound one (`def`, `for`, `if`...) when the next line at column
  0 starts something new.

`run_partial_tool` wires a stream of text deltas (what an engine's `generate` yields as
`Chunk.text`) to `ToolExecutor.run_incremental`; with `partial=False` it runs the same
tool the conventional way, after decoding ends, for comparisons.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partial_json_parser import Allow, parse_json

from .errors import ToolArgumentError
from .incremental import STATEMENT, InputFormat

if TYPE_CHECKING:
    from .executor import ToolCallRecord, ToolExecutor

Part = tuple[str, Any]

# Characters after which a member may have become complete; other deltas cannot finish
# a value, so they skip the re-parse.
_JSON_BOUNDARY = re.compile(r'[",}\]\s el]')
_FENCE = "```"
_CONTINUATIONS = ("else", "elif", "except", "finally")
_COMPOUND = (
    ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith,
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Match,
    getattr(ast, "TryStar", ast.Try),
)  # fmt: skip


class JsonArgumentStream:
    """Text deltas in, complete top-level `(name, value)` members out, each exactly once.

    Text before the first `{` (a code fence, a short preamble) and after the object
    closes is ignored.
    """

    def __init__(self) -> None:
        self._text = ""
        self._start = -1
        self._emitted: set[str] = set()
        self._closed: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self._closed is not None

    def feed(self, delta: str) -> list[Part]:
        if self._closed is not None or not delta:
            return []
        self._text += delta
        if self._start < 0:
            self._start = self._text.find("{")
            if self._start < 0:
                return []
        elif not _JSON_BOUNDARY.search(delta):
            return []
        return self._scan()

    def close(self) -> list[Part]:
        """The stream ended: return the members not yet reported. Raises ValueError when
        the text is not one complete JSON object."""
        if self._closed is None:
            self._scan()
        if self._closed is None:
            body = self._text[self._start :] if self._start >= 0 else self._text
            raise ValueError(f"arguments are not a complete JSON object: {body[:200]!r}")
        return self._take(list(self._closed.items()))

    def arguments(self) -> dict[str, Any]:
        if self._closed is None:
            raise ValueError("the arguments are not complete yet")
        return dict(self._closed)

    def _scan(self) -> list[Part]:
        body = self._text[self._start :]
        with contextlib.suppress(ValueError):
            value, _ = json.JSONDecoder().raw_decode(body)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            self._closed = value
            return self._take(list(value.items()))
        try:
            loose = parse_json(body, Allow.ALL)
            strict = parse_json(body, Allow.OBJ)  # partial objects only: no partial scalars
        except Exception:  # not parseable yet (or never): decided at close()
            return []
        if not isinstance(loose, dict) or not loose:
            return []
        names = list(loose)
        done = [(name, loose[name]) for name in names[:-1]]
        last = names[-1]
        if isinstance(strict, dict) and last in strict and not isinstance(strict[last], dict):
            done.append((last, strict[last]))
        return self._take(done)

    def _take(self, members: list[Part]) -> list[Part]:
        fresh = [(k, v) for k, v in members if k not in self._emitted]
        self._emitted.update(k for k, _ in fresh)
        return fresh


class CodeStatementStream:
    """Text deltas in, complete top-level Python statements out (as source text)."""

    def __init__(self) -> None:
        self._partial_line = ""
        self._pending: list[str] = []
        self._fenced = False
        self._ended = False
        self._emitted_any = False

    @property
    def ended(self) -> bool:
        """The closing fence was seen (or `close` was called)."""
        return self._ended

    def feed(self, delta: str) -> list[str]:
        if self._ended or not delta:
            return []
        self._partial_line += delta
        *lines, self._partial_line = self._partial_line.split("\n")
        out: list[str] = []
        for line in lines:
            out += self._line(line.rstrip("\r"))
            if self._ended:
                break
        return out

    def close(self) -> list[str]:
        out: list[str] = []
        if not self._ended and self._partial_line:
            out += self._line(self._partial_line.rstrip("\r"))
        self._partial_line = ""
        self._ended = True
        return out + self._flush(force=True)

    def _line(self, line: str) -> list[str]:
        if line.strip().startswith(_FENCE):
            if self._fenced or self._emitted_any:  # closing fence: the code ends here
                self._ended = True
                return self._flush(force=True)
            self._pending = []  # opening fence: what came before it was prose
            self._fenced = True
            return []
        out: list[str] = []
        if self._pending and _starts_statement(line) and _parses(self._pending):
            out += self._flush()
        self._pending.append(line)
        if _is_finished_simple(self._pending):
            out += self._flush()
        return out

    def _flush(self, force: bool = False) -> list[str]:
        source = "\n".join(self._pending).strip("\n")
        self._pending = []
        if not source.strip():
            return []
        if not force and not _has_statements(source):
            return []  # only comments so far
        self._emitted_any = True
        return [source + "\n"]


def _starts_statement(line: str) -> bool:
    if not line or line[0].isspace() or line[0] in "#)]}":
        return False
    word = re.match(r"[A-Za-z_]+", line)
    return not (word and word.group(0) in _CONTINUATIONS)


def _parses(lines: list[str]) -> bool:
    try:
        ast.parse("\n".join(lines))
    except (SyntaxError, ValueError):
        return False
    return True


def _has_statements(source: str) -> bool:
    try:
        return bool(ast.parse(source).body)
    except (SyntaxError, ValueError):
        return True  # invalid code is still delivered: running it reports the error


def _is_finished_simple(lines: list[str]) -> bool:
    """A complete simple statement cannot be continued by the next line, so it can run
    as soon as its line ends. Compound statements wait for the next column-0 line."""
    if lines[-1].rstrip().endswith("\\"):
        return False
    try:
        body = ast.parse("\n".join(lines)).body
    except (SyntaxError, ValueError):
        return False
    return bool(body) and not any(isinstance(node, _COMPOUND) for node in body)


def split_statements(source: str) -> list[str]:
    """All top-level statements of complete source, as the streaming parser emits them."""
    stream = CodeStatementStream()
    return stream.feed(source) + stream.close()


def parts_of(input_format: InputFormat, args: dict[str, Any]) -> list[Part]:
    """The parts a complete argument dict would have been streamed as."""
    if input_format == "code":
        return [(STATEMENT, s) for s in split_statements(str(args.get("code", "")))]
    return list(args.items())


class _PartsParser:
    """One interface over both streams, yielding `(name, value)` parts."""

    def __init__(self, input_format: InputFormat) -> None:
        self._code = CodeStatementStream() if input_format == "code" else None
        self._json = JsonArgumentStream() if input_format == "json" else None

    def feed(self, delta: str) -> list[Part]:
        if self._code is not None:
            return [(STATEMENT, s) for s in self._code.feed(delta)]
        assert self._json is not None
        return self._json.feed(delta)

    def close(self) -> list[Part]:
        if self._code is not None:
            return [(STATEMENT, s) for s in self._code.close()]
        assert self._json is not None
        return self._json.close()

    @property
    def complete(self) -> bool:
        """The input is whole (the JSON object or the code fence closed) even if the
        LLM keeps writing: the tool can finish without waiting for the stream's end."""
        if self._code is not None:
            return self._code.ended
        assert self._json is not None
        return self._json.complete


@dataclass(slots=True)
class PartialRunResult:
    value: Any
    text: str  # the LLM's whole output
    stream_done_at: float  # loop time when the last delta arrived
    finished_at: float  # loop time when the tool's result was ready
    record: ToolCallRecord | None = None

    @property
    def tail_s(self) -> float:
        """Tool time exposed after decoding ended."""
        return self.finished_at - self.stream_done_at


_END = object()


async def run_partial_tool(
    executor: ToolExecutor,
    name: str,
    deltas: AsyncIterator[str],
    *,
    program_id: str,
    call_id: str,
    partial: bool = True,
    on_finish: Callable[[ToolCallRecord], None] | None = None,
) -> PartialRunResult:
    """Run tool `name` on the input the LLM is writing into `deltas`.

    With `partial=True` the tool is opened at once and fed each part as soon as it is
    complete; with `partial=False` decoding finishes first and the tool then gets its
    whole input (the conventional order, used as the baseline). Malformed input raises
    `ToolArgumentError`; errors of the stream itself propagate unchanged.
    """
    run = _PartialRun(executor, name, program_id, call_id, on_finish)
    if partial:
        return await run.streaming(deltas)
    return await run.after_decoding(deltas)


class _PartialRun:
    """One tool run fed from one LLM stream: the parser, the text so far, the records."""

    def __init__(
        self,
        executor: ToolExecutor,
        name: str,
        program_id: str,
        call_id: str,
        on_finish: Callable[[ToolCallRecord], None] | None,
    ) -> None:
        self.executor = executor
        self.name = name
        self.program_id = program_id
        self.call_id = call_id
        self.on_finish = on_finish
        tool = executor.registry.get(name, call_id=call_id, program_id=program_id)
        self.parser = _PartsParser(tool.input_format)
        self.loop = asyncio.get_running_loop()
        self.text: list[str] = []
        self.records: list[ToolCallRecord] = []

    def keep(self, record: ToolCallRecord) -> None:
        self.records.append(record)
        if self.on_finish is not None:
            self.on_finish(record)

    def closing_parts(self) -> list[Part]:
        try:
            return self.parser.close()
        except ValueError as exc:
            raise ToolArgumentError(
                self.name, str(exc), call_id=self.call_id, program_id=self.program_id
            ) from None

    async def run_tool(self, parts: AsyncIterator[Part]) -> Any:
        return await self.executor.run_incremental(
            self.name, parts, program_id=self.program_id, call_id=self.call_id,
            on_finish=self.keep,
        )

    def result(self, value: Any, done_at: float, finished_at: float) -> PartialRunResult:
        return PartialRunResult(value, "".join(self.text), done_at, finished_at,
                                _last(self.records))

    async def after_decoding(self, deltas: AsyncIterator[str]) -> PartialRunResult:
        """The conventional order: read the whole reply, then run the tool on it."""
        parts: list[Part] = []
        async for delta in deltas:
            self.text.append(delta)
            parts += self.parser.feed(delta)
        parts += self.closing_parts()
        done_at = self.loop.time()
        value = await self.run_tool(_iterate(parts))
        return self.result(value, done_at, self.loop.time())

    async def streaming(self, deltas: AsyncIterator[str]) -> PartialRunResult:
        """Feed the tool each part as it completes while a reader task drains `deltas`."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream_done = self.loop.create_future()
        reader = asyncio.create_task(self._read(deltas, queue, stream_done),
                                     name=f"partial-reader:{self.call_id}")
        try:
            value = await self.run_tool(_consume(queue))
            finished_at = self.loop.time()
            await reader  # the input was whole; collect the rest of the reply
        finally:
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        return self.result(value, stream_done.result(), finished_at)

    async def _read(
        self, deltas: AsyncIterator[str], queue: asyncio.Queue[Any], stream_done: asyncio.Future
    ) -> None:
        try:
            await self._parts_into(deltas, queue)
            stream_done.set_result(self.loop.time())
        except BaseException as exc:  # the consumer re-raises it in the tool's task
            queue.put_nowait(_Failure(exc))
            if not stream_done.done():
                stream_done.set_exception(exc)
                stream_done.exception()  # retrieved here; the tool task reports it
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _parts_into(self, deltas: AsyncIterator[str], queue: asyncio.Queue[Any]) -> None:
        inputs_done = False
        async for delta in deltas:
            self.text.append(delta)
            for part in self.parser.feed(delta):
                queue.put_nowait(part)
            if self.parser.complete and not inputs_done:
                inputs_done = True  # finish now; keep reading the rest of the reply
                queue.put_nowait(_END)
        if not inputs_done:
            for part in self.closing_parts():
                queue.put_nowait(part)
            queue.put_nowait(_END)


async def _consume(queue: asyncio.Queue[Any]) -> AsyncIterator[Part]:
    while (item := await queue.get()) is not _END:
        if isinstance(item, _Failure):
            raise item.exc
        yield item


@dataclass(slots=True)
class _Failure:
    exc: BaseException


async def _iterate(parts: list[Part]) -> AsyncIterator[Part]:
    for part in parts:
        yield part


def _last(records: list[ToolCallRecord]) -> ToolCallRecord | None:
    return records[-1] if records else None
