"""The tool registry: the only tools a request can ever call.

A tool is a Python callable (sync or async) registered under a name, with its limits:
concurrency, rate, timeout, and whether it is idempotent (only idempotent tools are
retried). A tool may also declare an incremental interface (`IncrementalTool`), so that
it can start while the LLM is still writing its input. Requests name tools; they never
carry code, and nothing here evaluates strings.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import ToolsConfig
from .errors import ToolArgumentError, ToolError, UnknownToolError
from .incremental import IncrementalFactory, InputFormat

# OpenAI's function-name rule; also what a plan line's `\w+` tool name matches (minus '-').
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}


@dataclass(slots=True, frozen=True)
class ToolPolicy:
    """Limits of one tool. `rate_limit` calls may start in any `rate_period_s` window."""

    timeout_s: float
    max_concurrency: int
    max_retries: int
    idempotent: bool = False
    rate_limit: int | None = None
    rate_period_s: float = 1.0

    @property
    def attempts(self) -> int:
        return 1 + self.max_retries if self.idempotent else 1


@dataclass(slots=True)
class RegisteredTool:
    name: str
    fn: Callable[..., Any] | None
    description: str
    policy: ToolPolicy
    incremental: IncrementalFactory | None = None
    input_format: InputFormat = "json"
    parameters: dict[str, Any] = field(default_factory=dict)  # JSON schema of the arguments
    is_async: bool = False
    signature: inspect.Signature | None = None

    def bind(
        self,
        args: dict[str, Any] | None,
        positional: tuple[Any, ...] | list[Any] = (),
        *,
        call_id: str | None = None,
        program_id: str | None = None,
    ) -> dict[str, Any]:
        """Check arguments against the tool's signature; return them all by name."""
        if args is not None and not isinstance(args, dict):
            raise ToolArgumentError(
                self.name,
                f"arguments must be an object, got {type(args).__name__}",
                call_id=call_id,
                program_id=program_id,
            )
        kwargs = dict(args or {})
        if self.signature is None:  # an incremental-only tool takes named parts
            if positional:
                names = list(self.parameters.get("properties", {}))
                if len(positional) > len(names):
                    raise ToolArgumentError(
                        self.name,
                        f"takes at most {len(names)} positional arguments",
                        call_id=call_id,
                        program_id=program_id,
                    )
                kwargs.update(zip(names, positional, strict=False))
            return kwargs
        try:
            bound = self.signature.bind(*positional, **kwargs)
        except TypeError as exc:
            raise ToolArgumentError(
                self.name, str(exc), call_id=call_id, program_id=program_id
            ) from None
        named = dict(bound.arguments)
        for pname, param in self.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and pname in named:
                named.update(named.pop(pname))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and pname in named:
                raise ToolArgumentError(
                    self.name,
                    "tools take named arguments only (no *args)",
                    call_id=call_id,
                    program_id=program_id,
                )
        return named

    def openai_tool(self) -> dict[str, Any]:
        """This tool as an entry of OpenAI's `tools` request field."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolRegistry:
    """Tools by name. Register at startup; look up per call."""

    def __init__(self, config: ToolsConfig | None = None) -> None:
        self.config = config or ToolsConfig()
        self._tools: dict[str, RegisteredTool] = {}

    def register(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        description: str | None = None,
        idempotent: bool = False,
        timeout_s: float | None = None,
        max_concurrency: int | None = None,
        max_retries: int | None = None,
        rate_limit: int | None = None,
        rate_period_s: float = 1.0,
        incremental: IncrementalFactory | None = None,
        input_format: InputFormat | None = None,
        parameters: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> RegisteredTool:
        """Register `fn` (sync or async) under `name`.

        `incremental` is a factory of `IncrementalTool`s; with it, `fn` may be omitted
        (plain calls then feed the whole input to a fresh instance). `input_format`
        defaults to the factory's own. `parameters` is a JSON schema of the arguments;
        by default it is derived from `fn`'s signature.
        """
        if not TOOL_NAME.match(name):
            raise ToolError(name, "invalid tool name: use [A-Za-z_][A-Za-z0-9_-]{0,63}")
        if name in self._tools and not replace:
            raise ToolError(name, "already registered (pass replace=True to override)")
        if fn is None and incremental is None:
            raise ToolError(name, "needs a callable or an incremental factory")
        if fn is not None and not callable(fn):
            raise ToolError(name, "is not callable")
        for label, value in (("max_concurrency", max_concurrency), ("rate_limit", rate_limit)):
            if value is not None and value < 1:
                raise ToolError(name, f"{label} must be >= 1")
        if timeout_s is not None and timeout_s <= 0:
            raise ToolError(name, "timeout_s must be > 0")
        if rate_period_s <= 0:
            raise ToolError(name, "rate_period_s must be > 0")
        cfg = self.config
        policy = ToolPolicy(
            timeout_s=timeout_s if timeout_s is not None else cfg.default_timeout_s,
            max_concurrency=max_concurrency or cfg.default_max_concurrency,
            max_retries=max_retries if max_retries is not None else cfg.default_max_retries,
            idempotent=idempotent,
            rate_limit=rate_limit,
            rate_period_s=rate_period_s,
        )
        signature = inspect.signature(fn) if fn is not None else None
        fmt = input_format or getattr(incremental, "input_format", None) or "json"
        tool = RegisteredTool(
            name=name,
            fn=fn,
            description=description if description is not None else _first_line(fn),
            policy=policy,
            incremental=incremental,
            input_format=fmt,
            parameters=parameters if parameters is not None else schema_of(fn),
            is_async=fn is not None and _is_async_callable(fn),
            signature=signature,
        )
        self._tools[name] = tool
        return tool

    def tool(self, name: str | None = None, **options: Any) -> Callable[[Callable], Callable]:
        """Decorator form of `register`: `@registry.tool(timeout_s=5)`."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name or fn.__name__, fn, **options)
            return fn

        return decorate

    def get(
        self, name: str, *, call_id: str | None = None, program_id: str | None = None
    ) -> RegisteredTool:
        try:
            return self._tools[name]
        except (KeyError, TypeError):
            raise UnknownToolError(
                str(name), known=list(self._tools), call_id=call_id, program_id=program_id
            ) from None

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[RegisteredTool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai_tool() for tool in self._tools.values()]

    async def aclose(self) -> None:
        """Release what registered tools hold (the code runner's warm child): call at
        shutdown. Tools and factories with an async `aclose()` are closed."""
        for tool in self._tools.values():
            for owner in (tool.fn, tool.incremental):
                close = getattr(owner, "aclose", None)
                if close is not None and inspect.iscoroutinefunction(close):
                    await close()


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    target = getattr(fn, "func", fn)  # functools.partial
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callable objects
    )


def _first_line(fn: Callable[..., Any] | None) -> str:
    doc = inspect.getdoc(fn) if fn is not None else None
    return doc.strip().splitlines()[0] if doc else ""


def schema_of(fn: Callable[..., Any] | None) -> dict[str, Any]:
    """A JSON schema of `fn`'s named parameters, from its annotations (best effort)."""
    schema: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    if fn is None:
        return schema
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to untyped parameters
        hints = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        schema["properties"][pname] = _json_type(hints.get(pname))
        if param.default is inspect.Parameter.empty:
            schema["required"].append(pname)
    return schema


def _json_type(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _json_type(options[0]) if len(options) == 1 else {}
    base = origin or hint
    return {"type": _JSON_TYPES[base]} if base in _JSON_TYPES else {}
