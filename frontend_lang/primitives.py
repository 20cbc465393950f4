"""The DSL's primitives. Each returns at once (a `SemanticVariable` or branches); nothing
blocks until the program awaits a variable.

    gen(prompt, ...)            an LLM call
    select(prompt, choices)     a constrained choice among `choices`
    tool(name | callable, ...)  a tool call: registered on the server by name, or a Python
                                callable run client-side by the DSL runtime
    let(value)                  a program input (a variable whose value is known)
    fork(n, prefix) / join(..)  parallel branches from a shared prefix, and their join
    conversation(*messages)     a growing chat (`s += user(...)`, `s += assistant(gen())`)

A prompt is text (a template) or chat messages (`system` / `user` / `assistant`, see
`roles.py`); `gen()` / `select()` without a prompt go inside `assistant(...)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from .context import ProgramContext, caller_site, current_context
from .errors import ProgramDefinitionError
from .roles import CallPrompt, Generation, Message, Role, message_specs
from .templates import to_template
from .variables import JoinedVariables, SemanticVariable

__all__ = ["Branch", "conversation", "fork", "gen", "join", "let", "select", "tool"]

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
    prompt: Any = None,
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
) -> Any:
    """An LLM call on `prompt`: a template (f-string with variables, or `{{name}}`), or chat
    messages (then the output is the assistant's reply). Without a prompt, inside
    `assistant(...)`: the model writes that turn of a conversation.

    `regex` / `json_schema` constrain the output where the engine supports it (else the
    call fails with the engine's error). `priority_hint`: lower is more urgent.
    """
    sampling = _sampling(max_tokens, temperature, top_p, stop, regex, json_schema, seed)
    if prompt is None:
        return Generation("gen", name, sampling, None, priority_hint, caller_site())
    return _llm_call(
        current_context(),
        "gen",
        CallPrompt.of(prompt),
        thread_id=None,
        name=name,
        sampling=sampling,
        choices=None,
        priority_hint=priority_hint,
        site=caller_site(),
    )


def _llm_call(
    context: ProgramContext,
    kind: str,
    prompt: CallPrompt,
    *,
    thread_id: str | None,
    name: str | None,
    sampling: dict[str, Any],
    choices: list[str] | None,
    priority_hint: float | None,
    site: str,
    parents: list[str] | None = None,
) -> SemanticVariable:
    return context.add_llm_call(
        kind=kind,
        prompt=prompt,
        name=name,
        sampling=sampling,
        choices=choices,
        thread_id=thread_id,
        priority_hint=priority_hint,
        parents=parents,
        site=site,
    )


def select(
    prompt: Any = None,
    choices: Iterable[str] = (),
    *,
    name: str | None = None,
    priority_hint: float | None = None,
) -> Any:
    """A constrained choice: the variable's value is exactly one of `choices`. Without a
    prompt (`select(choices=[...])`), inside `assistant(...)`: the model's turn is the
    choice."""
    site = caller_site()
    options = _choices(choices, site)
    if prompt is None:
        return Generation("select", name, {"temperature": 0.0}, options, priority_hint, site)
    return _llm_call(
        current_context(),
        "select",
        CallPrompt.of(prompt),
        thread_id=None,
        name=name,
        sampling={"temperature": 0.0},
        choices=options,
        priority_hint=priority_hint,
        site=site,
    )


def _choices(choices: Iterable[str], site: str) -> list[str]:
    options = list(choices)
    if not options or not all(isinstance(c, str) and c for c in options):
        raise ProgramDefinitionError(f"select() at {site}: choices must be non-empty strings")
    return options


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

    Text form: `branch += text` appends text; `branch.gen()` / `branch.select()` make a
    call on the prompt so far and append its output. Chat form (`conversation(...)`, or a
    fork of messages): `branch += user(...)` adds a message, `branch += assistant(gen())`
    (or `branch.gen()`) a turn the model writes, and plain text extends the last message.
    Later calls see everything before them; branches from one `fork` share their prefix,
    which the engine's prefix cache serves once.
    """

    __slots__ = ("_after", "_context", "_named", "_parts", "_turns", "index", "last",
                 "thread_id")

    def __init__(
        self,
        context: ProgramContext,
        prefix: CallPrompt,
        thread_id: str,
        index: int,
        after: list[str] | None = None,
    ) -> None:
        self._context = context
        self._parts = [prefix.text] if prefix.text else []
        # Chat form: (role, content parts) per message; None for a text-form branch.
        self._turns: list[tuple[Role, list[str]]] | None = None
        if prefix.messages is not None:
            self._turns = [(m.role, [m.content]) for m in prefix.messages]
        self.thread_id = thread_id
        self.index = index
        self.last: SemanticVariable | None = None
        self._named: dict[str, SemanticVariable] = {}
        self._after = after or []  # call ids the branch's first call waits for

    @property
    def text(self) -> str:
        """The prompt so far, as a template (text form)."""
        if self._turns is not None:
            raise ProgramDefinitionError(
                f"branch {self.thread_id!r} is a conversation: read `.messages`, not `.text`"
            )
        return "".join(self._parts)

    @property
    def messages(self) -> list[Message]:
        """The conversation so far (chat form); contents are templates."""
        return [Message(role, "".join(parts)) for role, parts in self._turns or ()]

    def __getitem__(self, name: str) -> SemanticVariable:
        """The latest variable this branch generated with `name=name`."""
        try:
            return self._named[name]
        except KeyError:
            raise KeyError(f"branch {self.thread_id!r} generated no variable {name!r}") from None

    def __iadd__(self, part: Any) -> Branch:
        if isinstance(part, Message):
            self._add_message(part)
        elif isinstance(part, Generation):
            raise part._misuse()
        elif self._turns is not None:
            if not self._turns:
                raise ProgramDefinitionError(
                    f"branch {self.thread_id!r}: start the conversation with a message "
                    f"(system / user) before adding text"
                )
            self._turns[-1][1].append(to_template(part))
        else:
            self._parts.append(to_template(part))
        return self

    def _add_message(self, message: Message) -> None:
        if self._turns is None:
            if self._parts:
                raise ProgramDefinitionError(
                    f"branch {self.thread_id!r} holds a text prompt: a branch is either text "
                    f"or a conversation of messages, not both"
                )
            self._turns = []
        if message.generation is None:
            self._turns.append((message.role, [message.content]))
            return
        variable = self._generate(message.generation, partial=message.content)
        self._turns.append(("assistant", [message.content, str(variable)]))

    def _generate(self, generation: Generation, partial: str = "") -> SemanticVariable:
        """The model writes the next assistant turn (continuing `partial`, its fixed start)."""
        assert self._turns is not None
        if not self._turns:
            raise ProgramDefinitionError(
                f"{generation.kind}() at {generation.site}: the conversation is empty; add "
                f"a system or user message first"
            )
        turns = [*self._turns, *([("assistant", [partial])] if partial else [])]
        prompt = CallPrompt(messages=message_specs(turns), continue_final_message=bool(partial))
        variable = _llm_call(
            self._context,
            generation.kind,
            prompt,
            thread_id=self.thread_id,
            name=generation.name,
            sampling=generation.sampling,
            choices=generation.choices,
            priority_hint=generation.priority_hint,
            site=generation.site,
            parents=self._take_after(),
        )
        self.last = variable
        if generation.name:
            self._named[generation.name] = variable
        return variable

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
        """A call on the prompt so far; its output is appended (chat form: as the next
        assistant turn)."""
        sampling = _sampling(max_tokens, temperature, top_p, stop, regex, json_schema, seed)
        return self._call(Generation("gen", name, sampling, None, priority_hint, caller_site()))

    def select(
        self,
        choices: Iterable[str],
        *,
        name: str | None = None,
        priority_hint: float | None = None,
    ) -> SemanticVariable:
        site = caller_site()
        options = _choices(choices, site)
        return self._call(
            Generation("select", name, {"temperature": 0.0}, options, priority_hint, site)
        )

    def _call(self, generation: Generation) -> SemanticVariable:
        if self._turns is not None:
            variable = self._generate(generation)
            self._turns.append(("assistant", [str(variable)]))
            return variable
        if not self._parts:
            raise ProgramDefinitionError(
                f"branch {self.thread_id!r}: generating on an empty prompt; add text first"
            )
        variable = _llm_call(
            self._context,
            generation.kind,
            CallPrompt(text=self.text),
            thread_id=self.thread_id,
            name=generation.name,
            sampling=generation.sampling,
            choices=generation.choices,
            priority_hint=generation.priority_hint,
            site=generation.site,
            parents=self._take_after(),
        )
        self._parts.append(str(variable))
        self.last = variable
        if generation.name:
            self._named[generation.name] = variable
        return variable

    def fork(self, n: int) -> list[Branch]:
        if self._turns is not None:
            prefix = CallPrompt(messages=message_specs(self._turns), add_generation_prompt=False)
        else:
            prefix = CallPrompt(text=self.text)
        return _fork(self._context, n, prefix, caller_site())

    def _take_after(self) -> list[str]:
        after, self._after = self._after, []
        return after

    def __repr__(self) -> str:
        if self._turns is not None:
            return f"<Branch {self.index} {self.thread_id!r}: {len(self._turns)} messages>"
        return f"<Branch {self.index} {self.thread_id!r}: {self.text[-40:]!r}>"


def conversation(*messages: Message) -> Branch:
    """A chat that grows as the model answers, on its own thread (SGLang's `s` with roles):
    `s += user(...)`, `s += assistant(gen(...))`; see `roles.py`."""
    context = current_context()
    for message in messages:
        if not isinstance(message, Message) or message.generation is not None:
            raise ProgramDefinitionError(
                "conversation() starts from system / user / assistant messages; add "
                "generated turns with `s += assistant(gen(...))`"
            )
    prefix = CallPrompt(messages=tuple(m.spec() for m in messages))
    return Branch(context, prefix, context.new_thread_id(), 0)


def fork(n: int, prefix: Any = "") -> list[Branch]:
    """`n` parallel branches that start from the same `prefix` (a template, or messages)."""
    return _fork(current_context(), n, CallPrompt.prefix(prefix), caller_site())


def _fork(context: ProgramContext, n: int, prefix: CallPrompt, site: str) -> list[Branch]:
    """Branches that share `prefix`. Like SGLang's fork, the prefix is prefilled once first
    (a call with `max_new_tokens=0`, the branches' parent): branches sent together would
    otherwise all prefill it at the same time, before any of them has cached it."""
    if not isinstance(n, int) or not 1 <= n <= _MAX_FORK:
        raise ProgramDefinitionError(f"fork() at {site}: n must be an int in 1..{_MAX_FORK}")
    after: list[str] = []
    if n > 1 and (prefix.text or prefix.messages):
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
