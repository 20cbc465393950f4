"""The DSL's primitives. Each returns at once (a `SemanticVariable` or branches); nothing
blocks until the program awaits a variable.

    gen(prompt, ...)            an LLM call
    select(prompt, choices)     a constrained choice among `choices`
    tool(name | callable, ...)  a tool call: registered on the server by name, or a Python
                                callable run client-side by the DSL runtime
    let(value)                  a program input (a variable whose value is known)
    fork(n, prefix) / join(..)  parallel branches from a shared prefix, and their join
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from .context import ProgramContext, caller_site, current_context
from .errors import ProgramDefinitionError
from .templates import to_template
from .variables import JoinedVariables, SemanticVariable

__all__ = ["Branch", "fork", "gen", "join", "let", "select", "tool"]

_MAX_FORK = 256


def _sampling(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    stop: str | list[str] | None,
    regex: str | None,
    json_schema: str | dict[str, Any] | None,
    seed: int | None,
) -> dict[str, Any]:
    """Only the options given: the rest keep the engine-neutral defaults of the spec."""
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop,
        "regex": regex,
        "json_schema": json.dumps(json_schema) if isinstance(json_schema, dict) else json_schema,
        "seed": seed,
    }
    return {k: v for k, v in options.items() if v is not None}


def gen(
    prompt: Any,
    *,
    name: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: str | list[str] | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    seed: int | None = None,
    priority_hint: float | None = None,
) -> SemanticVariable:
    """An LLM call on `prompt` (a template: f-string with variables, or `{{name}}`).

    `regex` / `json_schema` constrain the output where the engine supports it (else the
    call fails with the engine's error). `priority_hint`: lower is more urgent.
    """
    return _gen(
        current_context(),
        prompt,
        thread_id=None,
        name=name,
        sampling=_sampling(max_tokens, temperature, top_p, stop, regex, json_schema, seed),
        priority_hint=priority_hint,
        site=caller_site(),
    )


def _gen(
    context: ProgramContext,
    prompt: Any,
    *,
    thread_id: str | None,
    name: str | None,
    sampling: dict[str, Any],
    priority_hint: float | None,
    site: str,
    parents: list[str] | None = None,
) -> SemanticVariable:
    return context.add_llm_call(
        kind="gen",
        prompt=to_template(prompt),
        name=name,
        sampling=sampling,
        thread_id=thread_id,
        priority_hint=priority_hint,
        parents=parents,
        site=site,
    )


def select(
    prompt: Any,
    choices: Iterable[str],
    *,
    name: str | None = None,
    priority_hint: float | None = None,
) -> SemanticVariable:
    """A constrained choice: the variable's value is exactly one of `choices`."""
    return _select(current_context(), prompt, choices, None, name, priority_hint, caller_site())


def _select(
    context: ProgramContext,
    prompt: Any,
    choices: Iterable[str],
    thread_id: str | None,
    name: str | None,
    priority_hint: float | None,
    site: str,
    parents: list[str] | None = None,
) -> SemanticVariable:
    options = list(choices)
    if not options or not all(isinstance(c, str) and c for c in options):
        raise ProgramDefinitionError(f"select() at {site}: choices must be non-empty strings")
    return context.add_llm_call(
        kind="select",
        prompt=to_template(prompt),
        name=name,
        sampling={"temperature": 0.0},
        choices=options,
        thread_id=thread_id,
        priority_hint=priority_hint,
        parents=parents,
        site=site,
    )


def tool(
    name_or_callable: str | Callable[..., Any],
    /,
    *,
    name: str | None = None,
    args: dict[str, Any] | None = None,
    priority_hint: float | None = None,
    **kwargs: Any,
) -> SemanticVariable:
    """A tool call. A string names a tool registered on the server; a callable (sync or
    async) runs client-side in the DSL runtime once its argument variables have values.

    Arguments come as keywords (or `args={...}` for names that clash with `name`);
    variables among them are passed by value when the tool runs.
    """
    context = current_context()
    site = caller_site()
    call_args = {**(args or {}), **kwargs}
    wire_args = {key: _wire_arg(key, value, site) for key, value in call_args.items()}
    if callable(name_or_callable):
        return context.add_client_tool(
            name_or_callable, args=call_args, templates=wire_args, name=name, site=site
        )
    if not isinstance(name_or_callable, str) or not name_or_callable:
        raise ProgramDefinitionError(f"tool() at {site}: give a tool name or a callable")
    return context.add_tool_call(
        tool=name_or_callable,
        args=wire_args,
        name=name,
        priority_hint=priority_hint,
        site=site,
    )


def _wire_arg(key: str, value: Any, site: str) -> Any:
    """Variables become `{{name}}` templates (the call's data-flow inputs); other values
    must not nest variables (only top-level arguments are filled in)."""
    if isinstance(value, SemanticVariable | JoinedVariables):
        return str(value)
    if isinstance(value, list | tuple | dict) and _contains_variable(value):
        raise ProgramDefinitionError(
            f"tool() at {site}: argument {key!r} nests a variable inside a container; "
            f"pass it as its own argument (or as an f-string)"
        )
    return value


def _contains_variable(value: Any) -> bool:
    if isinstance(value, SemanticVariable | JoinedVariables):
        return True
    if isinstance(value, dict):
        return any(_contains_variable(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_variable(v) for v in value)
    return False


def let(value: str, *, name: str | None = None) -> SemanticVariable:
    """A program input: a variable with a known value. Prompts that reference it by
    `{{name}}` share one copy of the text (sent once with the program)."""
    return current_context().add_input(value, name, caller_site())


class Branch:
    """A prompt that grows as it generates (SGLang-style state), on its own thread.

    `branch += text` appends text; `branch.gen()` / `branch.select()` make a call on the
    prompt so far and append its output, so later calls see it. Branches from one
    `fork` share their prefix, which the engine's prefix cache serves once.
    """

    __slots__ = ("_after", "_context", "_parts", "index", "last", "thread_id")

    def __init__(
        self,
        context: ProgramContext,
        prefix: str,
        thread_id: str,
        index: int,
        after: list[str] | None = None,
    ) -> None:
        self._context = context
        self._parts = [prefix] if prefix else []
        self.thread_id = thread_id
        self.index = index
        self.last: SemanticVariable | None = None
        self._after = after or []  # call ids the branch's first call waits for

    @property
    def text(self) -> str:
        """The prompt so far, as a template."""
        return "".join(self._parts)

    def __iadd__(self, part: Any) -> Branch:
        self._parts.append(to_template(part))
        return self

    def gen(
        self,
        *,
        name: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        regex: str | None = None,
        json_schema: str | dict[str, Any] | None = None,
        seed: int | None = None,
        priority_hint: float | None = None,
    ) -> SemanticVariable:
        variable = _gen(
            self._context,
            self._prompt(),
            thread_id=self.thread_id,
            name=name,
            sampling=_sampling(max_tokens, temperature, top_p, stop, regex, json_schema, seed),
            priority_hint=priority_hint,
            site=caller_site(),
            parents=self._take_after(),
        )
        return self._append(variable)

    def select(
        self,
        choices: Iterable[str],
        *,
        name: str | None = None,
        priority_hint: float | None = None,
    ) -> SemanticVariable:
        variable = _select(
            self._context,
            self._prompt(),
            choices,
            self.thread_id,
            name,
            priority_hint,
            caller_site(),
            self._take_after(),
        )
        return self._append(variable)

    def fork(self, n: int) -> list[Branch]:
        return _fork(self._context, n, self.text, caller_site())

    def _prompt(self) -> str:
        if not self._parts:
            raise ProgramDefinitionError(
                f"branch {self.thread_id!r}: generating on an empty prompt; add text first"
            )
        return self.text

    def _take_after(self) -> list[str]:
        after, self._after = self._after, []
        return after

    def _append(self, variable: SemanticVariable) -> SemanticVariable:
        self._parts.append(str(variable))
        self.last = variable
        return variable

    def __repr__(self) -> str:
        return f"<Branch {self.index} {self.thread_id!r}: {self.text[-40:]!r}>"


def fork(n: int, prefix: Any = "") -> list[Branch]:
    """`n` parallel branches that start from the same `prefix` (a template)."""
    return _fork(current_context(), n, to_template(prefix), caller_site())


def _fork(context: ProgramContext, n: int, prefix: str, site: str) -> list[Branch]:
    """Branches that share `prefix`. Like SGLang's fork, the prefix is prefilled once first
    (a call with `max_new_tokens=0`, the branches' parent): branches sent together would
    otherwise all prefill it at the same time, before any of them has cached it."""
    if not isinstance(n, int) or not 1 <= n <= _MAX_FORK:
        raise ProgramDefinitionError(f"fork() at {site}: n must be an int in 1..{_MAX_FORK}")
    after: list[str] = []
    if n > 1 and prefix:
        warm = context.add_llm_call(
            kind="prefix", prompt=prefix, name=None, sampling={"max_new_tokens": 0}, site=site
        )
        assert warm.call_id is not None
        after = [warm.call_id]
    return [Branch(context, prefix, context.new_thread_id(), i, after) for i in range(n)]


def join(items: Iterable[Branch | SemanticVariable], sep: str = "\n") -> JoinedVariables:
    """Join branches (their last outputs) or variables: in a prompt the result renders as
    the values separated by `sep`; awaiting it returns the list of values."""
    variables: list[SemanticVariable] = []
    for item in items:
        if isinstance(item, Branch):
            if item.last is None:
                raise ProgramDefinitionError(
                    f"join(): branch {item.thread_id!r} has generated nothing yet"
                )
            variables.append(item.last)
        elif isinstance(item, SemanticVariable):
            variables.append(item)
        else:
            raise ProgramDefinitionError(
                f"join() takes branches or variables, not {type(item).__name__}"
            )
    return JoinedVariables(variables, sep)
